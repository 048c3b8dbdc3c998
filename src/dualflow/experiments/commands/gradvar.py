"""``dualflow gradvar``: gradient variance against batch size at one parameter point (Figure 1 a, c).

At a fixed parameter point (a short BP warm-up from a seeded initialisation; the same
weights for every method, ``vanilla`` using the weight means as point weights) the variance
of the mini-batch gradient of each method's objective ``mean J + KL/N`` with respect to the
weight means is estimated over independent draws of mini-batches and weight noise, averaged
over the weights as in Wen et al. (2018); see :mod:`dualflow.experiments.gradvar` for the exact
definition and the confidence interval. Writes ``--out`` (JSON), the same name with ``.csv``
and a log-log plot with ``.png``.

Example (the MNIST run of ``results/figure1``)::

    dualflow gradvar --dataset mnist --arch mlp --width 400 --depth 2 \\
        --batch-sizes 16,32,64,128,256,512,1024 --out results/figure1/mnist/gradvar.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

HELP = "gradient variance vs batch size of BP, reparam, local-reparam, flipout, vanilla (Figure 1 a/c)"


def _ints(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def check_methods(names: list[str]) -> None:
    """``ValueError`` for a name that is not a method with one network on the builder."""
    import dualflow.methods as dm

    ok = [m for m in dm.available() if m not in ("ensemble", "mc-dropout", "reparam-ng-ensemble")]
    for m in names:
        if m not in ok:
            raise ValueError(f"unsupported method {m!r}; choose from: {', '.join(ok)}")


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared with ``dualflow convergence``."""
    p.add_argument("--dataset", default="mnist", help="mnist | cifar10 (default mnist)")
    p.add_argument("--arch", default="mlp", help="model name of dualflow.models (mlp, vgg16, ...)")
    p.add_argument(
        "--width",
        type=float,
        default=None,
        help="mlp: hidden units (default 400); vgg16: channel multiplier (default 1.0)",
    )
    p.add_argument("--depth", type=int, default=None, help="mlp: hidden layers (default 2)")
    p.add_argument(
        "--init-var-ratio",
        type=float,
        default=0.01,
        help="share of the initial weight second moment that is variance (default 0.01)",
    )
    p.add_argument(
        "--methods",
        type=_names,
        default=["bp", "reparam", "local-reparam", "flipout", "vanilla"],
        help="comma-separated methods (default bp,reparam,local-reparam,flipout,vanilla)",
    )
    p.add_argument("--data-dir", default=None, help="data folder (default $DUALFLOW_DATA, then the cache)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument(
        "--batch-sizes",
        type=_ints,
        default=[16, 32, 64, 128, 256, 512, 1024],
        help="comma-separated batch sizes (default 16,32,...,1024)",
    )
    p.add_argument("--draws", type=int, default=20, help="gradient draws per replicate group (default 20)")
    p.add_argument("--groups", type=int, default=10, help="independent replicate groups (default 10)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="BP training epochs before the parameter point is fixed (fractions allowed; default 1)",
    )
    p.add_argument("--warmup-lr", type=float, default=1e-3, help="Adam learning rate of the warm-up")
    p.add_argument("--warmup-batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output JSON (a .csv and a .png are written beside it)")


def run(args: argparse.Namespace) -> int:
    from dualflow.experiments.io import check_writable, require_extra

    stem = os.path.splitext(args.out)[0]
    for path in (args.out, stem + ".csv", stem + ".png"):
        check_writable(path, option="--out")
    require_extra("plot", purpose="dualflow gradvar (plot)")
    from dualflow.experiments import gradvar as gv

    if args.threads:
        torch.set_num_threads(args.threads)
    check_methods(args.methods)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    t_start = time.perf_counter()
    data, transform = gv.load_image_task(args.dataset, args.data_dir, args.train_subset)
    build = gv.image_builder(
        args.arch, data, width=args.width, depth=args.depth, init_var_ratio=args.init_var_ratio
    )
    n = int(data.y_train.shape[0])
    log(f"{data!r}; N = {n}; {build.__doc__}")
    # warm-up by BP on normalised inputs (in memory for the warm-up only)
    x_f = torch.cat([transform(data.x_train[i : i + 4096]) for i in range(0, n, 4096)])
    t0 = time.perf_counter()
    state = gv.warmup(
        build,
        (x_f, data.y_train),
        epochs=args.warmup_epochs,
        batch_size=args.warmup_batch_size,
        lr=args.warmup_lr,
        seed=args.seed,
        device=args.device,
    )
    warm_s = time.perf_counter() - t0
    del x_f
    point = gv.point_summary(state)
    log(f"warm-up: {args.warmup_epochs} epoch(s) of BP in {warm_s:.1f}s; point: {point}")
    methods = gv.prepare_methods(build, state, args.methods, device=args.device)
    records = gv.run_gradvar(
        methods,
        (data.x_train, data.y_train),
        args.batch_sizes,
        draws=args.draws,
        groups=args.groups,
        level=args.level,
        seed=args.seed,
        transform=transform,
        device=args.device,
        log=log,
    )
    fits = gv.summarize_fits(records, args.level)
    for name, f in fits.items():
        if "slope" in f:
            log(
                f"{name:>14}: slope {f['slope']:+.3f} +- {f['slope_se']:.3f} (chi2/dof {f['chi2_dof']:.2f}); "
                f"floor share at B={max(args.batch_sizes)}: {f['floor_share']:.2f}; "
                f"V / V_{f.get('reference', '-')} = {f.get('ratio_to_reference_min_B', float('nan')):.2f} "
                f"(B min) .. {f.get('ratio_to_reference_max_B', float('nan')):.2f} (B max)"
            )
        if f.get("excess"):
            shares = ", ".join(f"B={e['batch_size']}: {e['excess_share']:+.3f}" for e in f["excess"])
            log(f"{'':>14}  excess over {f['reference']} as a share of V: {shares}")
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("out",)}
    res = {
        "results": [
            {k: r[k] for k in ("method", "batch_size", "variance", "ci_low", "ci_high", "se", "seconds")}
            | {
                "per_layer": r["per_layer"],
                "group_values": r["group_values"],
                "mean_grad_sq": r["mean_grad_sq"],
            }
            for r in records
        ],
        "fits": fits,
        "definition": "V(M,B) = (1/P) sum_p Var[g_p], g = grad wrt weight means of mean_batch J + KL/N; "
        f"{args.groups} replicate groups x {args.draws} draws; "
        f"Student-t {args.level:.0%} interval over the groups",
        "point": point | {"n_train": n, "warmup_seconds": warm_s},
        "model": build.__doc__,
        "data": {"name": data.name, "source": data.source, "lossy": data.lossy, "n_train": n},
        "config": cfg,
        "seconds": time.perf_counter() - t_start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    gv.write_csv(
        res["results"],
        stem + ".csv",
        ["method", "batch_size", "variance", "ci_low", "ci_high", "se", "seconds"],
    )
    title = f"{data.name} {args.arch}: gradient variance at a fixed point (N={n})"
    gv.plot_gradvar(records, fits, stem + ".png", title)
    log(f"wrote {args.out}, {stem}.csv, {stem}.png  ({res['seconds']:.1f}s)")
    return 0
