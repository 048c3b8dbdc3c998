"""Max-pooling rules: accuracy against Monte Carlo and cost, to choose the default.

Rules: Clark's pairwise tree (``method="clark"``) and the paper's smooth max
(``method="lse"``, several temperatures). Inputs: 2x2 windows with random means and
variances, in three regimes (similar variances; variances spread 100x; means far apart).
Accuracy: mean error in units of the true standard deviation, and relative variance
error, against 400k-sample Monte Carlo (float64). Cost: forward+backward time of a
(64, 32, 16, 16) map relative to a point ``F.max_pool2d``.

Usage: ``python benchmarks/bench_maxpool.py`` -> ``benchmarks/results/maxpool.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dualflow import rules

RESULTS = Path(__file__).resolve().parent / "results"
D = torch.float64


def regimes(g: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    shape = (1, 64, 4, 4)
    m = torch.randn(shape, dtype=D, generator=g)
    return {
        "similar variances": (m, torch.rand(shape, dtype=D, generator=g) + 0.5),
        "variances spread 100x": (m, 10 ** (2 * torch.rand(shape, dtype=D, generator=g) - 1)),
        "means far apart": (4 * m, torch.rand(shape, dtype=D, generator=g) * 0.5 + 0.05),
    }


def methods():
    yield "clark", lambda m, v: rules.max_pool2d_clark(m, v, (2, 2), (2, 2))
    for t in (0.05, 0.1, 0.3):
        yield f"lse T={t}", lambda m, v, t=t: rules.max_pool2d_lse(m, v, (2, 2), (2, 2), temperature=t)


def accuracy(n_mc: int = 400_000) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for regime, (m, v) in regimes(g).items():
        x = m[0] + v[0].sqrt() * torch.randn((n_mc, *m.shape[1:]), dtype=D, generator=g)
        y = F.max_pool2d(x, 2)
        mc_m, mc_v = y.mean(0), y.var(0)
        for name, fn in methods():
            mean, var = fn(m, v)
            err_m = ((mean[0] - mc_m).abs() / mc_v.sqrt()).flatten()
            err_v = ((var[0] - mc_v).abs() / mc_v).flatten()
            rows.append(
                {
                    "regime": regime,
                    "method": name,
                    "mean_err_sd_max": float(err_m.max()),
                    "mean_err_sd_median": float(err_m.median()),
                    "var_rel_err_max": float(err_v.max()),
                    "var_rel_err_median": float(err_v.median()),
                }
            )
    return rows


def cost(repeats: int = 15) -> list[dict]:
    torch.manual_seed(0)
    m = torch.randn(64, 32, 16, 16, requires_grad=True)
    v = (torch.rand(64, 32, 16, 16) + 0.1).requires_grad_(True)

    def point():
        F.max_pool2d(m, 2).sum().backward()

    fns = {"point max_pool2d": point}
    for name, fn in methods():

        def run(fn=fn):
            mm, vv = fn(m, v)
            (mm.sum() + vv.sum()).backward()

        fns[name] = run
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["point max_pool2d"])
    return [
        {"method": k, "ms": 1e3 * statistics.median(t), "ratio_to_point": statistics.median(t) / base}
        for k, t in times.items()
    ]


def main() -> int:
    torch.set_num_threads(1)
    acc, cst = accuracy(), cost()
    cmd = "python " + " ".join(sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"command": cmd, "accuracy": acc, "cost": cst}
    (RESULTS / "maxpool.json").write_text(json.dumps(report, indent=2))
    md = [
        f"Command: `{cmd}` (1 thread). 2x2 windows, 64 random windows per regime, MC 400k samples.",
        "",
        "| regime | method | mean err / sd (median, max) | var rel. err (median, max) |",
        "|---|---|---|---|",
    ]
    for r in acc:
        md.append(
            f"| {r['regime']} | {r['method']} | {r['mean_err_sd_median']:.3f}, {r['mean_err_sd_max']:.3f} | "
            f"{r['var_rel_err_median']:.3f}, {r['var_rel_err_max']:.3f} |"
        )
    md += ["", "| method | fwd+bwd ms, (64,32,16,16) | x point max_pool2d |", "|---|---|---|"]
    md += [f"| {r['method']} | {r['ms']:.2f} | {r['ratio_to_point']:.1f}x |" for r in cst]
    (RESULTS / "maxpool.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
