"""``dualflow convergence``: training and validation loss per epoch of BP and the
weight-sampling methods from the same initialisation (Figure 1 b, d).

For every seed the Bayesian network is initialised once; every Bayesian method starts from
that state and ``vanilla`` from its weight means. All methods use the same optimizer,
learning rate, schedule, batch size and data order. The validation set is the *last*
``--val-size`` examples of the (optionally ``--train-subset``-limited) training set. Writes
``convergence.json`` (records and configuration), ``convergence.csv`` and
``convergence.png`` (mean over seeds with a min-max band) into ``--out-dir``; see
:func:`dualflow.experiments.gradvar.run_convergence` for what each column means.

Example (the MNIST run of ``results/figure1``)::

    dualflow convergence --dataset mnist --arch mlp --width 400 --depth 2 --epochs 10 \\
        --seeds 0,1,2 --out-dir results/figure1/mnist
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from dualflow.experiments.commands.gradvar import _ints, add_common, check_methods

HELP = "train/validation loss per epoch of BP vs reparam, local-reparam, flipout, vanilla (Figure 1 b/d)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, the same for every method")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--val-size", type=int, default=10000, help="held-out last examples of the training set")
    p.add_argument(
        "--eval-samples", type=int, default=8, help="weight samples of the sampling methods' predictive"
    )
    p.add_argument(
        "--train-eval", type=int, default=5000, help="training examples for the end-of-epoch train NLL"
    )
    p.add_argument(
        "--kl-n",
        type=int,
        default=None,
        help="N of the KL / N term (default: the number of training examples; e.g. 50000 in a "
        "subset run of CIFAR-10 keeps the full data set's balance of data term and KL)",
    )
    p.add_argument("--out-dir", required=True)
    p.add_argument(
        "--plot-only",
        action="store_true",
        help="train nothing: redraw convergence.png and convergence.csv from --out-dir/convergence.json",
    )


def run(args: argparse.Namespace) -> int:
    from dualflow.experiments.io import check_writable, require_extra

    check_writable(args.out_dir, "dir", option="--out-dir")
    for name in ("convergence.json", "convergence.csv", "convergence.png"):
        if not (args.plot_only and name.endswith(".json")):
            check_writable(os.path.join(args.out_dir, name), option="--out-dir")
    require_extra("plot", purpose="dualflow convergence (plot)")
    from dualflow.experiments import gradvar as gv

    if args.threads:
        torch.set_num_threads(args.threads)
    check_methods(args.methods)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.plot_only:
        path = os.path.join(args.out_dir, "convergence.json")
        with open(path) as f:
            res = json.load(f)
        _write_outputs(gv, res, args.out_dir)
        log(f"redrew convergence.png and convergence.csv in {args.out_dir} from {path}")
        return 0
    t_start = time.perf_counter()
    data, transform = gv.load_image_task(args.dataset, args.data_dir, args.train_subset)
    rest, (x_val, y_val) = data.split_validation(args.val_size)
    build = gv.image_builder(
        args.arch, data, width=args.width, depth=args.depth, init_var_ratio=args.init_var_ratio
    )
    n = int(rest.y_train.shape[0])
    log(f"{data!r}; train {n}, validation {int(y_val.shape[0])}; {build.__doc__}")
    records = gv.run_convergence(
        build,
        (rest.x_train, rest.y_train),
        (x_val, y_val),
        args.methods,
        args.seeds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        eval_samples=args.eval_samples,
        train_eval=args.train_eval,
        transform=transform,
        kl_n=args.kl_n,
        device=args.device,
        log=log,
    )
    cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    res = {
        "records": records,
        "model": build.__doc__,
        "data": {
            "name": data.name,
            "source": data.source,
            "lossy": data.lossy,
            "n_train": n,
            "n_val": int(y_val.shape[0]),
            "kl_n": args.kl_n or n,
        },
        "config": cfg,
        "seconds": time.perf_counter() - t_start,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "convergence.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    _write_outputs(gv, res, args.out_dir)
    log(f"wrote {path}, convergence.csv, convergence.png in {args.out_dir} ({res['seconds']:.1f}s)")
    return 0


def _write_outputs(gv: Any, res: dict[str, Any], out_dir: str) -> None:
    """convergence.csv and convergence.png from a results dict (as stored in convergence.json)."""
    records, cfg, d = res["records"], res["config"], res["data"]
    cols = [
        "method",
        "seed",
        "epoch",
        "train_data_term",
        "train_objective",
        "kl",
        "train_nll",
        "val_nll",
        "train_accuracy",
        "val_accuracy",
        "seconds",
    ]
    gv.write_csv(records, os.path.join(out_dir, "convergence.csv"), cols)
    title = (
        f"{d['name']} {cfg['arch']}: {d['n_train']} train / {d['n_val']} validation, "
        f"{cfg['optimizer']} lr={cfg['lr']}, batch {cfg['batch_size']}, KL/{d.get('kl_n', d['n_train'])} "
        "(mean and min-max over seeds)"
    )
    gv.plot_convergence(records, os.path.join(out_dir, "convergence.png"), title)
