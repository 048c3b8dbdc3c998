"""Post-hoc uncertainty for trained point networks on UCI: dualflow vs laplace-torch.

For every (data set, split): one point network (the protocol's one hidden layer of 50 ReLU
units, 100 for protein) is trained by MAP (squared error, Adam, lr 1e-2 with cosine decay,
batch 32, weight decay 1e-4, the protocol's epochs but at least 4000 steps; inputs and targets
standardised with training statistics). On that same network:

* ``dualflow diag``: :func:`dualflow.posthoc.laplace` with its defaults: diagonal GGN Laplace,
  noise = the maximum-likelihood noise of the training residuals, prior precision by the
  Laplace marginal likelihood (L-BFGS), predictive moments by one pass of the converted
  network with the first-order rule (Eq. 3: the linearised predictive);
* ``dualflow diag (moments)``: the same with ``predictive="moments"`` (closed-form ReLU
  moments: the network's own predictive under the diagonal posterior);
* ``dualflow diag (joint)``: the default with ``noise_var="marglik"`` (noise and prior precision
  jointly by the diagonal Laplace marginal likelihood, the objective of laplace-torch's diag);
* ``laplace-torch diag`` / ``laplace-torch kron``: ``laplace.Laplace(net, "regression",
  subset_of_weights="all", hessian_structure=...)``, fitted on the training data, prior
  precision and noise by its marginal likelihood (Adam on their logs, 300 steps of lr 0.1,
  the recipe of laplace-torch's README), predictive ``pred_type="glm"`` (linearised network);
* ``MAP``: the point network with the maximum-likelihood noise of its training residuals.

Reported: test log-likelihood per point and RMSE on the original scale of ``y``, and the wall
time of the predictive on the whole test set (median of 3, one thread, all methods in one
process, so the ratio is meaningful on a noisy machine). Per-split results go to
``benchmarks/results/posthoc.json`` (the run resumes from it); the summary to
``benchmarks/results/posthoc.md``.

Usage::

    python benchmarks/bench_posthoc.py [--datasets boston,concrete,...] [--splits 0-4]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dualflow import posthoc
from dualflow.experiments.data.uci import Standardizer, load_uci

RESULTS = Path(__file__).resolve().parent / "results"
ALL = ["boston", "concrete", "energy", "kin8nm", "naval", "power", "protein", "wine", "yacht"]
METHODS = [
    "dualflow diag",
    "dualflow diag (moments)",
    "dualflow diag (joint)",
    "laplace-torch diag",
    "laplace-torch kron",
    "MAP",
]


def parse_splits(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def train_map(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
    )
    n, batch = x.shape[0], 32
    steps = max(epochs * math.ceil(n / batch), 4000)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch]
        pos += batch
        opt.zero_grad()
        ((net(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()
        sched.step()
    return net.eval()


def log_lik(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, y_scale: float) -> float:
    """Mean test log density of the original-scale target."""
    lp = -0.5 * (math.log(2 * math.pi) + torch.log(var) + (y - mean) ** 2 / var) - math.log(y_scale)
    return float(lp.mean())


def timed(fn, repeats: int = 3):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def run_split(data, split: int, seed: int) -> dict:
    from laplace import Laplace

    xtr, ytr, xte, yte = data.split(split)
    sx, sy = Standardizer.fit(xtr), Standardizer.fit(ytr[:, None])
    f32 = torch.float32
    xtr_t = torch.tensor(sx.transform(xtr), dtype=f32)
    ytr_t = torch.tensor(sy.transform(ytr[:, None]), dtype=f32)
    xte_t = torch.tensor(sx.transform(xte), dtype=f32)
    yte_t = torch.tensor(sy.transform(yte[:, None]), dtype=f32)
    y_scale = float(sy.std[0])
    t0 = time.perf_counter()
    net = train_map(xtr_t, ytr_t, data.n_hidden, data.n_epochs, seed + split)
    train_s = time.perf_counter() - t0
    res: dict = {"dataset": data.name, "split": split, "n_train": len(ytr), "train_s": train_s, "methods": {}}

    def record(name, mean, var, fit_s, pred_s, **extra):
        res["methods"][name] = {
            "ll": log_lik(mean, var, yte_t, y_scale),
            "rmse": float(((mean - yte_t) ** 2).mean().sqrt()) * y_scale,
            "fit_s": fit_s,
            "predict_s": pred_s,
            **extra,
        }

    # dualflow: diagonal Laplace + one moment-propagation pass
    t = time.perf_counter()
    post = posthoc.laplace(net, (xtr_t, ytr_t))
    fit_s = time.perf_counter() - t
    pred, pred_s = timed(lambda: post.predict(xte_t))
    record(
        "dualflow diag",
        pred.mean,
        pred.var,
        fit_s,
        pred_s,
        noise_sd=math.sqrt(post.noise_var) * y_scale,
        prior_precision=post.prior_precision,
    )

    for label, kw in (("moments", {"predictive": "moments"}), ("joint", {"noise_var": "marglik"})):
        t = time.perf_counter()
        variant = posthoc.laplace(net, (xtr_t, ytr_t), **kw)
        fit_s = time.perf_counter() - t
        pred, pred_s = timed(lambda v=variant: v.predict(xte_t))
        record(
            f"dualflow diag ({label})",
            pred.mean,
            pred.var,
            fit_s,
            pred_s,
            noise_sd=math.sqrt(variant.noise_var) * y_scale,
            prior_precision=variant.prior_precision,
        )

    # laplace-torch, diagonal and Kronecker-factored, GLM predictive
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr_t, ytr_t), batch_size=256)
    for structure in ("diag", "kron"):
        t = time.perf_counter()
        la = Laplace(net, "regression", subset_of_weights="all", hessian_structure=structure)
        la.fit(loader)
        log_prior = torch.zeros(1, requires_grad=True)
        log_sigma = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
        for _ in range(300):
            opt.zero_grad()
            (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
            opt.step()
        la.prior_precision = log_prior.detach().exp()
        la.sigma_noise = log_sigma.detach().exp()
        fit_s = time.perf_counter() - t
        (f_mu, f_var), pred_s = timed(lambda la=la: la(xte_t, pred_type="glm"))
        s2 = float(la.sigma_noise) ** 2
        record(
            f"laplace-torch {structure}",
            f_mu.detach(),
            f_var.detach().reshape(-1, 1) + s2,
            fit_s,
            pred_s,
            noise_sd=math.sqrt(s2) * y_scale,
            prior_precision=float(la.prior_precision),
        )

    # the point network with the maximum-likelihood noise of its training residuals
    with torch.no_grad():
        s2 = float(((net(xtr_t) - ytr_t) ** 2).mean())
        mean, pred_s = timed(lambda: net(xte_t))
    record("MAP", mean, torch.full_like(mean, s2), 0.0, pred_s, noise_sd=math.sqrt(s2) * y_scale)
    return res


def summarise(rows: list[dict], command: str) -> str:
    lines = [
        "# Post-hoc predictive uncertainty of trained point networks (UCI)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {platform.system()}, torch {torch.__version__}, one thread. "
        "Each split: one MAP network (1 hidden layer of 50 ReLU units, 100 for protein; Adam 1e-2 "
        "with cosine decay, batch 32, weight decay 1e-4, the protocol's epochs but >= 4000 steps); "
        "every method below is computed on that same network. LL: mean test log-likelihood per point "
        "(original scale, higher is better), "
        "mean ± standard error over the splits; RMSE likewise; predict: wall time of the predictive on "
        "the whole test set (median over splits of the median of 3 repeats); speed-up: median over "
        "splits of (laplace-torch kron time / dualflow time).",
        "",
        "| data | splits | dualflow diag LL | laplace-torch kron LL | laplace-torch diag LL | MAP LL "
        "| RMSE (MAP mean) | dualflow predict | kron predict | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["dataset"], []).append(r)

    def ms(vals):
        m = statistics.fmean(vals)
        se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
        return f"{m:.3f} ± {se:.3f}"

    names = [n for n in ALL if n in by]
    cols = {}
    for name in names:
        rs = sorted(by[name], key=lambda r: r["split"])
        cols[name] = {m: [r["methods"][m] for r in rs] for m in METHODS}
        col = cols[name]
        splits = [r["split"] for r in rs]
        split_txt = f"{len(splits)} ({min(splits)}-{max(splits)})"
        speed = statistics.median(
            k["predict_s"] / d["predict_s"] for k, d in zip(col["laplace-torch kron"], col["dualflow diag"])
        )
        lines.append(
            f"| {name} | {split_txt} | {ms([c['ll'] for c in col['dualflow diag']])} "
            f"| {ms([c['ll'] for c in col['laplace-torch kron']])} "
            f"| {ms([c['ll'] for c in col['laplace-torch diag']])} "
            f"| {ms([c['ll'] for c in col['MAP']])} "
            f"| {ms([c['rmse'] for c in col['MAP']])} "
            f"| {statistics.median(c['predict_s'] for c in col['dualflow diag']) * 1e3:.1f} ms "
            f"| {statistics.median(c['predict_s'] for c in col['laplace-torch kron']) * 1e3:.0f} ms "
            f"| {speed:.0f}x |"
        )
    lines += [
        "",
        "dualflow variants on the same networks (LL; RMSE of the `moments` predictive mean, whose "
        "mean differs from the network's):",
        "",
        "| data | default (linearised, residual noise) | moments | joint marginal-likelihood noise "
        "| moments RMSE |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        col = cols[name]
        lines.append(
            f"| {name} | {ms([c['ll'] for c in col['dualflow diag']])} "
            f"| {ms([c['ll'] for c in col['dualflow diag (moments)']])} "
            f"| {ms([c['ll'] for c in col['dualflow diag (joint)']])} "
            f"| {ms([c['rmse'] for c in col['dualflow diag (moments)']])} |"
        )
    lines += [
        "",
        "Fitted noise standard deviation (original scale, mean over splits):",
        "",
        "| data | dualflow (residuals) | dualflow (joint marglik) | laplace-torch diag "
        "| laplace-torch kron |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        rs = by[name]
        shown = ["dualflow diag", "dualflow diag (joint)", "laplace-torch diag", "laplace-torch kron"]
        vals = [statistics.fmean(r["methods"][m]["noise_sd"] for r in rs) for m in shown]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
    lines += ["", "Per-split numbers: `benchmarks/results/posthoc.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(ALL))
    p.add_argument("--splits", default="0-4", help="e.g. 0-19 or 0,3,5 (protein has 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "posthoc.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    with open(md, "a"):
        pass  # writable before any work
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["dataset"], r["split"]) for r in rows}
    command = "python benchmarks/bench_posthoc.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in args.datasets.split(","):
        data = load_uci(name)
        for split in parse_splits(args.splits):
            if split >= data.n_splits or (data.name, split) in done:
                continue
            r = run_split(data, split, args.seed)
            rows.append(r)
            out.write_text(json.dumps(rows, indent=1))
            md.write_text(summarise(rows, command))  # a summary of whatever is done so far
            m = r["methods"]
            print(
                f"{data.name} split {split}: LL dualflow {m['dualflow diag']['ll']:.3f} "
                f"(moments {m['dualflow diag (moments)']['ll']:.3f}, "
                f"joint {m['dualflow diag (joint)']['ll']:.3f}), "
                f"lt-diag {m['laplace-torch diag']['ll']:.3f}, lt-kron {m['laplace-torch kron']['ll']:.3f}, "
                f"MAP {m['MAP']['ll']:.3f}; predict {m['dualflow diag']['predict_s'] * 1e3:.1f} ms vs "
                f"{m['laplace-torch kron']['predict_s'] * 1e3:.0f} ms (train {r['train_s']:.0f}s)",
                flush=True,
            )
    md.write_text(summarise(rows, command))
    np.set_printoptions()


if __name__ == "__main__":
    main()
