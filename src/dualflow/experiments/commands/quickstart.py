"""``dualflow quickstart``: a BNN trained by BP (Algorithm 1) beside a point network.

Data: scikit-learn's built-in *diabetes* regression set (442 patients, 10 features; real
data shipped inside the installed package, so nothing is downloaded). Inputs and target
are standardised with training statistics; metrics are reported in the original units.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

import dualflow as df

HELP = "train a small BNN by BP on a built-in real data set (no download) beside a point network"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=300, help="training epochs (default 300)")
    p.add_argument("--hidden", type=int, default=50, help="hidden units (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--out-dir", default="runs/quickstart", help="where the plot and JSON go")
    p.add_argument("--no-progress", action="store_true")


def _load(seed: int, test_fraction: float):
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = round(test_fraction * len(y))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _net(d_in: int, hidden: int, bayes: bool) -> torch.nn.Module:
    return df.nn.Sequential(
        df.nn.Linear(d_in, hidden, bayes=bayes),
        df.nn.ReLU(),
        df.nn.Linear(hidden, 1, bayes=bayes, gain=1.0),
    )


def run_quickstart(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    # a 10-50-1 network is far too small to gain from intra-op threads; they only add overhead
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = _load(args.seed, args.test_fraction)
    xm, xs = xtr.mean(0), xtr.std(0) + 1e-12
    ym, ys = ytr.mean(), ytr.std()
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    Xtr, Xte = f32((xtr - xm) / xs), f32((xte - xm) / xs)
    Ytr, Yte = f32((ytr - ym) / ys), f32((yte - ym) / ys)

    results: dict = {
        "dataset": "sklearn diabetes",
        "n_train": len(ytr),
        "n_test": len(yte),
        "methods": {},
    }
    preds = {}
    curves = {}
    for name, bayes in (("bp", True), ("point", False)):
        torch.manual_seed(args.seed)
        net = _net(Xtr.shape[1], args.hidden, bayes)
        lik = df.losses.GaussianLikelihood(noise_var=0.5, learn=True)
        cfg = df.train.TrainConfig(
            epochs=args.epochs,
            batch_size=32,
            lr=3e-3,
            seed=args.seed,
            progress=not args.no_progress,
            # the point network gets the usual remedy against over-fitting: weight decay
            weight_decay=0.0 if bayes else 1e-3,
        )

        def evaluate(model: torch.nn.Module, lik: df.losses.GaussianLikelihood = lik) -> dict:
            p = df.train.predict(model, Xte)
            ll = df.losses.gaussian_log_density(p, Yte.unsqueeze(1), lik.noise_var, y_scale=ys)
            return {"test_nll": float(-ll.mean())}

        t0 = time.perf_counter()
        hist = df.train.fit(net, lik, (Xtr, Ytr.unsqueeze(1)), cfg, eval_fn=evaluate)
        secs = time.perf_counter() - t0
        p = df.train.predict(net, Xte)
        mean = p.mean.squeeze(1) * ys + ym
        var = (p.var.squeeze(1) + lik.noise_var.detach()) * ys**2
        rmse = float(torch.sqrt(((mean - f32(yte)) ** 2).mean()))
        nll = float(
            -df.losses.gaussian_log_density(p, Yte.unsqueeze(1), lik.noise_var.detach(), y_scale=ys).mean()
        )
        results["methods"][name] = {
            "test_rmse": rmse,
            "test_nll": nll,
            "train_seconds": secs,
            "noise_std": float(lik.noise_var.detach().sqrt() * ys),
            "mean_model_std": float(p.var.sqrt().mean() * ys),
        }
        preds[name] = (mean.numpy(), var.sqrt().numpy())
        curves[name] = (hist["epoch"], hist["test_nll"])

    const_nll = 0.5 * math.log(2 * math.pi * ys**2) + 0.5 * float(((yte - ym) ** 2).mean()) / ys**2
    results["methods"]["constant"] = {
        "test_rmse": float(np.sqrt(((yte - ym) ** 2).mean())),
        "test_nll": const_nll,
    }
    results["seconds"] = time.perf_counter() - t_start

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "quickstart.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(os.path.join(args.out_dir, "quickstart.png"), yte, preds, curves)
    return results


def _plot(path: str, yte, preds, curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    lo, hi = float(yte.min()), float(yte.max())
    for ax, (name, (m, s)) in zip(axes[:2], preds.items()):
        ax.errorbar(yte, m, yerr=2 * s, fmt="o", ms=3, alpha=0.6, elinewidth=0.8)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="true disease progression", ylabel="predicted (±2 sd)", title=f"{name}: test set")
    for name, (ep, nll) in curves.items():
        axes[2].plot(ep, nll, label=name)
    axes[2].set(xlabel="epoch", ylabel="test NLL (original units)", title="learning curves")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from dualflow.experiments.io import check_writable, require_extra

    check_writable(args.out_dir, "dir", option="--out-dir")
    require_extra("experiments", purpose="dualflow quickstart (built-in diabetes data, plot)")
    res = run_quickstart(args)
    print(
        f"data: {res['dataset']} ({res['n_train']} train / {res['n_test']} test), "
        f"1 hidden layer of {args.hidden} ReLU"
    )
    print(f"{'method':<10}{'test RMSE':>12}{'test NLL':>12}{'train s':>10}")
    for name, r in res["methods"].items():
        secs = f"{r['train_seconds']:.1f}" if "train_seconds" in r else "-"
        print(f"{name:<10}{r['test_rmse']:>12.2f}{r['test_nll']:>12.3f}{secs:>10}")
    print(
        f"plot: {os.path.join(args.out_dir, 'quickstart.png')}  "
        f"json: {os.path.join(args.out_dir, 'quickstart.json')}"
    )
    print(f"total time: {res['seconds']:.1f} s")
    return 0
