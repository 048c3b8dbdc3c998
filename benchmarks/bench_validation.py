"""Cost of input validation in a training step: ``Gaussian``'s shape check at construction and
the dtype check of every layer's input (the two checks that run in the hot path).

Two variants of the same BP network run interleaved in one process, in alternating blocks of
steps, so that machine noise hits both alike: ``checked`` (the library as it is) and ``bare`` (``Gaussian``
built by the plain tuple constructor and the dtype check replaced by a no-op, i.e. the code
before these checks existed). The figure is the ratio of the medians. Both with the per-layer
value checks on (``check_inputs``, the default) and off (``dualflow.nn.set_checks``).

Usage::

    python benchmarks/bench_validation.py [--steps 200] [--threads 1]

writes ``benchmarks/results/validation.json`` and ``validation.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import dualflow as df
from dualflow.gaussian import Gaussian
from dualflow.models import base as model_base
from dualflow.nn import base, structure

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def bare() -> Iterator[None]:
    """The library without the two hot-path checks (restored on exit)."""
    new, dtype_checks = Gaussian.__new__, (base.check_dtype, structure.check_dtype, model_base.check_dtype)
    Gaussian.__new__ = lambda cls, mean, var: tuple.__new__(cls, (mean, var))  # type: ignore[method-assign]
    for mod in (base, structure, model_base):
        mod.check_dtype = lambda *a: None  # type: ignore[attr-defined]
    try:
        yield
    finally:
        Gaussian.__new__ = new  # type: ignore[method-assign]
        base.check_dtype, structure.check_dtype, model_base.check_dtype = dtype_checks


def uci_net() -> torch.nn.Module:
    return df.nn.Sequential(df.nn.Linear(13, 50), df.nn.ReLU(), df.nn.Linear(50, 1, gain=1.0))


def mlp() -> torch.nn.Module:
    return df.nn.Sequential(
        df.nn.Flatten(),
        df.nn.Linear(784, 400),
        df.nn.ReLU(),
        df.nn.Linear(400, 400),
        df.nn.ReLU(),
        df.nn.Linear(400, 10, gain=1.0),
    )


def resnet8() -> torch.nn.Module:
    return df.models.create("resnet8", widths=(8, 16, 32))


CASES: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], str]] = {
    "UCI 13-50-1, batch 32 (regression)": (uci_net, (32, 13), "regression"),
    "MLP 784-400-400-10, batch 128": (mlp, (128, 1, 28, 28), "classification"),
    "ResNet-8 (width 8) 3x32x32, batch 32": (resnet8, (32, 3, 32, 32), "classification"),
}


def make_step(model: torch.nn.Module, shape: tuple[int, ...], task: str) -> Callable[[], None]:
    x = torch.randn(shape)
    y = torch.randn(shape[0], 1) if task == "regression" else torch.randint(0, 10, (shape[0],))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if task == "regression":
            data = df.losses.gaussian_nll(out, y, 0.1)
        else:
            data = df.losses.categorical_nll(out, y)
        (data + df.nn.kl(model) / 1000).backward()
        opt.step()

    return step


def _count_checks(step: Callable[[], None]) -> tuple[int, int]:
    """(Gaussian constructions, dtype checks) in one step."""
    counts = [0, 0]
    new, dtype_check = Gaussian.__new__, base.check_dtype

    def counting_new(cls, mean, var):  # type: ignore[no-untyped-def]
        counts[0] += 1
        return new(cls, mean, var)

    def counting_check(*a):  # type: ignore[no-untyped-def]
        counts[1] += 1
        return dtype_check(*a)

    Gaussian.__new__ = counting_new  # type: ignore[method-assign]
    for mod in (base, structure, model_base):
        mod.check_dtype = counting_check  # type: ignore[attr-defined]
    try:
        step()
    finally:
        Gaussian.__new__ = new  # type: ignore[method-assign]
        for mod in (base, structure, model_base):
            mod.check_dtype = dtype_check  # type: ignore[attr-defined]
    return counts[0], counts[1]


def _unit_costs(reps: int = 20000) -> tuple[float, float]:
    """Seconds per ``Gaussian`` construction and per dtype check, each beyond its bare version."""
    a, b = torch.zeros(32, 50), torch.zeros(32, 50)

    def per_call(fn: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    checked = per_call(lambda: Gaussian(a, b))
    dtype = per_call(lambda: base.check_dtype(a, torch.float32, "x"))
    with bare():
        plain = per_call(lambda: Gaussian(a, b))
    return checked - plain, dtype


def measure(steps: int, block: int = 10) -> list[dict]:
    """Interleaved blocks of ``block`` timed steps per variant (the first step after a switch is
    untimed: switching replaces a class attribute, which empties Python's method caches)."""
    d_new, d_dtype = _unit_costs()
    print(f"extra cost per Gaussian construction {d_new * 1e9:.0f} ns, dtype check {d_dtype * 1e9:.0f} ns")
    rows = []
    for name, (factory, shape, task) in CASES.items():
        for checks in (True, False):
            torch.manual_seed(0)
            model = df.nn.set_checks(factory(), checks)
            step = make_step(model, shape, task)
            n_new, n_dtype = _count_checks(step)
            times: dict[str, list[float]] = {"checked": [], "bare": []}
            for i in range(max(1, steps // block)):
                for variant in ("checked", "bare") if i % 2 == 0 else ("bare", "checked"):
                    with bare() if variant == "bare" else contextlib.nullcontext():
                        step()  # untimed
                        for _ in range(block):
                            t0 = time.perf_counter()
                            step()
                            times[variant].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            predicted = (n_new * d_new + n_dtype * d_dtype) * 1e3
            rows.append(
                {
                    "case": name,
                    "check_inputs": checks,
                    "checked_ms": med["checked"],
                    "bare_ms": med["bare"],
                    "ratio": med["checked"] / med["bare"],
                    "gaussians_per_step": n_new,
                    "dtype_checks_per_step": n_dtype,
                    "predicted_extra_ms": predicted,
                    "predicted_share": predicted / med["bare"],
                    "steps": len(times["checked"]),
                }
            )
            print(
                f"{name:<40} checks={checks!s:<5} {med['checked']:8.3f} ms vs {med['bare']:8.3f} ms "
                f"ratio {med['checked'] / med['bare']:.3f}; {n_new} Gaussians + {n_dtype} dtype checks "
                f"per step = {predicted * 1e3:.1f} us ({predicted / med['bare']:.2%})",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.steps)
    cmd = f"python benchmarks/bench_validation.py --steps {args.steps} --threads {args.threads}"
    meta = {"command": cmd, "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "validation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Cost of the hot-path input checks",
        "",
        f"`{cmd}` (torch {torch.__version__}, CPU, {args.threads} thread; shared machine). Median step "
        "time (forward + loss + KL + backward + Adam) of the library as it is (`checked`: `Gaussian` "
        "checks its shapes at construction, every layer checks its input dtype) against the same code "
        "without those two checks (`bare`), interleaved in one process in alternating blocks of 10 "
        f"timed steps ({rows[0]['steps'] if rows else 0} per variant and case), on a machine shared with "
        "other jobs "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end).",
        "",
        "The last columns count the two checks in one step and multiply by their unit cost "
        "(measured in the same run with `timeit`-style loops): the overhead they can add at most, "
        "which the noisy step-time ratio cannot resolve below a few per cent.",
        "",
        "| case | per-layer value checks | checked ms | bare ms | ratio | Gaussians + dtype checks "
        "per step | their cost per step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {'on' if r['check_inputs'] else 'off'} | {r['checked_ms']:.3f} | "
            f"{r['bare_ms']:.3f} | {r['ratio']:.3f} | {r['gaussians_per_step']} + "
            f"{r['dtype_checks_per_step']} | {r['predicted_extra_ms'] * 1e3:.1f} us "
            f"({r['predicted_share']:.2%}) |"
        )
    (RESULTS / "validation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'validation.md'}")


if __name__ == "__main__":
    main()
