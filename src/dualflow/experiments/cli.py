"""The ``dualflow`` command.

Sub-commands are listed in :data:`COMMANDS` (an explicit registry: name -> module).
Modules are imported lazily so ``dualflow --help`` stays fast and one broken experiment
cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

# name -> (module under dualflow.experiments.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "quickstart",
        "train a small BNN by BP on a built-in real data set (no download)",
    ),
    "uci": ("uci", "UCI regression benchmark (Table 2): test RMSE and log-likelihood over the splits"),
    "report": ("report", "tables and plots from result records: `dualflow report uci`"),
    "duality": ("duality", "check smoothing-by-backprop identities (Kalman, HMM, networks)"),
    "gradvar": ("gradvar", "gradient variance vs batch size: BP vs reparam/local/flipout (Figure 1 a/c)"),
    "convergence": ("convergence", "train/validation loss per epoch: BP vs sampling methods (Figure 1 b/d)"),
    "classify": ("classify", "image classification (Table 1): error/NLL/ECE/Brier, resume, AMP, DDP"),
}


def parse_key_values(items: list[str], option: str) -> dict[str, Any]:
    """``["k=v", ...] -> {k: v}`` for options such as ``--set`` / ``--arch-opt``; values are
    parsed as JSON where they are JSON (numbers, lists, booleans), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{option} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualflow",
        description="Sampling-free Bayesian deep learning by moment propagation.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        module = importlib.import_module(f"dualflow.experiments.commands.{module_name}")
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from dualflow import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"dualflow.experiments.commands.{args._module}")
    from dualflow.experiments.io import MissingExtraError

    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, MissingExtraError) as err:  # user errors: one line, no traceback
        print(f"dualflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dualflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
