"""``dualflow joint``: the joint (observation, label) distribution trained networks have learned,
sampled by NUTS (the paper's Figures 2-4; :mod:`dualflow.joint`, needs ``dualflow[hmc]``).

One sub-command per figure; each writes ``<out-dir>/<figure>.png`` and ``.json`` (chains'
summary, split R-hat and ESS per dimension, settings, seeds, versions, the command)::

    dualflow joint boston             # Figure 2: Boston housing, bp vs two vanilla nets vs ensemble
    dualflow joint mixture            # Figure 3: density of x a BNN induces on a 2-D mixture
    dualflow joint images             # Figure 4: MNIST, small DenseNet-BC, x | y by NUTS
    dualflow joint images --dataset cifar10 --arch densenet_bc_100_12 --train-subset 0 \\
        --epochs 100 --device cuda    # the paper's DenseNet-BC on CIFAR-10 (GPU)

Trained networks and finished chains are cached in ``--workdir`` (default ``runs/joint``): a
rerun with the same settings loads them (resume after an interruption).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

HELP = "joint (observation, label) distribution of trained networks by NUTS (Figures 2-4)"

FIGURE_HELP = {
    "boston": "Figure 2: Boston housing; BNN (bp) vs two point networks vs a deep ensemble",
    "mixture": "Figure 3: density of x induced by a 3-hidden-layer BNN classifying a 2-D Gaussian mixture",
    "images": "Figure 4: images x | y sampled on the input of a Bayesian DenseNet (MNIST by default)",
}


#: output stem (``<stem>.png`` / ``.json``) per figure; images: ``fig4_<dataset>``
_DEFAULT_STEMS = {"boston": "fig2_boston", "mixture": "fig3_mixture", "images": "fig4"}


def _energies(s: str) -> tuple[str, ...]:
    from dualflow.joint import ENERGIES

    out = tuple(v.strip() for v in s.split(",") if v.strip())
    bad = [v for v in out if v not in ENERGIES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"energies must be from {list(ENERGIES)}, got {s!r}")
    return out


def _common(p: argparse.ArgumentParser, energies: str) -> None:
    p.add_argument(
        "--out-dir", default="results/figures", help="where the PNG and JSON go (default results/figures)"
    )
    p.add_argument(
        "--workdir",
        default="runs/joint",
        help="cache of trained networks and finished chains, for resuming (default runs/joint; '' for none)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed of training and chains (default 0)")
    p.add_argument("--chains", type=int, default=4, help="chains per chain set (>= 4; default 4)")
    p.add_argument(
        "--warmup", type=int, default=None, help="adaptation steps per chain (default: per figure)"
    )
    p.add_argument("--samples", type=int, default=None, help="kept draws per chain (default: per figure)")
    p.add_argument(
        "--energies",
        type=_energies,
        default=_energies(energies),
        help="comma-separated: predictive (J = -log p(y|x)), expected (J = E_q -log p(y|x,W)); "
        f"default {energies}",
    )
    p.add_argument("--data-dir", default=None, help="data root (default $DUALFLOW_DATA, else ../shared/data)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--progress", action="store_true", help="show Pyro's progress bars")
    p.add_argument("--quiet", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    for name, text in FIGURE_HELP.items():
        q = sub.add_parser(name, help=text, description=text)
        _common(q, "predictive" if name == "images" else "predictive,expected")
        if name == "images":
            q.add_argument("--dataset", default="mnist", help="mnist | cifar10 (default mnist)")
            q.add_argument(
                "--arch", default="densenet_bc", help="model of dualflow.models (default densenet_bc)"
            )
            q.add_argument(
                "--arch-opt",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="architecture option (default for densenet_bc: depth=10 growth_rate=12; "
                "none for other architectures)",
            )
            q.add_argument(
                "--train-subset",
                type=int,
                default=None,
                help="first N training images (0: all; default 20000)",
            )
            q.add_argument("--epochs", type=int, default=None, help="training epochs (default 3)")
            q.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
            q.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-3)")
            q.add_argument("--classes", default=None, help="comma-separated labels to sample (default all)")
            q.add_argument(
                "--workers",
                type=int,
                default=None,
                help="processes (one thread each) running the chain sets; needs --workdir (default 1)",
            )


def run(args: argparse.Namespace) -> int:
    from dualflow.experiments.io import check_writable, require_extra

    # outputs and extras first: before any data is read or any network trained
    stem = f"fig4_{args.dataset}" if args.figure == "images" else None
    check_writable(args.out_dir, "dir", option="--out-dir")
    for suffix in (".png", ".json"):
        name = (stem or _DEFAULT_STEMS[args.figure]) + suffix
        check_writable(os.path.join(args.out_dir, name), option="--out-dir")
    check_writable(args.workdir or None, "dir", option="--workdir")
    require_extra("hmc", purpose="dualflow joint (NUTS)")
    require_extra("plot", purpose="dualflow joint (figures)")

    from dualflow.experiments import joint as ej
    from dualflow.experiments.cli import parse_key_values
    from dualflow.joint import MIN_CHAINS, MIN_SAMPLES

    torch.set_num_threads(max(1, args.threads))
    if args.chains < MIN_CHAINS:
        raise ValueError(f"--chains must be >= {MIN_CHAINS} (split R-hat across chains), got {args.chains}")
    if args.samples is not None and args.samples < MIN_SAMPLES:
        raise ValueError(f"--samples must be >= {MIN_SAMPLES} per chain (split R-hat), got {args.samples}")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if args.figure == "images" and len(args.energies) != 1:
        raise ValueError(f"images: give one energy (--energies predictive or expected), got {args.energies}")
    workers = getattr(args, "workers", None)
    if workers is not None and (workers < 1 or (workers > 1 and not args.workdir)):
        raise ValueError(
            f"--workers must be >= 1 and > 1 needs a --workdir (the chains' hand-over), got {workers}"
        )
    extra: dict = {}
    if args.figure == "images":
        if args.dataset not in ("mnist", "cifar10"):
            raise ValueError(f"--dataset must be mnist or cifar10, got {args.dataset!r}")
        extra["dataset"] = args.dataset
        extra["arch"] = args.arch
        opts = parse_key_values(args.arch_opt, "--arch-opt")
        if args.arch != ej.IMAGES_RECIPE["arch"] or opts:
            extra["arch_options"] = opts
        for k in ("train_subset", "epochs", "batch_size", "lr", "workers"):
            v = getattr(args, k)
            if v is not None:
                extra[k] = v if not (k == "train_subset" and v == 0) else None
        if args.classes:
            extra["classes"] = [int(c) for c in args.classes.split(",") if c.strip()]
    options = ej.JointOptions(
        out_dir=args.out_dir,
        workdir=args.workdir or None,
        seed=args.seed,
        chains=args.chains,
        warmup=args.warmup,
        samples=args.samples,
        energies=args.energies,
        device=args.device,
        data_dir=args.data_dir,
        progress=args.progress,
        extra=extra,
    )
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    runner, default_stem = ej.FIGURES[args.figure]
    t0, c0 = time.perf_counter(), time.process_time()
    record = runner(options, log)
    argv = sys.argv[1:]
    record["command"] = "dualflow " + shlex.join(argv) if argv[:2] == ["joint", args.figure] else None
    record["options"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    record["threads"] = torch.get_num_threads()
    record["versions"] = ej.versions()
    record["seed"] = args.seed
    record["wall_seconds"] = time.perf_counter() - t0
    # CPU time of this process: on a shared machine the wall time overstates the cost
    record["cpu_seconds"] = time.process_time() - c0 + sum(record.get("worker_cpu_seconds", []))
    path = os.path.join(args.out_dir, f"{stem or default_stem}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=float)
    bad = [k for k, v in record["chain_sets"].items() if not v["converged"]]
    log(
        f"wrote {record['png']} and {path} ({record['wall_seconds']:.0f}s wall, "
        f"{record['cpu_seconds']:.0f}s CPU, {record['threads']} thread(s))"
    )
    if bad:
        log(f"WARNING: split R-hat > 1.05 in {len(bad)} chain set(s): {', '.join(bad)} (see the record)")
    return 0
