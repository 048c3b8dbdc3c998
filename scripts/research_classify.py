"""Research tools for the image-classification recipe (issue 11, items 2-3).

Two sub-commands, both reading the records (``--out`` JSON) and checkpoints (``--workdir``)
of ``dualflow classify`` runs:

* ``curves OUT.png RUN.json ...``: validation error / NLL / ECE and the train objective
  per epoch of several runs on one figure (the curves of ``results/classify/research.md``);
* ``diag RUN.json WORKDIR``: what a trained Bayesian network looks like: per layer the
  prior variance, the weight second moments, the share of weights at their prior, the KL;
  and the validation error / NLL / ECE of several predictives of the *same* weights (the
  probit approximation the method uses, independent logit samples, logit samples with the
  full covariance of the last layer's logits, Monte Carlo over weight samples, the network of
  the weight means).

Usage::

    python scripts/research_classify.py curves results/classify/research/x.png runs/a.json runs/b.json
    python scripts/research_classify.py diag runs/a.json /tmp/work/a
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dualflow import methods, models
from dualflow.experiments import metrics as M
from dualflow.experiments.classify import ClassifyConfig
from dualflow.experiments.classify.runner import _prepare
from dualflow.experiments.distributed import DistInfo
from dualflow.gaussian import Gaussian
from dualflow.nn.base import BayesLayer


def _label(rec: dict[str, Any], path: str) -> str:
    return rec.get("label") or Path(path).stem


def curves(out: str, paths: list[str], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for p in paths:
        rec = json.loads(Path(p).read_text())
        h = rec["history"]
        ep = [e["epoch"] for e in h]
        lab = _label(rec, p)
        line = ax[0].plot(ep, [100 * e["val_error"] for e in h], "o-", ms=3, label=lab)[0]
        c = line.get_color()
        ax[1].plot(ep, [e["val_loss"] for e in h], "o-", ms=3, color=c)
        ax[2].plot(ep, [e["val_ece"] for e in h], "o-", ms=3, color=c)
        ax[3].plot(ep, [e["train_nll"] for e in h], "o-", ms=3, color=c)
        ax[3].plot(ep, [e["train_kl_term"] for e in h], ":", color=c)
    for a, t in zip(
        ax, ("validation error %", "validation NLL", "validation ECE", "train NLL (—), KL/N (··)")
    ):
        a.set_title(t, fontsize=9)
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].set_yscale("log")
    ax[1].set_yscale("log")
    ax[3].set_yscale("log")
    ax[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out}")


def _load(rec_path: str, workdir: str) -> tuple[methods.Method, Any, Any, Any]:
    rec = json.loads(Path(rec_path).read_text())
    cfg = ClassifyConfig(**rec["config"])
    # the runner's own preparation: data, input normalisation, validation split, the method
    data, val, _, method = _prepare(cfg, DistInfo())
    if val is None:
        raise ValueError(f"{rec_path}: the run has no validation split (val=0); diag needs one")
    x_val, y_val = val
    ck = torch.load(Path(workdir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    sd = ck["model"]
    if "identity" in ck:  # the runner before the one loop: its method kept the network as "net."
        sd = {("members.0." + k[4:] if k.startswith("net.") else k): v for k, v in sd.items()}
        sd.setdefault("fitted", method.state_dict()["fitted"].clone().fill_(True))
    method.load_state_dict(sd)
    method.eval()
    return method, data, x_val, y_val


def _metrics(p: torch.Tensor, y: torch.Tensor) -> str:
    m = M.finalize(M.metric_sums(p.double(), y))
    return f"err {100 * m['error']:.2f}%  nll {m['nll']:.4f}  ece {m['ece']:.4f}"


@torch.no_grad()
def diag(rec_path: str, workdir: str, n_eval: int = 5000) -> None:
    torch.set_num_threads(1)
    method, data, x_val, y_val = _load(rec_path, workdir)
    n = data.y_train.shape[0]
    print(f"N = {n}")
    total_kl = 0.0
    layers = [(name, m) for name, m in method.named_modules() if isinstance(m, BayesLayer) and m.bayes]
    for name, mod in layers:
        s0 = mod.prior_var
        mu2 = mod.weight_mu.square()
        s2 = mod.weight_var
        ratio = s2 / s0
        q = torch.quantile(ratio.flatten()[:1_000_000], torch.tensor([0.1, 0.5, 0.9]))
        kl = float(mod.kl_own())
        total_kl += kl
        eb = float((mu2 + s2).mean())
        print(
            f"{name:28s} fan_in {mod.fan_in:5d}  prior {s0:.2e}  E[mu^2] {float(mu2.mean()):.2e}  "
            f"E[s2] {float(s2.mean()):.2e}  s2/s0 q10/50/90 {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}  "
            f"share s2>s0/2 {float((ratio > 0.5).float().mean()):.3f}  KL/N {kl / n:.3f}  "
            f"EB prior {eb:.2e} ({eb / s0:.2f} x)"
        )
        if mod.bias_mu is not None:
            bq = mod.bias_var / s0
            b_abs = float(mod.bias_mu.abs().mean())
            print(f"{'':28s} bias: mean|b| {b_abs:.3f}  s2/s0 median {float(bq.median()):.3f}")
    print(f"total KL/N {total_kl / n:.3f}")

    x = data.normalize(x_val[:n_eval])
    y = y_val[:n_eval]
    net = method.net
    body = net.body if hasattr(net, "body") else net
    last = body[-1]
    h = body[:-1](x) if len(body) > 1 else x
    hm, hv = (h.mean, h.var) if isinstance(h, Gaussian) else (h, torch.zeros_like(h))
    out = last(Gaussian(hm, hv))
    print(f"hidden input of last layer: mean E[v]/E[m^2] {float(hv.mean() / hm.square().mean()):.3f}")
    print(f"logit var (mean over classes, median over images) {float(out.var.mean(1).median()):.3f}")
    g = torch.Generator().manual_seed(0)
    S = 64
    probit = F.softmax(out.mean * torch.rsqrt(1 + math.pi / 8 * out.var), -1)
    print(f"probit (training predictive):       {_metrics(probit, y)}")
    # pairwise ("mean-field softmax") approximation:
    # p_k = 1 / sum_j exp(-(m_k - m_j) / sqrt(1 + c (v_k + v_j)))
    dm = out.mean[:, :, None] - out.mean[:, None, :]
    sv = out.var[:, :, None] + out.var[:, None, :]
    pw = 1.0 / torch.exp(-dm / torch.sqrt(1 + math.pi / 8 * sv)).sum(-1)
    tot = float(pw.sum(1).mean())
    print(f"pairwise probit (unnormalised sum {tot:.3f}): {_metrics(pw / pw.sum(1, keepdim=True), y)}")
    eps = torch.randn((S, *out.mean.shape), generator=g)
    z = out.mean + out.var.sqrt() * eps
    print(f"logit samples, independent (S={S}): {_metrics(F.softmax(z, -1).mean(0), y)}")
    # full covariance of the logits given independent inputs of the last layer
    wm, wv = last.weight_mu, last.weight_var
    bv = last.bias_var if last.bias_mu is not None else torch.zeros(wm.shape[0])
    diag_part = (hm.square() + hv) @ wv.T + bv  # (B, C)
    cov = torch.einsum("kj,bj,lj->bkl", wm, hv, wm) + torch.diag_embed(diag_part)
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(cov.shape[-1]))
    eps = torch.randn((S, *out.mean.shape), generator=g)
    zc = out.mean + torch.einsum("bkl,sbl->sbk", chol, eps)
    print(f"logit samples, full covariance:     {_metrics(F.softmax(zc, -1).mean(0), y)}")
    dv = cov.diagonal(dim1=-2, dim2=-1)
    vdiff = dv[:, :, None] + dv[:, None, :] - 2 * cov
    off = ~torch.eye(cov.shape[-1], dtype=torch.bool)
    print(
        f"  var of logit differences / sum of variances (median): "
        f"{float((vdiff[:, off] / (dv[:, :, None] + dv[:, None, :])[:, off]).median()):.3f}"
    )
    ps = method.predict(x, samples=32, propagation="local")
    print(f"MC, local reparam (S=32):           {_metrics(ps, y)}")
    ps = method.predict(x, samples=32, propagation="reparam")
    print(f"MC, weight samples (S=32):          {_metrics(ps, y)}")
    sd = {k: v.clone() for k, v in method.state_dict().items()}
    models.zero_variances_(method)
    pm = method.predict(x)
    print(f"mean network (variances 0):         {_metrics(pm, y)}")
    method.load_state_dict(sd)


def table(paths: list[str]) -> str:
    """Markdown table of the last epoch of each run (validation metrics; test only where the run
    finished)."""
    rows = [
        "| run | epochs | val error % | val NLL | val ECE | train NLL | KL/N | objective | test error % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in paths:
        rec = json.loads(Path(p).read_text())
        e = rec["history"][-1]
        test = f"{100 * rec['test_error']:.2f}" if "test_error" in rec else "—"
        ep = f"{e['epoch']}/{rec['config']['epochs']}"
        rows.append(
            f"| {_label(rec, p)} | {ep} | {100 * e['val_error']:.2f} | {e['val_loss']:.4f} "
            f"| {e['val_ece']:.4f} | {e['train_nll']:.4f} | {e['train_kl_term']:.3f} | {e['train_loss']:.3f} "
            f"| {test} |"
        )
    return "\n".join(rows)


def timing(specs: list[str], steps: int = 20, batch: int = 128) -> None:
    """Seconds per training step (forward, backward, optimizer) of the Table-1 configurations,
    measured in one process with one thread, the configurations interleaved (so that a change
    of the machine's load hits all of them alike). ``specs``: ``dataset:arch[:json arch options]``."""
    import time

    from dualflow import train
    from dualflow.experiments.classify import TABLE1_METHODS
    from dualflow.experiments.classify import resolve as res
    from dualflow.experiments.classify.aids import hooks

    torch.set_num_threads(1)
    rows = []
    for spec in specs:
        ds, arch, *rest = spec.split(":", 2)
        opts = json.loads(rest[0]) if rest else {}
        c, side = (1, 28) if ds == "mnist" else (3, 32)
        x = torch.randn(batch, c, side, side)
        y = torch.randint(0, 10, (batch,))
        runs = {}
        for m in TABLE1_METHODS:
            ng = {"damping": 0.1} if methods.traits_of(m).natural_gradient else {}
            cfg = ClassifyConfig(dataset=ds, arch=arch, method=m, arch_options=opts, ng_options=ng)
            r = res(cfg, 50000)
            build = models.builder(arch, num_classes=10, in_channels=c, image_size=side,
                                   normalization=r.normalization, **opts)  # fmt: skip
            meth = methods.create(m, build, task="classification", samples=4)
            tc = train.TrainConfig(
                lr=r.lr, optimizer="sgd" if r.optimizer == "sgd" else "adam",
                weight_decay=r.weight_decay, nesterov=True, kl_weight=r.kl_weight_abs,
            )  # fmt: skip
            params = [p for p in meth.parameters() if p.requires_grad]
            factory = hooks(cfg, r, meth, tc, 391, r.ng_data_size or 50000)[0].get("optimizer")
            opt = factory(params) if factory is not None else meth.configure_optimizer(params, 50000, tc)
            runs[m] = (meth, opt, meth.objective(r.kl_weight_abs))
        times = {m: [] for m in runs}
        for _ in range(steps):
            for m, (meth, opt, obj) in runs.items():
                meth.train()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = obj(x, y).loss
                loss.backward()
                opt.step()
                times[m].append(time.perf_counter() - t0)
        for m, ts in times.items():
            ts = sorted(ts[2:])  # drop warm-up, take the median
            med = ts[len(ts) // 2]
            rows.append((spec, m, med, batch / med))
            print(f"{spec:40s} {m:22s} {1000 * med:8.1f} ms/step  {batch / med:8.0f} images/s", flush=True)


def partial(name: str, workdir: str, out: str) -> None:
    """A record of an unfinished (stopped or diverged) run from its checkpoint: its per-epoch
    history and configuration, flagged ``"partial": true`` (no test numbers)."""
    from dualflow.experiments.classify.report import classify_history

    ck = torch.load(Path(workdir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    if "identity" in ck:  # a checkpoint of the runner before the one loop (records in classify keys)
        config, history = ck["identity"], ck["history"]
    else:  # dualflow.train.fit's checkpoint: the loop's records (its config holds the KL factor)
        config, history = ck["meta"], classify_history(ck["history"], ck["config"]["kl_weight"])
    rec = {"label": f"{name} (stopped)", "partial": True, "config": config, "history": history}
    Path(out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {out} ({len(rec['history'])} epochs)")


def run(argv: list[str]) -> int:
    """``dualflow classify`` (arguments as the command's; kept for the commands in the records)."""
    from dualflow.experiments.cli import main as cli_main

    return cli_main(["classify", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return run(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("out")
    c.add_argument("runs", nargs="+")
    c.add_argument("--title", default="")
    sub.add_parser("run", help="dualflow classify (as the records' commands)")
    d = sub.add_parser("diag")
    d.add_argument("run")
    d.add_argument("workdir")
    d.add_argument("--n", type=int, default=5000)
    ti = sub.add_parser("timing")
    ti.add_argument("specs", nargs="+", help="dataset:arch[:json arch options]")
    ti.add_argument("--steps", type=int, default=20)
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="+")
    pa = sub.add_parser("partial")
    pa.add_argument("name")
    pa.add_argument("workdir")
    pa.add_argument("out")
    a = ap.parse_args(argv)
    if a.cmd == "curves":
        curves(a.out, a.runs, a.title)
    elif a.cmd == "timing":
        timing(a.specs, a.steps)
    elif a.cmd == "table":
        print(table(a.runs))
    elif a.cmd == "partial":
        partial(a.name, a.workdir, a.out)
    else:
        diag(a.run, a.workdir, a.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
