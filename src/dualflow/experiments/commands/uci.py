"""``dualflow uci``: the UCI regression benchmark of the paper's Table 2.

Examples::

    dualflow uci                                  # bp's default recipe on all nine sets
    dualflow uci --dataset yacht --method bp --splits 1 --out runs/uci/yacht.json
    dualflow uci --dataset all --method bp,bp-ng,ensemble,reparam --workers 2 --out results/uci/uci.json
    dualflow uci --method bp --search             # the per-split validation search (rows "bp (search)")
    dualflow uci --method bp --set noise=heteroscedastic   # rows "bp (heteroscedastic)"
    dualflow uci --download --dataset all        # fetch the original files (network access)

Data: ``--data-dir`` / ``$DUALFLOW_DATA`` holding ``uci/<folder>/`` in the standard layout
(see :mod:`dualflow.experiments.data.uci`). Every record (one per data set, split and
method) goes to ``--out`` as soon as it is computed; ``--resume`` skips those already there.

Without ``--search`` every method runs its default recipe (no hyperparameter search; for
``bp`` and ``bp-ng`` chosen once on validation data, ``scripts/uci_recipe.py``); with
``--search`` each split chooses among the method's grid on a validation part of its training
rows. ``--list`` prints both.
"""

from __future__ import annotations

import argparse
import shlex
import time

from dualflow.experiments.cli import parse_key_values

HELP = "UCI regression benchmark (Table 2): RMSE and test log-likelihood over the standard splits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="all",
        help="data set name(s), comma-separated: boston, concrete, energy, kin8nm, naval, power, "
        "protein, wine, yacht, any folder of the standard layout under the data dir, or 'all' "
        "(the nine of Table 2; default)",
    )
    p.add_argument(
        "--method", default="bp", help="method(s), comma-separated, from dualflow.methods (default: bp)"
    )
    p.add_argument("--splits", type=int, default=None, help="use the first K splits (default: all)")
    p.add_argument("--out", default="runs/uci/records.json", help="JSON file of the records")
    p.add_argument(
        "--data-dir", default=None, help="data root (default: $DUALFLOW_DATA, else ../shared/data)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes running jobs in parallel (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed; split i uses seed*1000+i")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override the protocol's epoch count (for quick checks; recorded in each record)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="override the optimizer steps per training run (quick checks)"
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="choose each method's hyperparameters per split on a validation part of the training "
        "rows (the method's search grid, see --list; rows labelled 'search'); default: the "
        "default recipe, no search",
    )
    p.add_argument("--no-select", action="store_true", help=argparse.SUPPRESS)  # the old default; a no-op
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="force a hyperparameter for every method (JSON value), e.g. --set lr=0.01; repeatable",
    )
    p.add_argument("--resume", action="store_true", help="skip (data set, method, split) already in --out")
    p.add_argument("--download", action="store_true", help="download the data set(s) into the cache and exit")
    p.add_argument("--list", action="store_true", help="list the methods and their hyperparameter grids")
    p.add_argument("--quiet", action="store_true", help="print only the summary")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (its non-default options)."""
    parts = ["dualflow", "uci", "--dataset", args.dataset, "--method", args.method]
    for flag, value in (
        ("--splits", args.splits),
        ("--epochs", args.epochs),
        ("--steps", args.steps),
        ("--workers", args.workers if args.workers != 1 else None),
        ("--threads", args.threads if args.threads != 1 else None),
        ("--seed", args.seed if args.seed != 0 else None),
        ("--out", args.out),
    ):
        if value is not None:
            parts += [flag, str(value)]
    for item in args.set:
        parts += ["--set", item]
    if args.search:
        parts.append("--search")
    return " ".join(shlex.quote(p) for p in parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from dualflow.experiments import uci
    from dualflow.experiments.data.uci import default_cache_dir, download_uci
    from dualflow.experiments.io import check_writable

    torch.set_num_threads(max(1, args.threads))
    datasets = uci.expand_datasets(args.dataset)
    if args.list:
        for name, proto in uci.METHODS.items():
            print(f"{name}:\n  default recipe: {proto.defaults}\n  --search grid: {list(proto.grid)}")
        return 0
    if args.download:
        root = args.data_dir or default_cache_dir()
        check_writable(root, "dir", option="--data-dir" if args.data_dir else "the download cache")
        for name in datasets:
            print(f"{name}: {download_uci(name, root)}")
        print(f"data root: {root} (pass --data-dir {root} or set DUALFLOW_DATA)")
        return 0
    check_writable(args.out, option="--out")  # before any job: the first one would be lost
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise ValueError("no method given")
    for m in methods:
        if m not in uci.METHODS:
            raise ValueError(f"unknown method {m!r}; known: {', '.join(uci.available_methods())}")
    if args.splits is not None and args.splits < 1:
        raise ValueError(f"--splits must be >= 1, got {args.splits}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    overrides = parse_key_values(args.set, "--set")
    if args.steps is not None:
        overrides["steps"] = args.steps
    options = uci.RunOptions(
        data_dir=args.data_dir,
        seed=args.seed,
        epochs=args.epochs,
        select=bool(args.search),
        overrides=overrides,
        threads=args.threads,
    )
    command = _command(args)
    meta = {
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": uci.protocol_summary(),
    }
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    records = uci.run_benchmark(
        datasets,
        methods,
        options,
        splits=args.splits,
        workers=args.workers,
        out=args.out,
        resume=args.resume,
        log=log,
        meta=meta,
    )
    summary = uci.summarize(records)
    print(f"{'data set':<10}{'method':<21}{'splits':>7}{'RMSE':>18}{'test LL':>18}{'seconds':>9}")
    for (ds, m), row in sorted(summary.items()):
        print(
            f"{ds:<10}{m:<21}{int(row['n']):>7}{row['rmse']:>11.4g} ± {row['rmse_se']:<5.2g}"
            f"{row['ll']:>11.3f} ± {row['ll_se']:<5.2g}{row['seconds']:>9.0f}"
        )
    print(f"records: {args.out}")
    return 0
