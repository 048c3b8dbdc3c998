"""Choose the default UCI recipe of ``bp`` / ``bp-ng`` on validation data only (issue 10, item 2).

Every candidate recipe (a set of hyperparameters of :data:`dualflow.experiments.uci.METHODS`)
is trained on the fit part of the *training* rows of the first ``--splits`` standard splits
of each set and scored by the mean log-likelihood of the held-out validation part (the same
80/20 partition, :func:`dualflow.experiments.uci.validation_split` with the split's seed, that
the runner's ``--search`` uses). Test rows are never read.

Each record (candidate, data set, split) is appended to ``--out`` (JSON lines) as soon as it
is computed; a rerun skips the records already there (resumable). The summary table gives
per set the mean validation LL of each candidate, and per candidate its *regret*: the mean
over sets of (best candidate's LL - its LL), the worst such gap, and the steps it costs.
The default recipe is the candidate with the lowest mean regret among those within the
compute budget (``--max-steps``).

Examples (what made ``results/uci/recipe_bp.md`` and ``results/uci/recipe_bp-ng.md``; the
JSON-lines files hold every record, so these reproduce the tables without training)::

    python scripts/uci_recipe.py --method bp --sets boston,concrete,energy,yacht,wine,kin8nm \
        --splits 2 --candidates old,eb-2k-lr.05,eb-2k-lr.1,eb-2k-lr.1-pc11,eb-2k-lr.1-closed,\
fixed-2k-lr.1,fixed-2ph-lr.01 --out results/uci/recipe_bp.jsonl --table results/uci/recipe_bp.md
    python scripts/uci_recipe.py --method bp-ng --sets energy,kin8nm,naval,yacht,boston --splits 1 \
        --candidates ng-lr.1,ng-lr.3,ng-lr.1-sd.3,ng-lr.1-b2.5,ng-lr.1-grad,ng-lr.1-b2.5-tr,\
ng-lr.1-b2.5-fixed,ng-lr.1-e.5,ng-lr.1-e.5-fixed --out results/uci/recipe_bp-ng.jsonl \
        --table results/uci/recipe_bp-ng.md

Records made while the layers' default hyperprior weight was 0 carry ``prior_pseudo_count: 0.0``
explicitly (the candidates say so too), so they stay valid under the current default of 11.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualflow.experiments import uci

#: candidate recipes: name -> overrides of the method's UCI defaults
CANDIDATES: dict[str, dict[str, Any]] = {
    # the pre-issue-10 defaults (first grid point of the search)
    "old": {"prior": "fixed", "lr": 0.03, "steps": 1200},
    "eb": {"prior": "empirical", "prior_pseudo_count": 0.0, "lr": 0.03, "steps": 1200},
    "eb-2ph": {"prior": "empirical", "prior_pseudo_count": 0.0, "lr": 0.03, "steps": 1600, "mean_phase": 0.5},
    "eb-elbo": {
        "prior": "empirical",
        "prior_pseudo_count": 0.0,
        "lr": 0.03,
        "steps": 1200,
        "objective": "elbo",
        "noise": "empirical",
    },
    "fixed-2k-lr.1": {"prior": "fixed", "lr": 0.1, "steps": 2000},
    "fixed-2ph-lr.01": {"prior": "fixed", "lr": 0.01, "steps": 1800, "mean_phase": 0.667},
    "eb-2k-lr.03": {"prior": "empirical", "prior_pseudo_count": 0.0, "lr": 0.03, "steps": 2000},
    "eb-2k-lr.05": {"prior": "empirical", "prior_pseudo_count": 0.0, "lr": 0.05, "steps": 2000},
    "eb-2k-lr.1": {"prior": "empirical", "prior_pseudo_count": 0.0, "lr": 0.1, "steps": 2000},
    "eb-2k-lr.1-closed": {
        "prior": "empirical",
        "prior_pseudo_count": 0.0,
        "lr": 0.1,
        "steps": 2000,
        "relu": "closed",
    },
    "eb-2k-lr.1-pc11": {"prior": "empirical", "lr": 0.1, "steps": 2000, "prior_pseudo_count": 11.0},
}


_NG = {
    "prior": "empirical",
    "prior_pseudo_count": 0.0,
    "steps": 2000,
    "positivity": "clip",
    "curvature": "ggn",
    "precision_debias": True,
    "ng_betas": (0.9, 0.1),
    "max_step_sd": 1.0,
}
#: candidate recipes of ``bp-ng`` (``--method bp-ng``)
NG_CANDIDATES: dict[str, dict[str, Any]] = {
    "ng-old": {"prior": "fixed", "ng_lr": 0.03, "ng_betas": (0.9, 0.1)},
    "ng-lr.1": {**_NG, "ng_lr": 0.1},
    "ng-lr.3": {**_NG, "ng_lr": 0.3},
    "ng-lr.1-sd.3": {**_NG, "ng_lr": 0.1, "max_step_sd": 0.3},
    "ng-lr.1-b2.5": {**_NG, "ng_lr": 0.1, "ng_betas": (0.9, 0.5)},
    "ng-lr.1-grad": {**_NG, "ng_lr": 0.1, "curvature": "gradient"},
    "ng-lr.1-b2.5-fixed": {
        **_NG,
        "ng_lr": 0.1,
        "ng_betas": (0.9, 0.5),
        "prior": "fixed",
        "prior_pseudo_count": 11.0,
    },
    "ng-lr.1-b2.5-tr": {**_NG, "ng_lr": 0.1, "ng_betas": (0.9, 0.5), "prior_pseudo_count": 11.0},
    "ng-lr.1-e.5": {**_NG, "ng_lr": 0.1, "ng_b2_epoch": 0.5, "prior_pseudo_count": 11.0},
    "ng-lr.1-e.5-fixed": {
        **_NG,
        "ng_lr": 0.1,
        "ng_b2_epoch": 0.5,
        "prior": "fixed",
        "prior_pseudo_count": 11.0,
    },
}


def run_one(method: str, hp: dict[str, Any], name: str, split: int) -> dict[str, Any]:
    ds = uci._dataset(name, None)
    xtr, ytr, _, _ = ds.split(split)  # the test rows are not used
    fit, val = uci.validation_split(len(ytr), split)
    t0 = time.perf_counter()
    try:
        r = uci.train_and_evaluate(
            method,
            hp,
            xtr[fit],
            ytr[fit],
            xtr[val],
            ytr[val],
            hidden=ds.n_hidden,
            epochs=ds.n_epochs,
            seed=split,
        )
        ll, rmse, steps = r["ll"], r["rmse"], r["epochs"] * math.ceil(len(fit) / r["batch_size"])
    except (FloatingPointError, ValueError) as err:
        ll, rmse, steps = -math.inf, math.nan, None
        print(f"  diverged: {err}")
    return {"val_ll": ll, "val_rmse": rmse, "seconds": time.perf_counter() - t0, "steps": steps}


def summarize(records: list[dict[str, Any]], names: list[str], sets: list[str]) -> str:
    """Markdown: mean validation LL per (candidate, set), regret per candidate."""
    table: dict[tuple[str, str], list[float]] = {}
    steps: dict[str, list[float]] = {}
    secs: dict[str, float] = {}
    for r in records:
        table.setdefault((r["candidate"], r["dataset"]), []).append(r["val_ll"])
        if r["steps"]:
            steps.setdefault(r["candidate"], []).append(r["steps"])
        secs[r["candidate"]] = secs.get(r["candidate"], 0.0) + r["seconds"]
    mean = {k: float(np.mean(v)) for k, v in table.items()}
    best = {d: max(mean.get((c, d), -math.inf) for c in names) for d in sets}
    lines = [
        "| candidate | " + " | ".join(sets) + " | mean regret | worst regret | steps | seconds |",
        "|---" * (len(sets) + 5) + "|",
    ]
    rows = []
    for c in names:
        if not all((c, d) in mean for d in sets):
            continue
        reg = [best[d] - mean[(c, d)] for d in sets]
        rows.append((float(np.mean(reg)), c, reg))
    for mreg, c, reg in sorted(rows):
        cells = [f"{mean[(c, d)]:.3f}" + (" **" if reg[i] == 0 else "") for i, d in enumerate(sets)]
        lines.append(
            f"| {c} | " + " | ".join(cells) + f" | {mreg:.3f} | {max(reg):.3f} | "
            f"{np.mean(steps.get(c, [0])):.0f} | {secs.get(c, 0):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="bp")
    p.add_argument("--sets", default="boston,concrete,energy,yacht,wine,kin8nm")
    p.add_argument("--splits", type=int, default=3)
    p.add_argument(
        "--candidates",
        default=None,
        help="comma-separated names of CANDIDATES (NG_CANDIDATES for bp-ng); default all",
    )
    p.add_argument("--out", default="results/uci/recipe.jsonl")
    p.add_argument("--table", default=None, help="also write the summary table (Markdown) here")
    args = p.parse_args()
    torch.set_num_threads(1)
    table = NG_CANDIDATES if args.method == "bp-ng" else CANDIDATES
    names = [c for c in (args.candidates or ",".join(table)).split(",") if c]
    unknown = [c for c in names if c not in table]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {list(table)}")
    sets = uci.expand_datasets(args.sets)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    done = {
        (r["method"], r["candidate"], r["dataset"], r["split"], json.dumps(r["hp"], sort_keys=True))
        for r in records
    }
    # every candidate is complete on top of the pre-issue-10 common settings (not the current
    # defaults, which this script chose), so its records stay valid when the defaults change
    base = (
        dict(uci._COMMON) if args.method == "bp" else {**uci._COMMON, "ng_lr": 0.03, "ng_betas": (0.9, 0.1)}
    )
    for c in names:
        hp = {**base, **table[c]}
        for d in sets:
            for s in range(args.splits):
                key = (args.method, c, d, s, json.dumps(hp, sort_keys=True))
                if key in done:
                    continue
                r = {"method": args.method, "candidate": c, "dataset": d, "split": s, "hp": hp}
                r.update(run_one(args.method, hp, d, s))
                print(
                    f"{c:<14} {d:<9} split {s}: val LL {r['val_ll']:.3f}  ({r['seconds']:.1f} s)", flush=True
                )
                records.append(r)
                with out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    mine = [
        r
        for r in records
        if r["method"] == args.method and r["candidate"] in names and r["split"] < args.splits
    ]
    text = summarize(mine, names, sets)
    print(text)
    if args.table:
        command = "python scripts/uci_recipe.py " + " ".join(sys.argv[1:])
        head = [
            f"# Recipe choice for `{args.method}` (validation data only)",
            "",
            f"Made by `{command}`. Mean validation log-likelihood over splits 0-{args.splits - 1} "
            "(fit on 80% of each split's training rows, scored on the other 20%; test rows unused); "
            "regret: best candidate's LL minus this one's, per set; ** marks the best per set.",
            "",
            text,
            "",
            f"Candidates (overrides of the pre-issue-10 common settings `{json.dumps(base)}`):",
            "",
        ]
        head += [f"* `{c}`: `{json.dumps(table[c])}`" for c in names]
        Path(args.table).write_text("\n".join(head) + "\n")


if __name__ == "__main__":
    main()
