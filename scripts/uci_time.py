"""Time estimate of a ``dualflow uci`` run from measured step times (issue 10).

For every (data set, method row) this trains the row's configuration for ``--probe`` optimizer
steps on split 0 (the real network, batch size and method; one thread) and times them, then
estimates a split as ``steps x (time per step)`` per training run times the runs of the row
(the default recipe: one run; ``--search``: one per grid candidate on 80% of the rows plus the
final one; ``ensemble`` searches with one member). All rows are timed in one process,
interleaved set by set, so that machine load hits them alike: the *ratios* between rows are
the reliable part; the absolute minutes hold for the load at the time (an idle core is faster).

Usage::

    python scripts/uci_time.py [--probe 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import dualflow as df
from dualflow.experiments import uci

#: rows of the final run: (label, method, search, forced hyperparameters)
ROWS = [
    ("bp", "bp", False, {}),
    ("bp-ng", "bp-ng", False, {}),
    ("ensemble", "ensemble", False, {}),
    ("reparam", "reparam", False, {}),
    ("bp (search)", "bp", True, {}),
    ("bp (heteroscedastic)", "bp", False, {"noise": "heteroscedastic"}),
]


def time_per_step(method: str, hp: dict, name: str, probe: int) -> float:
    ds = uci._dataset(name, None)
    xtr, ytr, _, _ = ds.split(0)
    xs, ys = uci.Standardizer.fit(xtr), uci.Standardizer.fit(ytr)
    x = uci._tensor(xs.transform(xtr))
    y = uci._tensor(ys.transform(ytr)).reshape(-1, 1)
    bs, _ = uci.schedule(len(y), ds.n_epochs, hp)
    per_epoch = math.ceil(len(y) / bs)
    epochs = max(1, round(probe / per_epoch))
    cfg = df.train.TrainConfig(
        epochs=epochs, batch_size=bs, lr=float(hp["lr"]), kl_weight=1.0 / len(y), progress=False
    )
    m = uci.create_method(method, x.shape[1], ds.n_hidden, hp)
    t0 = time.perf_counter()
    m.fit(x, y, cfg)
    return (time.perf_counter() - t0) / (epochs * per_epoch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=int, default=100)
    p.add_argument("--workers", type=int, default=2, help="parallel jobs of the real run")
    args = p.parse_args()
    torch.set_num_threads(1)
    time_per_step("bp", uci.METHODS["bp"].defaults, "yacht", args.probe)  # warm-up: first-call costs
    total = {label: 0.0 for label, *_ in ROWS}
    print("| data | " + " | ".join(f"{label} s/split" for label, *_ in ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    for name in uci.TABLE2:
        ds = uci._dataset(name, None)
        cells = []
        for label, method, search, forced in ROWS:
            proto = uci.METHODS[method]
            hp = {**proto.defaults, **forced}
            cands = uci._candidates(proto, forced) if search else [hp]
            sec = 0.0
            for i, c in enumerate(cands if search else [hp]):
                step = time_per_step(method, {**c, **(proto.selection if search else {})}, name, args.probe)
                bs, ep = uci.schedule(ds.train_idx.shape[1], ds.n_epochs, c)
                steps = ep * math.ceil(ds.train_idx.shape[1] / bs)
                # search: every candidate on 80% of the rows, then the chosen one on all of them
                sec += steps * step * ((1 - uci.VALIDATION_FRACTION) if search else 1.0)
                if search and i == 0:
                    sec += steps * time_per_step(method, c, name, args.probe)
            cells.append(sec)
            total[label] += sec * ds.n_splits
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)
    print()
    for label, sec in total.items():
        print(
            f"{label}: {sec / 60:.1f} min on one core, "
            f"{sec / 60 / args.workers:.1f} min on {args.workers} workers"
        )
    print(f"all rows: {sum(total.values()) / 60 / args.workers:.1f} min on {args.workers} workers")


if __name__ == "__main__":
    main()
