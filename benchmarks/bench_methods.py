"""Cost of every learning method of :mod:`dualflow.methods` relative to a point network.

For each method, architecture and batch size: the time of one training step and its peak
memory, both relative to ``vanilla``; and the time to a predictive distribution for one
batch (BP: one deterministic pass; sampling methods and MC dropout: ``S = 32`` passes;
ensemble: one pass per member).

* A training step is exactly what :meth:`dualflow.methods.Method.fit` does per mini-batch:
  ``zero_grad``, the method's data term (:meth:`Method.loss`) ``+ KL / N``, ``backward``, and
  the method's optimizer step (the Adam :func:`dualflow.train.fit` builds;
  :class:`dualflow.optim.NaturalGradient` for ``bp-ng``
  and ``reparam-ng-ensemble``). Input validation is off (``dualflow.nn.set_checks``), as in
  ``bench_step.py``.
* Timing: all methods of one (architecture, batch size) run in one process, interleaved
  round by round so that machine noise hits all alike; the figure is the median over rounds.
* Peak memory (CPU has no allocator peak counter): the live bytes at the start of a step
  (parameters, gradients, optimizer state) plus the peak of the running sum of every
  allocation and free during the step, read from ``torch.profiler``'s memory events
  (``profile_memory=True``). This counts every tensor the step allocates, temporaries
  included, not the process RSS (which on CPU mixes in allocator caching and the Python heap).
* Models: the MLP 784-400-400-10 and the CNN (3 conv + 2 max-pool + global average pool) of
  ``bench_step.py``, ten classes, ``N = 50000``, ReLU; MC dropout with ``p = 0.1`` after every
  hidden ReLU; ensembles of 5; ``reparam-ng-ensemble`` with 4 networks per batch.

Usage::

    python benchmarks/bench_methods.py [--quick] [--threads 1]

``torch.set_num_threads(1)`` by default. Writes ``benchmarks/results/methods.json`` and
``benchmarks/results/methods.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dualflow as df
import dualflow.methods as dm
from dualflow import nn as dnn
from dualflow.train import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 50_000


def mlp_builder(bayes: bool, dropout: float = 0.0) -> torch.nn.Module:
    mods: list[torch.nn.Module] = [dnn.Flatten()]
    for a, b in ((784, 400), (400, 400)):
        mods += [dnn.Linear(a, b, bayes=bayes), dnn.ReLU()]
        if dropout:
            mods.append(dnn.Dropout(dropout))
    mods.append(dnn.Linear(400, 10, bayes=bayes))
    return dnn.Sequential(*mods)


# ``--pool-correlation``: window-correlation mode of the CNN's max pools (``None``: library default)
POOL_CORRELATION: str | None = None


def cnn_builder(bayes: bool, dropout: float = 0.0) -> torch.nn.Module:
    def drop() -> list[torch.nn.Module]:
        return [dnn.Dropout(dropout)] if dropout else []

    net = _cnn(bayes, drop)
    if POOL_CORRELATION is not None:
        dnn.set_max_pool(net, correlation=POOL_CORRELATION)
    return net


def _cnn(bayes: bool, drop) -> torch.nn.Module:
    return dnn.Sequential(
        dnn.Conv2d(3, 32, 3, padding=1, bayes=bayes),
        dnn.ReLU(),
        *drop(),
        dnn.MaxPool2d(2),
        dnn.Conv2d(32, 64, 3, padding=1, bayes=bayes),
        dnn.ReLU(),
        *drop(),
        dnn.MaxPool2d(2),
        dnn.Conv2d(64, 64, 3, padding=1, bayes=bayes),
        dnn.ReLU(),
        *drop(),
        dnn.GlobalAvgPool2d(),
        dnn.Linear(64, 10, bayes=bayes),
    )


ARCHS = {
    "mlp": ("MLP 784-400-400-10", mlp_builder, (1, 28, 28)),
    "cnn": ("CNN 3x32x32 (3 conv + 2 max-pool)", cnn_builder, (3, 32, 32)),
}


def make_method(name: str, build) -> dm.Method:
    torch.manual_seed(0)
    m = dm.create(name, build, task="classification", samples=32, ensemble_size=5)
    dnn.set_checks(m, False)
    return m


def make_step(m: dm.Method, x: torch.Tensor, y: torch.Tensor):
    params = list(m.parameters())
    opt = m.configure_optimizer(params, N_TRAIN, TrainConfig(lr=1e-3))
    m.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = m.loss(m.training_outputs(x), y) + df.nn.kl(m) / N_TRAIN
        loss.backward()
        opt.step()

    return step, opt


def _live_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    seen: dict[int, int] = {}
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [b for b in model.buffers() if b is not None]
    for s in opt.state.values():  # per-parameter dicts (ivon also keeps counters here)
        tensors += [v for v in (s.values() if isinstance(s, dict) else [s]) if torch.is_tensor(v)]
    # ivon keeps its flat state (momentum, hess) in the parameter groups
    tensors += [v for g in opt.param_groups for k, v in g.items() if k != "params" and torch.is_tensor(v)]
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def peak_step_bytes(step: Callable[[], None], model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Live bytes at the start of a step + peak of the running allocation sum during it."""
    from torch.profiler import ProfilerActivity, profile

    step()  # gradients and optimizer state exist
    base = _live_bytes(model, opt)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    run = peak = 0
    for e in events:
        run += e.nbytes()
        peak = max(peak, run)
    return base + peak


def bench_steps(arch: str, batch: int, methods: list[str], rounds: int, warmup: int) -> list[dict]:
    _, build, shape = ARCHS[arch]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    ms = {n: make_method(n, build) for n in methods}
    steps = {n: make_step(m, x, y) for n, m in ms.items()}
    times: dict[str, list[float]] = {n: [] for n in methods}
    for r in range(warmup + rounds):
        for n in methods:  # interleaved
            t0 = time.perf_counter()
            steps[n][0]()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    mem = {n: peak_step_bytes(steps[n][0], ms[n], steps[n][1]) for n in methods}
    med = {n: statistics.median(v) for n, v in times.items()}
    rows = []
    for n in methods:
        rows.append(
            {
                "arch": arch,
                "batch": batch,
                "method": n,
                "step_ms": 1e3 * med[n],
                "step_ratio": med[n] / med["vanilla"],
                "peak_mb": mem[n] / 2**20,
                "mem_ratio": mem[n] / mem["vanilla"],
                "rounds": rounds,
            }
        )
    return rows


@torch.no_grad()
def bench_predict(arch: str, batch: int, methods: list[str], rounds: int) -> list[dict]:
    _, build, shape = ARCHS[arch]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    ms = {n: make_method(n, build) for n in methods}
    for m in ms.values():
        m.eval()
    times: dict[str, list[float]] = {n: [] for n in methods}
    for r in range(rounds + 1):
        for n in methods:
            t0 = time.perf_counter()
            ms[n].predict(x, batch_size=batch)
            if r >= 1:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    passes = {
        "bp": 1,
        "bp-ng": 1,
        "vanilla": 1,
        "ensemble": 5,
    }
    return [
        {
            "arch": arch,
            "batch": batch,
            "method": n,
            "passes": passes.get(n, 32),
            "predict_ms": 1e3 * med[n],
            "ratio_to_bp": med[n] / med["bp"],
        }
        for n in methods
    ]


def write_markdown(path: Path, cmd: str, meta: dict, steps: list[dict], preds: list[dict]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in steps))
    md = [
        "# Cost of the learning methods (`benchmarks/bench_methods.py`)",
        "",
        f"Command: `{cmd}`; torch {meta['torch']}, CPU, {meta['threads']} thread(s) "
        f"(`torch.set_num_threads({meta['threads']})`), {meta['processor'] or meta['machine']}, "
        f"total {meta['seconds']:.0f} s. Shared machine: absolute times are noisy, ratios less so "
        "(methods interleaved round by round, median over rounds).",
        "",
    ]
    for arch in dict.fromkeys(r["arch"] for r in steps):
        rows = [r for r in steps if r["arch"] == arch]
        batches = sorted({r["batch"] for r in rows})
        title = ARCHS[arch][0]
        md += [
            f"## {title}: time per training step, ms (ratio to vanilla)",
            "",
            "| method | " + " | ".join(f"B={b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        for n in methods:
            cells = []
            for b in batches:
                r = next(r for r in rows if r["method"] == n and r["batch"] == b)
                cells.append(f"{r['step_ms']:.1f} ({r['step_ratio']:.2f}x)")
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md += [
            "",
            f"## {title}: peak memory of a training step, MB (ratio to vanilla)",
            "",
            "| method | " + " | ".join(f"B={b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        for n in methods:
            cells = []
            for b in batches:
                r = next(r for r in rows if r["method"] == n and r["batch"] == b)
                cells.append(f"{r['peak_mb']:.1f} ({r['mem_ratio']:.2f}x)")
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("")
    md += [
        "## Time to a predictive distribution for one batch, ms (ratio to BP's one pass)",
        "",
        "| arch | batch | method | forward passes | ms | ratio to bp |",
        "|---|---|---|---|---|---|",
    ]
    for r in preds:
        md.append(
            f"| {r['arch']} | {r['batch']} | {r['method']} | {r['passes']} | {r['predict_ms']:.1f} | "
            f"{r['ratio_to_bp']:.2f}x |"
        )
    md += [
        "",
        "Step = zero_grad + data term + KL/N + backward + optimizer step (Adam; NaturalGradient for "
        "bp-ng and reparam-ng-ensemble), as `Method.fit` does per mini-batch; input checks off. "
        "Peak memory = live parameters, gradients and optimizer state at the start of a step + "
        "the peak of the running sum of the step's allocations and frees, from `torch.profiler` "
        "memory events (every CPU tensor allocation, temporaries included; not RSS).",
        "",
    ]
    path.write_text("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes and rounds (a smoke run)")
    ap.add_argument(
        "--methods", nargs="*", default=None, help="subset of methods (vanilla and bp always run)"
    )
    ap.add_argument("--out", default=str(RESULTS / "methods.json"))
    ap.add_argument("--predict-only", action="store_true", help="only the time to a predictive distribution")
    ap.add_argument(
        "--pool-correlation",
        default=None,
        choices=["smooth", "meanfield", "none"],
        help="window correlations of the CNN's max pools (default: the library's)",
    )
    args = ap.parse_args()
    if args.pool_correlation is not None:
        global POOL_CORRELATION
        POOL_CORRELATION = args.pool_correlation
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    methods = dm.available() if not args.methods else args.methods
    methods = ["vanilla", "bp", *[n for n in methods if n not in ("vanilla", "bp")]]
    plan = {
        "mlp": [(32, 21), (128, 15), (512, 9)],
        "cnn": [(32, 5), (128, 3), (512, 3)],
    }
    if args.quick:
        plan = {"mlp": [(32, 2)], "cnn": [(32, 1)]}
    if args.predict_only:
        plan = {}
    steps: list[dict] = []
    for arch, sizes in plan.items():
        for batch, rounds in sizes:
            t0 = time.perf_counter()
            rows = bench_steps(arch, batch, methods, rounds=rounds, warmup=1)
            steps += rows
            print(
                f"{arch} B={batch}: "
                + ", ".join(f"{r['method']} {r['step_ratio']:.2f}x/{r['mem_ratio']:.2f}x" for r in rows)
                + f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    preds: list[dict] = []
    for arch, batch, rounds in (("mlp", 256, 5), ("cnn", 128, 2)) if not args.quick else (("mlp", 32, 1),):
        t0 = time.perf_counter()
        rows = bench_predict(arch, batch, methods, rounds)
        preds += rows
        print(
            f"predict {arch} B={batch}: "
            + ", ".join(f"{r['method']} {r['predict_ms']:.1f} ms" for r in rows)
            + f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    cmd = "python " + " ".join(["benchmarks/bench_methods.py", *sys.argv[1:]])
    meta = {
        "command": cmd,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "n_train": N_TRAIN,
        "seconds": time.perf_counter() - t_start,
        "memory": "live params+grads+optimizer state at step start + peak running sum of "
        "torch.profiler memory events during the step",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "steps": steps, "predict": preds}, indent=2))
    write_markdown(out.with_suffix(".md"), cmd, meta, steps, preds)
    print(f"wrote {out} and {out.with_suffix('.md')} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
