"""``bp`` beside the peer libraries on the UCI splits (issue 10, item 5).

On the same standard splits, standardisation, network (one hidden layer of 50 ReLU units,
100 for protein), number of optimizer steps and batch schedule as ``dualflow uci``'s default
``bp`` recipe (:data:`dualflow.experiments.uci.METHODS`), this runs whichever of the peers
below import, and reports test log-likelihood and RMSE in the original units (the
predictive density of ``y``, noise included; sampled predictives moment-matched to a
Gaussian, as the runner does):

* ``bp``, ``bp-ng``: dualflow's default recipes (what ``dualflow uci`` runs, no search);
* ``map``: the point network (``torch.nn``), Adam with cosine decay at the recipe's step
  size, learned homoscedastic noise, Gaussian prior ``N(0, gain^2 / fan_in)`` as weight decay
  (MAP); the network the Laplace approximation starts from;
* ``laplace``: laplace-torch, full Laplace (``subset_of_weights="all"``,
  ``hessian_structure="full"``) on the MAP network, prior precision by marginal likelihood
  (``optimize_prior_precision(method="marglik")``), GLM predictive;
* ``bayesian-torch``: bayesian-torch ``LinearFlipout`` layers with the library's default prior
  ``N(0, 1)`` and initialisation, loss ``NLL + KL / N`` (its ``get_kl_loss``), 32 test samples;
* ``ivon``: the IVON optimizer of ivon-opt (``lr=0.03``, ``ess=N``, its defaults otherwise)
  on the point network, one training sample per step, 32 test samples.

A peer that is not installed or fails to import is reported in the output, not fatal.

Install (laplace-torch, backpack-for-pytorch, curvlinops-for-pytorch and bayesian-torch
declare torchvision as a dependency but do not import it on these code paths; the
torchvision wheel built for torch 2.13 on PyPI is a CUDA build that fails to import on a
CPU-only machine, so install those four without their dependencies, then the rest)::

    pip install -c constraints.txt -e ".[peers]"         # torchvision-free dependencies + ivon-opt
    pip install -c constraints.txt --no-deps laplace-torch==0.3 backpack-for-pytorch \\
        curvlinops-for-pytorch bayesian-torch==0.5.0

(``constraints.txt`` pins the installed torch, e.g. ``torch==2.13.0``.) If torchvision got
installed anyway and ``import laplace`` fails in ``torchvision``, ``pip uninstall
torchvision`` fixes it. Checked here: ``import laplace, bayesian_torch, ivon`` succeeds with
no torchvision installed.

Usage::

    python benchmarks/peers_uci.py --sets boston,concrete,energy,yacht,wine [--splits K]

Records go to ``benchmarks/results/peers_uci.json`` after every (peer, set, split) (a rerun
resumes), the table to ``benchmarks/results/peers_uci.md``. One thread per process.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import dualflow as df
from dualflow.experiments import uci
from dualflow.experiments.data.uci import Standardizer

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = 32
PEERS = ("bp", "bp-ng", "map", "laplace", "bayesian-torch", "ivon")
#: the module each peer needs (``None``: always available) and its distribution on PyPI
NEEDS = {
    "bp": None,
    "bp-ng": None,
    "map": None,
    "laplace": "laplace",
    "bayesian-torch": "bayesian_torch",
    "ivon": "ivon",
}
DISTRIBUTIONS = {"laplace": "laplace-torch", "bayesian-torch": "bayesian-torch", "ivon": "ivon-opt"}
IVON_LR = 0.03


def _available(peer: str) -> tuple[bool, str]:
    mod = NEEDS[peer]
    if mod is None:
        return True, ""
    try:
        importlib.import_module(mod)
    except Exception as err:  # any import failure (torchvision, ...) is reported, not fatal
        return False, f"{type(err).__name__}: {err}".splitlines()[0]
    try:
        return True, f"{DISTRIBUTIONS[peer]} {importlib.metadata.version(DISTRIBUTIONS[peer])}"
    except importlib.metadata.PackageNotFoundError:
        return True, "installed"


# ----------------------------------------------------------------------------- shared pieces


def _mlp(d_in: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))


def _batches(n: int, bs: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            yield perm[i : i + bs]


def _gauss_nll(mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (math.log(2 * math.pi) + torch.log(var) + (y - mean) ** 2 / var).mean()


def _moment_match(means: Tensor, vars_: Tensor) -> df.Gaussian:
    """Gaussian matched to the mixture of ``S`` Gaussians ``(S, B, 1)``."""
    mean = means.mean(0)
    return df.Gaussian(mean, vars_.mean(0) + ((means - mean) ** 2).mean(0))


def _prior_precisions(net: torch.nn.Sequential) -> list[tuple[Tensor, float]]:
    """``(parameter, 1 / prior variance)``: ``N(0, gain^2 / fan_in)`` as dualflow's layers."""
    (l1, _, l2) = net
    p1, p2 = l1.in_features / 2.0, l2.in_features / 1.0
    return [(l1.weight, p1), (l1.bias, p1), (l2.weight, p2), (l2.bias, p2)]


def _train_map(x: Tensor, y: Tensor, hidden: int, hp: dict[str, Any], bs: int, epochs: int, seed: int):
    torch.manual_seed(seed)
    net = _mlp(x.shape[1], hidden)
    log_noise = torch.nn.Parameter(torch.tensor(math.log(hp["noise_var"])))
    opt = torch.optim.Adam([*net.parameters(), log_noise], lr=hp["lr"])
    n = x.shape[0]
    total = epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    pp = _prior_precisions(net)
    for idx in _batches(n, bs, epochs, seed):
        opt.zero_grad()
        out = net(x[idx])
        loss = _gauss_nll(out, log_noise.exp().expand_as(out), y[idx])
        loss = loss + sum(0.5 * prec * (p**2).sum() for p, prec in pp) / n
        loss.backward()
        opt.step()
        sched.step()
    return net, float(log_noise.detach().exp())


# ----------------------------------------------------------------------------- the peers


def _run_bp(x, y, xte, hidden, hp, bs, epochs, seed, method: str = "bp") -> df.Gaussian:
    if method != "bp":  # bp-ng: its own default recipe (the same steps, so the same schedule)
        hp = uci.resolve_hyperparameters(dict(uci.METHODS[method].defaults), bs, x.shape[0])
    cfg = df.train.TrainConfig(
        epochs=epochs,
        batch_size=bs,
        lr=float(hp["lr"]),
        kl_weight=float(hp.get("kl_scale", 1.0)) / x.shape[0],
        schedule="cosine",
        seed=seed,
        progress=False,
    )
    df.train.seed_everything(seed)
    m = uci.create_method(method, x.shape[1], hidden, hp)
    m.fit(x, y, cfg)
    return m.predict(xte)


def _run_map(x, y, xte, hidden, hp, bs, epochs, seed) -> df.Gaussian:
    net, noise = _train_map(x, y, hidden, hp, bs, epochs, seed)
    with torch.no_grad():
        out = net(xte)
    return df.Gaussian(out, torch.full_like(out, noise))


def _run_laplace(x, y, xte, hidden, hp, bs, epochs, seed) -> df.Gaussian:
    from laplace import Laplace

    net, noise = _train_map(x, y, hidden, hp, bs, epochs, seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=min(len(y), 1024))
    la = Laplace(
        net,
        "regression",
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=math.sqrt(noise),
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", pred_type="glm")
    f_mu, f_var = la(xte, pred_type="glm")
    f_var = f_var.reshape(f_mu.shape)
    return df.Gaussian(f_mu.detach(), f_var.detach() + float(la.sigma_noise) ** 2)


def _run_bayesian_torch(x, y, xte, hidden, hp, bs, epochs, seed) -> df.Gaussian:
    from bayesian_torch.layers import LinearFlipout
    from bayesian_torch.models.dnn_to_bnn import get_kl_loss

    torch.manual_seed(seed)
    net = torch.nn.Sequential(LinearFlipout(x.shape[1], hidden), torch.nn.ReLU(), LinearFlipout(hidden, 1))

    def forward(inp: Tensor) -> Tensor:  # bayesian-torch layers return (output, kl)
        h = inp
        for layer in net:
            h = layer(h)
            if isinstance(h, tuple):
                h = h[0]
        return h

    log_noise = torch.nn.Parameter(torch.tensor(math.log(hp["noise_var"])))
    opt = torch.optim.Adam([*net.parameters(), log_noise], lr=hp["lr"])
    n = x.shape[0]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / bs))
    for idx in _batches(n, bs, epochs, seed):
        opt.zero_grad()
        out = forward(x[idx])
        loss = _gauss_nll(out, log_noise.exp().expand_as(out), y[idx]) + get_kl_loss(net) / n
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        means = torch.stack([forward(xte) for _ in range(SAMPLES)])
    return _moment_match(means, torch.full_like(means, float(log_noise.detach().exp())))


def _run_ivon(x, y, xte, hidden, hp, bs, epochs, seed) -> df.Gaussian:
    import ivon

    torch.manual_seed(seed)
    net = _mlp(x.shape[1], hidden)
    log_noise = torch.nn.Parameter(torch.tensor(math.log(hp["noise_var"])))
    n = x.shape[0]
    opt = ivon.IVON([*net.parameters(), log_noise], lr=IVON_LR, ess=n)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / bs))
    for idx in _batches(n, bs, epochs, seed):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            out = net(x[idx])
            _gauss_nll(out, log_noise.exp().expand_as(out), y[idx]).backward()
        opt.step()
        sched.step()
    means, vars_ = [], []
    with torch.no_grad():
        for _ in range(SAMPLES):
            with opt.sampled_params():
                out = net(xte)
                means.append(out)
                vars_.append(torch.full_like(out, float(log_noise.detach().exp())))
    return _moment_match(torch.stack(means), torch.stack(vars_))


RUNNERS: dict[str, Callable[..., df.Gaussian]] = {
    "bp": _run_bp,
    "bp-ng": functools.partial(_run_bp, method="bp-ng"),
    "map": _run_map,
    "laplace": _run_laplace,
    "bayesian-torch": _run_bayesian_torch,
    "ivon": _run_ivon,
}


def run_one(peer: str, name: str, split: int, hp: dict[str, Any]) -> dict[str, Any]:
    ds = uci._dataset(name, None)
    xtr, ytr, xte, yte = ds.split(split)
    xs, ys = Standardizer.fit(xtr), Standardizer.fit(ytr)
    x = uci._tensor(xs.transform(xtr))
    y = uci._tensor(ys.transform(ytr)).reshape(-1, 1)
    xt = uci._tensor(xs.transform(xte))
    bs, epochs = uci.schedule(len(y), ds.n_epochs, hp)
    seed = split
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"peer": peer, "dataset": name, "split": split, "batch_size": bs, "epochs": epochs}
    try:
        pred = RUNNERS[peer](x, y, xt, ds.n_hidden, hp, bs, epochs, seed)
        if not (torch.isfinite(pred.mean).all() and torch.isfinite(pred.var).all()):
            raise FloatingPointError("non-finite predictions")
        rmse, ll = uci.evaluate(pred, yte, ys)
        rec.update(rmse=rmse, ll=ll, error=None)
    except Exception as err:
        rec.update(rmse=None, ll=None, error=f"{type(err).__name__}: {err}")
        traceback.print_exc()
    rec["seconds"] = time.perf_counter() - t0
    return rec


def render(records: list[dict[str, Any]], status: dict[str, tuple[bool, str]], command: str) -> str:
    sets = list(dict.fromkeys(r["dataset"] for r in records))
    peers = [p for p in PEERS if any(r["peer"] == p for r in records)]
    lines = [
        "# dualflow `bp` beside the peer libraries (UCI, test log-likelihood and RMSE)",
        "",
        f"Made by `{command}` (`benchmarks/peers_uci.py`; method details in its docstring).",
        "Same splits, standardisation, network, steps and batch schedule for every row; mean ± "
        "standard error over the splits run (n). Higher LL is better. Bold: best LL per set.",
        "",
        "Peers: "
        + "; ".join(
            f"{p}: " + (("ok" + (f" ({v})" if v else "")) if ok else f"NOT AVAILABLE ({v})")
            for p, (ok, v) in status.items()
        ),
        "",
        f"Versions: torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}.",
        "",
        "| data | "
        + " | ".join(f"{p} LL" for p in peers)
        + " | "
        + " | ".join(f"{p} RMSE" for p in peers)
        + " | n |",
        "|---" * (2 * len(peers) + 2) + "|",
    ]
    for d in sets:
        cells_ll, cells_rmse, ns = [], [], set()
        means = {}
        for p in peers:
            rs = [r for r in records if r["dataset"] == d and r["peer"] == p and r["ll"] is not None]
            ns.add(len(rs))
            if rs:
                means[p] = float(np.mean([r["ll"] for r in rs]))
        best = max(means.values()) if means else None
        for p in peers:
            rs = [r for r in records if r["dataset"] == d and r["peer"] == p and r["ll"] is not None]
            fails = sum(1 for r in records if r["dataset"] == d and r["peer"] == p and r["ll"] is None)
            if not rs:
                cells_ll.append("failed" if fails else "–")
                cells_rmse.append("–")
                continue
            ll = np.array([r["ll"] for r in rs])
            rm = np.array([r["rmse"] for r in rs])
            se = ll.std(ddof=1) / math.sqrt(len(ll)) if len(ll) > 1 else 0.0
            sr = rm.std(ddof=1) / math.sqrt(len(rm)) if len(rm) > 1 else 0.0
            txt = f"{ll.mean():.3f} ± {se:.3f}" + (f" ({fails} failed)" if fails else "")
            cells_ll.append(f"**{txt}**" if best is not None and means[p] == best else txt)
            cells_rmse.append(f"{rm.mean():.3g} ± {sr:.2g}")
        lines.append(f"| {d} | " + " | ".join(cells_ll) + " | " + " | ".join(cells_rmse) + f" | {max(ns)} |")
    secs = {p: np.mean([r["seconds"] for r in records if r["peer"] == p]) for p in peers}
    lines += [
        "",
        "Mean seconds per split (one thread): " + ", ".join(f"{p} {s:.1f}" for p, s in secs.items()) + ".",
    ]
    failures = [r for r in records if r["error"]]
    if failures:
        lines += ["", "Failures:"] + [
            f"* {r['peer']} {r['dataset']} split {r['split']}: {r['error']}" for r in failures
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="boston,concrete,energy,yacht,wine")
    p.add_argument("--splits", type=int, default=None, help="first K splits (default: all)")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--out", default=str(RESULTS / "peers_uci.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out_md = Path(args.out)
    out_json = out_md.with_suffix(".json")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    peers = [q for q in args.peers.split(",") if q]
    unknown = [q for q in peers if q not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {list(RUNNERS)}")
    status = {q: _available(q) for q in peers}
    for q, (ok, info) in status.items():
        print(f"{q}: {'ok ' + info if ok else 'not available: ' + info}")
    hp = dict(uci.METHODS["bp"].defaults)
    records = json.loads(out_json.read_text())["records"] if out_json.is_file() else []
    done = {(r["peer"], r["dataset"], r["split"]) for r in records}
    command = "python benchmarks/peers_uci.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in uci.expand_datasets(args.sets):
        ds = uci._dataset(name, None)
        k = ds.n_splits if args.splits is None else min(args.splits, ds.n_splits)
        for split in range(k):
            for q in peers:
                if not status[q][0] or (q, name, split) in done:
                    continue
                rec = run_one(q, name, split, hp)
                records.append(rec)
                ll = "failed" if rec["ll"] is None else f"{rec['ll']:.3f}"
                print(f"{q:<15} {name:<9} split {split:>2}: LL {ll}  ({rec['seconds']:.1f} s)", flush=True)
                out_json.write_text(json.dumps({"records": records, "recipe": hp}, indent=1) + "\n")
        out_md.write_text(render(records, status, command))
    print(out_md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
