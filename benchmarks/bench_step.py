"""Step-time benchmark: one training step of a BP network vs the same point network.

A step is forward + loss (+ KL/N for BP) + backward + Adam update. Both networks run in
one process, interleaved step by step so that machine noise hits both alike; the figure
is the ratio of medians.

Memory ("peak training memory") is counted exactly rather than read from the allocator
(CPU has no peak counter): parameters + gradients + Adam state + every tensor autograd
saves for the backward pass (unique storages, via ``saved_tensors_hooks``).

Usage::

    python benchmarks/bench_step.py [--steps 60] [--threads 1] [--device cpu]

writes ``benchmarks/results/step_time.json`` and ``step_time.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dualflow as df

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import cnn_builder, mlp_builder

RESULTS = Path(__file__).resolve().parent / "results"


def mlp(bayes: bool) -> torch.nn.Module:
    return mlp_builder(bayes)


def cnn(bayes: bool) -> torch.nn.Module:
    return cnn_builder(bayes)


CASES = {
    "mlp 784-400-400-10, batch 128": (mlp, (128, 1, 28, 28)),
    "cnn 3x32x32 (3 conv + 2 maxpool), batch 64": (cnn, (64, 3, 32, 32)),
}


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n: int):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as dualflow.train uses

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = df.losses.categorical_nll(model(x), y) + df.nn.kl(model) / n
        loss.backward()
        opt.step()

    return step, opt


def training_memory(model: torch.nn.Module, step, opt, x, y, n) -> int:
    """Bytes: parameters + grads + optimizer state + tensors saved for backward (unique storages)."""
    step()  # creates grads and optimizer state
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = df.losses.categorical_nll(model(x), y) + df.nn.kl(model) / n
    loss.backward()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return 2 * params + state + sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="dualflow.rules.enable_compile(True)")
    ap.add_argument("--out", default=None, help="default: results/step_time[_compiled].json")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(RESULTS / ("step_time_compiled.json" if args.compile else "step_time.json"))
    if args.compile:
        df.rules.enable_compile(True)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dev = torch.device(args.device)
    rows = []
    for name, (builder, shape) in CASES.items():
        torch.manual_seed(0)
        x = torch.randn(*shape, device=dev)
        y = torch.randint(0, 10, (shape[0],), device=dev)
        nets = {"bp": builder(True).to(dev), "point": builder(False).to(dev)}
        for net in nets.values():
            df.nn.set_checks(net, False)  # measure the maths, not the input validation
        steps = {k: make_step(v, x, y, 50_000) for k, v in nets.items()}
        times: dict[str, list[float]] = {k: [] for k in nets}
        for i in range(args.warmup + args.steps):
            for k, (fn, _) in steps.items():  # interleaved: noise hits both alike
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {k: training_memory(nets[k], *steps[k], x, y, 50_000) for k in nets}
        # with checks on (the default), for information
        df.nn.set_checks(nets["bp"], True)
        fn_checked = make_step(nets["bp"], x, y, 50_000)[0]
        for _ in range(3):
            fn_checked()
        tc = []
        for _ in range(max(10, args.steps // 3)):
            t0 = time.perf_counter()
            fn_checked()
            tc.append(time.perf_counter() - t0)
        rows.append(
            {
                "case": name,
                "bp_ms": 1e3 * med["bp"],
                "point_ms": 1e3 * med["point"],
                "time_ratio": med["bp"] / med["point"],
                "bp_checked_ms": 1e3 * statistics.median(tc),
                "bp_mem_mb": mem["bp"] / 2**20,
                "point_mem_mb": mem["point"] / 2**20,
                "mem_ratio": mem["bp"] / mem["point"],
            }
        )
        print(
            f"{name}: BP {rows[-1]['bp_ms']:.2f} ms, point {rows[-1]['point_ms']:.2f} ms, "
            f"ratio {rows[-1]['time_ratio']:.2f}x; memory ratio {rows[-1]['mem_ratio']:.2f}x",
            flush=True,
        )
    cmd = "python " + " ".join(sys.argv)
    meta = {
        "command": cmd,
        "torch": torch.__version__,
        "device": args.device,
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "steps": args.steps,
        "compiled_kernels": args.compile,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    md = [
        f"Command: `{cmd}` (torch {torch.__version__}, {args.device}, {args.threads} thread(s), "
        f"compiled kernels: {args.compile}).",
        "",
        "| case | BP ms/step | point ms/step | time ratio | BP MB | point MB | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['case']} | {r['bp_ms']:.2f} | {r['point_ms']:.2f} | {r['time_ratio']:.2f}x | "
            f"{r['bp_mem_mb']:.1f} | {r['point_mem_mb']:.1f} | {r['mem_ratio']:.2f}x |"
        )
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
