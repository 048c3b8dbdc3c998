"""Overhead of the one training loop (``Method.fit`` -> ``dualflow.train.fit``) over a minimal
hand-written loop doing the same work, on a UCI-sized problem.

Both train the same method (``bp``, a 1x50 ReLU network with Gaussian weights and a learned
noise variance, from the same initialisation) on the same data (400 rows, 8 features, full
batch) with the same recipe: fused Adam (:func:`dualflow.train.make_optimizer`), a cosine
learning rate stepped per batch, objective ``mean J + KL / N``. The hand-written loop::

    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = m.loss(m.training_outputs(x), y) + m.kl() / n
        loss.backward()
        opt.step()
        sched.step()

``fit`` additionally keeps the running sums of the epoch record (a full batch needs no
shuffle), checks for NaN, scopes the RNG/thread/flush-denormal modes, runs the callbacks'
hooks and builds the history. Both run in one process on one thread, interleaved (fit, hand,
hand, fit, ...), each timed over ``--steps`` optimizer steps (one call of each, setup
included) in CPU time of the thread (``time.thread_time``: on a busy shared machine the time
spent descheduled would otherwise dominate the noise); the figure is the median of the
per-pair ratios ``fit time / hand time``, with its interquartile range, and beside it the
ratio of the fastest runs (the least disturbed ones); the 1-minute load average before and
after says how busy the machine was.

Usage::

    python benchmarks/bench_fit.py [--steps 300] [--repeats 21]

writes ``benchmarks/results/fit_overhead.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import dualflow as df
import dualflow.methods as dm

RESULTS = Path(__file__).resolve().parent / "results"
N, D, HIDDEN = 400, 8, 50


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(D, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(N, 1, generator=g)
    return x, y


def make_method() -> dm.Method:
    torch.manual_seed(0)
    m = dm.create("bp", dm.mlp_builder(D, HIDDEN, 1), noise_var=0.5)
    df.nn.set_checks(m, False)  # as the UCI runner builds its networks
    return m


def config(steps: int) -> df.train.TrainConfig:
    return df.train.TrainConfig(epochs=steps, batch_size=N, lr=1e-2, progress=False, threads=1)


# CPU time of this thread (torch runs its one intra-op thread on the caller's): time the
# process spends descheduled on a busy machine does not count, so the ratio is far less noisy
# than wall-clock time there (both are reported)
clock = time.thread_time


def run_fit(x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    m = make_method()
    t0 = clock()
    m.fit((x, y), config(steps))
    return clock() - t0


def run_hand(x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    m = make_method()
    cfg = config(steps)
    t0 = clock()
    params = list(m.parameters())
    opt = df.train.make_optimizer(params, cfg, model=m)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    m.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = m.loss(m.training_outputs(x), y) + m.kl() / N
        loss.backward()
        opt.step()
        sched.step()
    return clock() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per timed call")
    ap.add_argument("--repeats", type=int, default=21, help="interleaved (fit, hand) pairs")
    ap.add_argument("--out", default=str(RESULTS / "fit_overhead.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = problem()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with df.train.flush_denormal(True):  # fit flushes subnormals; give the hand loop the same
        run_fit(x, y, 20), run_hand(x, y, 20)  # warm-up
        pairs = []
        for i in range(args.repeats):  # alternate which runs first, so drift hits both alike
            if i % 2:
                h = run_hand(x, y, args.steps)
                pairs.append((run_fit(x, y, args.steps), h))
            else:
                pairs.append((run_fit(x, y, args.steps), run_hand(x, y, args.steps)))
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ratios = sorted(f / h for f, h in pairs)
    ratio_min = min(f for f, _ in pairs) / min(h for _, h in pairs)
    q = statistics.quantiles(ratios, n=4)
    med = statistics.median(ratios)
    fit_ms = 1e3 * statistics.median(f for f, _ in pairs) / args.steps
    hand_ms = 1e3 * statistics.median(h for _, h in pairs) / args.steps
    res = {
        "ratio_median": med,
        "ratio_q1": q[0],
        "ratio_q3": q[2],
        "ratio_of_minima": ratio_min,
        "load_average": [load0, load1],
        "cpus": os.cpu_count(),
        "fit_ms_per_step": fit_ms,
        "hand_ms_per_step": hand_ms,
        "steps": args.steps,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "torch": torch.__version__,
    }
    cmd = f"python benchmarks/bench_fit.py --steps {args.steps} --repeats {args.repeats}"
    md = [
        "# Overhead of the training loop (`Method.fit`) over a hand-written loop",
        "",
        f"UCI-sized problem: `bp`, {D}-{HIDDEN}-1 ReLU network, {N} rows, full batch, fused Adam, cosine LR, "
        "objective `mean J + KL/N`; 1 thread; both loops in one process, interleaved, "
        f"{args.repeats} pairs of {args.steps} steps each, CPU time of the thread "
        "(see the script's docstring for what each loop does).",
        "",
        "| fit ms/step (CPU) | hand-written ms/step (CPU) | fit / hand (median) | interquartile range "
        "| ratio of the fastest runs | target |",
        "|---|---|---|---|---|---|",
        f"| {fit_ms:.3f} | {hand_ms:.3f} | {med:.3f} | {q[0]:.3f} - {q[2]:.3f} | {ratio_min:.3f} | <= 1.03 |",
        "",
        f"Overhead: {100 * (med - 1):+.1f}% (median of the per-pair ratios), {100 * (ratio_min - 1):+.1f}% "
        f"(fastest runs). Machine: {os.cpu_count()} CPUs, load average {load0:.1f} before and {load1:.1f} "
        "after the run (other jobs share it; the spread of the ratios comes from them).",
        "",
        f"Command: `{cmd}` (torch {torch.__version__}, {res['machine']}).",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
