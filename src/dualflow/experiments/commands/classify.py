"""``dualflow classify``: train and evaluate an image classifier (the paper's Table 1).

Examples::

    dualflow classify --dataset mnist --arch mlp --method bp --epochs 5 --out runs/classify/mnist-bp.json
    dualflow classify --dataset cifar10 --arch resnet20 --method bp-ng --epochs 200 \\
        --augment crop-flip,mixup,cutmix --workdir runs/c10-r20-bpng --resume --out results/c10-r20-bpng.json
    torchrun --standalone --nproc_per_node=4 -m dualflow.experiments classify --dataset cifar10 ...

The JSON record (``--out``) holds ``dataset``, ``arch``, ``method``, ``test_error`` (a
fraction), ``test_nll``, ``test_ece`` (15 bins), ``test_brier``, ``epochs``, ``seconds``, the
resolved settings and the per-epoch log; the learning curves go to the same path with the
suffix ``.png``. See :mod:`dualflow.experiments.classify` for the configurations, the
objective, mixed precision and distributed training.
"""

from __future__ import annotations

import argparse
import os
import shlex

from dualflow.experiments.cli import parse_key_values

HELP = "image classification (Table 1): train, evaluate error/NLL/ECE/Brier, checkpoints, DDP"

_DATASETS = ("mnist", "cifar10", "cifar100")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="mnist, cifar10 or cifar100")
    p.add_argument(
        "--arch", required=True, help="architecture from dualflow.models.list_models() (e.g. mlp, resnet20)"
    )
    p.add_argument(
        "--method",
        required=True,
        help="learning method from dualflow.methods "
        "(Table 1: vanilla, reparam, reparam-ng-ensemble, bp, bp-ng)",
    )
    p.add_argument("--epochs", type=int, required=True, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch per process (default 128)")
    p.add_argument(
        "--optimizer",
        choices=("auto", "sgd", "adam"),
        default="auto",
        help="sgd (Nesterov momentum) or adam; auto: sgd for point networks, adam for Bayesian ones "
        "(bp-ng / reparam-ng-ensemble: natural gradient, Adam for point parameters)",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 0.1 sgd, 1e-3 adam); cosine-annealed"
    )
    p.add_argument(
        "--weight-decay", type=float, default=None, help="on point parameters only (default 5e-4 sgd, 0 adam)"
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument(
        "--normalization",
        choices=("auto", "none", "batch"),
        default="auto",
        help="auto: Table 1 (vanilla, reparam: batch; reparam-ng-ensemble, bp, bp-ng: none)",
    )
    p.add_argument(
        "--augment",
        default="auto",
        help="none, auto (crop-flip for CIFAR, none for MNIST) or a comma-separated subset of "
        "crop-flip, mixup, cutmix, randaugment",
    )
    p.add_argument("--mixup-alpha", type=float, default=0.2, help="Beta parameter of mixup (default 0.2)")
    p.add_argument("--cutmix-alpha", type=float, default=1.0, help="Beta parameter of cutmix (default 1.0)")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N training images")
    p.add_argument("--val", type=int, default=0, help="hold out the last N (of --limit-train) for validation")
    p.add_argument("--data-dir", default=None, help="data root (default: $DUALFLOW_DATA, then the cache)")
    p.add_argument("--workdir", default=None, help="folder for checkpoint.pt (default: no checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from --workdir/checkpoint.pt if present")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available"
    )
    p.add_argument(
        "--amp", action="store_true", help="bf16 autocast of matmuls/convolutions (moment rules stay fp32)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kl-weight",
        type=float,
        default=None,
        help="factor of Eq. 2's KL/N (default: dualflow.experiments.classify.DEFAULT_KL_WEIGHT; "
        "1 is the paper's objective, other values temper it)",
    )
    p.add_argument(
        "--prior-var", type=float, default=None, help="prior variance of every weight (default gain^2/fan_in)"
    )
    p.add_argument("--init-var-ratio", type=float, default=0.01, help="initial share of weight variance")
    p.add_argument(
        "--samples", type=int, default=16, help="forward passes of sampled predictives at evaluation"
    )
    p.add_argument("--train-samples", type=int, default=None, help="passes per batch of the sampling methods")
    p.add_argument(
        "--ng-lr", type=float, default=None, help="step size of the natural-gradient methods (0.1)"
    )
    p.add_argument(
        "--arch-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture option (JSON value), e.g. --arch-opt widths=[8,16,32]; repeatable",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="JSON file of the result (learning curves beside it, .png)")
    p.add_argument("--quiet", action="store_true", help="print only the final line")


def _command(args: argparse.Namespace) -> str:
    """The command line reproducing this run: the required options and every changed default."""
    ref = argparse.ArgumentParser()
    add_arguments(ref)
    required = ("dataset", "arch", "method", "epochs", "out")
    defaults = vars(
        ref.parse_args(["--dataset", "x", "--arch", "x", "--method", "x", "--epochs", "1", "--out", "x"])
    )
    parts = ["dualflow", "classify"]
    for action in ref._actions:
        dest = action.dest
        if dest in ("help",) or dest not in defaults or action.help == argparse.SUPPRESS:
            continue
        value = getattr(args, dest, None)
        if dest not in required and value == defaults[dest]:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        elif isinstance(value, list):
            for v in value:
                parts += [flag, str(v)]
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dualflow.experiments.io import check_writable, require_extra

    if args.resume and args.workdir is None:
        raise ValueError("--resume needs --workdir (the folder holding checkpoint.pt)")
    check_writable(args.out, option="--out")
    check_writable(Path(args.out).with_suffix(".png"), option="--out (learning-curve plot)")
    check_writable(args.workdir, "dir", option="--workdir")
    require_extra("plot", purpose="dualflow classify (learning-curve plot)")
    if "randaugment" in args.augment:
        require_extra("augment", purpose="--augment randaugment")

    from dualflow.experiments import classify
    from dualflow.experiments import distributed as ddist

    kw = {
        "dataset": args.dataset,
        "arch": args.arch,
        "method": args.method,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "momentum": args.momentum,
        "normalization": args.normalization,
        "augment": args.augment,
        "mixup_alpha": args.mixup_alpha,
        "cutmix_alpha": args.cutmix_alpha,
        "limit_train": args.limit_train,
        "val": args.val,
        "data_dir": args.data_dir,
        "device": args.device,
        "amp": args.amp,
        "seed": args.seed,
        "prior_var": args.prior_var,
        "init_var_ratio": args.init_var_ratio,
        "samples": args.samples,
        "train_samples": args.train_samples,
        "ng_lr": args.ng_lr,
        "arch_options": parse_key_values(args.arch_opt, "--arch-opt"),
        "checkpoint_every": args.checkpoint_every,
        "eval_batch_size": args.eval_batch_size,
        "threads": args.threads,
        "stop_after_steps": args.stop_after_steps,
    }
    if args.kl_weight is not None:
        kw["kl_weight"] = args.kl_weight
    cfg = classify.ClassifyConfig(**kw)
    cfg.validate()  # name errors before any data is read
    command = _command(args)
    try:
        rec = classify.train_and_evaluate(
            cfg,
            args.workdir,
            out=args.out,
            resume=args.resume,
            log=None if args.quiet else (lambda m: print(m, flush=True)),
            command=command,
        )
        if int(os.environ.get("RANK", "0") or 0) != 0:
            pass  # rank 0 reports
        elif rec.get("interrupted"):
            print(f"stopped after {rec['global_step']} steps; checkpoint {rec['checkpoint']}")
        else:
            print(
                f"{rec['dataset_label']} {rec['arch']} {rec['method']}: test error {rec['test_error']:.4f} "
                f"nll {rec['test_nll']:.4f} ece {rec['test_ece']:.4f} brier {rec['test_brier']:.4f} "
                f"({rec['seconds']:.0f}s) -> {args.out}"
            )
    finally:
        ddist.cleanup()
    return 0


# ---------------------------------------------------------------------------- report hook

REPORT_HELP = "classification table (ours vs the paper's Table 1) from `dualflow classify` records"


def report_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dualflow report classify``."""
    p.add_argument("--results", nargs="+", required=True, help="JSON record files or folders of them")
    p.add_argument("--out", default="results/classify/README.md", help="Markdown file to write")
    p.add_argument("--notes", default=None, help="Markdown appended (default: notes.md beside --out)")


def report_run(args: argparse.Namespace) -> int:
    """``dualflow report classify``: :func:`dualflow.experiments.classify.report_classify`."""
    from pathlib import Path

    from dualflow.experiments.io import check_writable

    check_writable(args.out, option="--out")
    from dualflow.experiments.classify import report_classify

    notes = None
    if args.notes:
        if not Path(args.notes).is_file():
            raise FileNotFoundError(f"notes file not found: {args.notes}")
        notes = Path(args.notes).read_text()
    report_classify(args.results, args.out, notes)
    print(f"wrote {args.out}")
    return 0


#: ``(help, add_arguments, run)`` for ``dualflow report``'s registry:
#: ``"classify": Report(*REPORT)``.
REPORT = (REPORT_HELP, report_arguments, report_run)
