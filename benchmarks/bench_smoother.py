"""Time smoothing by backprop against the explicit smoothers (CPU).

Kalman: ``kalman_smoother_by_backprop`` vs ``rts_smoother`` (both include their filter pass;
the filter alone is timed too), with both reverse-mode routes: ``vjp="closed_form"`` (the
default; the filter step's VJP written out) and ``vjp="autograd"`` (torch records and
replays every op of the filter; skipped where its graph would not fit the time or memory
budget). HMM: ``hmm_smoother_by_backprop`` vs
``hmm_forward_backward``. Batched models (every batch element has its own parameters, so
both routes do the same covariance work), float64, median wall time of repeats, one
process. Every timed pair is also checked for agreement (max |diff| is reported).

Usage (the committed results were produced by the command printed in them)::

    .venv/bin/python benchmarks/bench_smoother.py            # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/bench_smoother.py --quick    # seconds, smoke test

Writes ``benchmarks/results/smoother.json`` and ``benchmarks/results/smoother.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from dualflow import graphical as gm
from dualflow.experiments.commands.duality import random_hmm, random_lgssm

HERE = os.path.dirname(os.path.abspath(__file__))

# (kind, size, T) -> reason.
SKIP_FULL = {
    ("kalman", 64, 10000): "time: RTS alone ~75 s per repeat",
    ("kalman", 4, 10000): "time budget (n=2, 8, 16, 32 cover T=10000)",
    ("hmm", 8, 10000): "time budget (S=2, 32, 64 cover T=10000)",
}
# The autograd route keeps the whole filter graph alive: ~20 tensors of B*n*n float64 per
# step (n=64, B=8: ~5.3 MB per step); it is timed only where n * n * T <= this.
AUTOGRAD_MAX_N2T = 64 * 64 * 1000
# (kind, size, T) -> repeats, where the default would overrun the time budget
REPEATS_OVERRIDE = {("kalman", 64, 1000): 1, ("kalman", 32, 1000): 2}
FULL = {
    "kalman_n": [2, 4, 8, 16, 32, 64],
    "hmm_s": [2, 8, 32, 64],
    "lengths": [100, 1000, 10000],
    "repeats": {100: 5, 1000: 3, 10000: 1},
}
QUICK = {
    "kalman_n": [2, 8],
    "hmm_s": [2, 16],
    "lengths": [50, 200],
    "repeats": {50: 3, 200: 2},
}


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bench_kalman(n: int, T: int, B: int, repeats: int) -> dict:
    m = max(1, n // 2)
    model = random_lgssm(n, m, T, seed=n + T, batch=B)
    kw = {"validate": False}
    autograd = n * n * T <= AUTOGRAD_MAX_N2T
    t_f, t_r, t_b, t_a = [], [], [], []
    out_r = out_b = out_a = None
    for _ in range(repeats):  # interleaved so drift in machine load hits all routes alike
        t_f.append(_time(lambda: gm.kalman_filter(*model, **kw)))
        t0 = time.perf_counter()
        out_r = gm.rts_smoother(*model, **kw)
        t_r.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_b = gm.kalman_smoother_by_backprop(*model, vjp="closed_form", **kw)
        t_b.append(time.perf_counter() - t0)
        if autograd:
            t0 = time.perf_counter()
            out_a = gm.kalman_smoother_by_backprop(*model, vjp="autograd", **kw)
            t_a.append(time.perf_counter() - t0)
    assert out_r is not None and out_b is not None
    rts, bp = statistics.median(t_r), statistics.median(t_b)
    ag = statistics.median(t_a) if t_a else None
    diff = [float((out_r[i] - o[i]).abs().max()) for o in (out_b, out_a) if o is not None for i in (0, 1)]
    return {
        "n": n,
        "m": m,
        "T": T,
        "B": B,
        "repeats": repeats,
        "filter_s": statistics.median(t_f),
        "rts_s": rts,
        "backprop_s": bp,
        "ratio_backprop_over_rts": bp / rts,
        "ratio_of_min_times": min(t_b) / min(t_r),
        "backprop_autograd_s": ag,
        "ratio_autograd_over_rts": None if ag is None else ag / rts,
        "max_abs_diff_mean": max(diff[0::2]),
        "max_abs_diff_cov": max(diff[1::2]),
    }


def bench_hmm(S: int, T: int, B: int, repeats: int) -> dict:
    model = random_hmm(S, T, seed=S + T, batch=B)
    kw = {"validate": False}
    t_f, t_r, t_b = [], [], []
    g_r = g_b = None
    for _ in range(repeats):
        t_f.append(_time(lambda: gm.hmm_filter(*model, **kw)))
        t0 = time.perf_counter()
        g_r = gm.hmm_forward_backward(*model, **kw)
        t_r.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        g_b = gm.hmm_smoother_by_backprop(*model, **kw)
        t_b.append(time.perf_counter() - t0)
    assert g_r is not None and g_b is not None
    fb, bp = statistics.median(t_r), statistics.median(t_b)
    return {
        "S": S,
        "T": T,
        "B": B,
        "repeats": repeats,
        "filter_s": statistics.median(t_f),
        "forward_backward_s": fb,
        "backprop_s": bp,
        "ratio_backprop_over_fb": bp / fb,
        "max_abs_diff": float((g_r - g_b).abs().max()),
    }


def _md(report: dict) -> str:
    env = report["env"]
    lines = [
        "# Smoothing by backprop vs explicit smoothers",
        "",
        "Produced by:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"torch {env['torch']}, {env['dtype']}, batch B={env['batch']} (each batch element "
        f"has its own model), {env['threads']} intra-op thread(s) on a {env['cpu_count']}-core "
        f"machine ({env['machine']}), median wall time of `repeats` runs, one process. "
        f"Load average before/after: {env['loadavg_before']} / {env['loadavg_after']} "
        "(other jobs shared the machine, so absolute times are noisy; the ratios are "
        "more stable because the routes are timed interleaved). Total "
        f"{report['total_s']:.0f} s.",
        "",
        "Both smoother routes include their filter pass; `filter` is the filter alone. "
        "`diff` is the largest absolute discrepancy between the two routes' outputs "
        "(means and covariances / marginals) in that run.",
        "",
        "## Kalman: `kalman_smoother_by_backprop` vs `rts_smoother` (m = max(1, n/2))",
        "",
        '`backprop`: the default `vjp="closed_form"` (the filter is one autograd Function whose '
        'backward is the step\'s VJP written out); `autograd`: `vjp="autograd"` (torch records '
        "every op of the filter and replays its derivative; `-`: not timed, graph too large). "
        "`diff`: largest discrepancy of either backprop route from RTS. Ratios are of median "
        "times; the ratio of minimum times (less sensitive to load spikes) beside it.",
        "",
        "| n | T | repeats | filter [s] | RTS [s] | backprop [s] | backprop / RTS | same, ratio of minima "
        "| autograd [s] | autograd / RTS | diff mean | diff cov |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["kalman"]:
        ag, agr = r.get("backprop_autograd_s"), r.get("ratio_autograd_over_rts")
        lines.append(
            f"| {r['n']} | {r['T']} | {r['repeats']} | {r['filter_s']:.3f} | {r['rts_s']:.3f} "
            f"| {r['backprop_s']:.3f} | {r['ratio_backprop_over_rts']:.2f} | {r['ratio_of_min_times']:.2f} "
            f"| {'-' if ag is None else f'{ag:.3f}'} | {'-' if agr is None else f'{agr:.2f}'} "
            f"| {r['max_abs_diff_mean']:.1e} | {r['max_abs_diff_cov']:.1e} |"
        )
    lines += [
        "",
        "## HMM: `hmm_smoother_by_backprop` vs `hmm_forward_backward`",
        "",
        "| S | T | repeats | filter [s] | forward-backward [s] | backprop [s] | backprop / FB | diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["hmm"]:
        lines.append(
            f"| {r['S']} | {r['T']} | {r['repeats']} | {r['filter_s']:.3f} "
            f"| {r['forward_backward_s']:.3f} | {r['backprop_s']:.3f} "
            f"| {r['ratio_backprop_over_fb']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    if report.get("repeats_override"):
        lines += ["", "Fewer repeats (time budget): " + ", ".join(report["repeats_override"]) + "."]
    if report["skipped"]:
        lines += ["", "## Skipped grid points", ""]
        for s in report["skipped"]:
            size = "n" if s["kind"] == "kalman" else "S"
            lines.append(f"- {s['kind']} {size}={s['size']}, T={s['T']}: {s['reason']}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny grid (smoke test)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    p.add_argument("--budget-s", type=float, default=600.0, help="skip what would overrun")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--name", default="smoother", help="output file stem")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    grid = QUICK if args.quick else FULL
    skips = {} if args.quick else SKIP_FULL
    cmd = " ".join([".venv/bin/python", os.path.relpath(__file__, os.getcwd()), *sys.argv[1:]])
    report: dict = {
        "command": cmd,
        "env": {
            "torch": torch.__version__,
            "dtype": "float64",
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
            "python": platform.python_version(),
            "loadavg_before": _loadavg(),
        },
        "kalman": [],
        "hmm": [],
        "skipped": [],
        "repeats_override": []
        if args.quick
        else [f"{k} size={n} T={T}: {r}" for (k, n, T), r in REPEATS_OVERRIDE.items()],
    }
    t_start = time.perf_counter()
    # warm-up (first-call overheads of the linear-algebra kernels)
    bench_kalman(2, 20, args.batch, 1)
    bench_hmm(2, 20, args.batch, 1)
    per_step: dict[tuple[str, int], float] = {}  # seconds per (step * repeat), for the budget
    for T in grid["lengths"]:
        for kind, sizes in (("kalman", grid["kalman_n"]), ("hmm", grid["hmm_s"])):
            for size in sizes:
                reps = grid["repeats"][T]
                if not args.quick:
                    reps = REPEATS_OVERRIDE.get((kind, size, T), reps)
                reason = skips.get((kind, size, T))
                elapsed = time.perf_counter() - t_start
                guess = per_step.get((kind, size), 0.0) * T * reps
                if reason is None and elapsed + guess > args.budget_s:
                    reason = f"budget: predicted {guess:.0f} s with {elapsed:.0f} s spent"
                if reason is not None:
                    report["skipped"].append({"kind": kind, "size": size, "T": T, "reason": reason})
                    print(f"skip {kind} size={size} T={T}: {reason}", flush=True)
                    continue
                t0 = time.perf_counter()
                if kind == "kalman":
                    row = bench_kalman(size, T, args.batch, reps)
                    msg = (
                        f"rts {row['rts_s']:.3f}s  backprop {row['backprop_s']:.3f}s  "
                        f"x{row['ratio_backprop_over_rts']:.2f}  "
                        f"autograd x{row['ratio_autograd_over_rts'] or 0:.2f}  "
                        f"diff {max(row['max_abs_diff_mean'], row['max_abs_diff_cov']):.1e}"
                    )
                else:
                    row = bench_hmm(size, T, args.batch, reps)
                    msg = (
                        f"fb {row['forward_backward_s']:.3f}s  backprop {row['backprop_s']:.3f}s  "
                        f"x{row['ratio_backprop_over_fb']:.2f}  diff {row['max_abs_diff']:.1e}"
                    )
                report[kind].append(row)
                # include data generation and the filter pass in the budget estimate
                per_step[(kind, size)] = (time.perf_counter() - t0) / (T * reps)
                print(f"{kind:6s} size={size:3d} T={T:6d} reps={reps}: {msg}", flush=True)
    report["total_s"] = time.perf_counter() - t_start
    report["env"]["loadavg_after"] = _loadavg()
    os.makedirs(args.out_dir, exist_ok=True)
    jpath = os.path.join(args.out_dir, f"{args.name}.json")
    mpath = os.path.join(args.out_dir, f"{args.name}.md")
    with open(jpath, "w") as fh:
        json.dump(report, fh, indent=2)
    with open(mpath, "w") as fh:
        fh.write(_md(report))
    print(f"wrote {jpath} and {mpath} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
