"""One short GPU check: training-step time of BP vs point networks on a CUDA device.

Cases: the step benchmark's MLP and small CNN (``bench_step.py``), and ResNet-20 on
3x32x32 inputs in two Table-1 configurations, ``BP/NF`` (Bayesian, no normalisation) and
``vanilla`` (point weights, BatchNorm), batch 128, random inputs (throughput only).
Interleaved steps, medians; peak CUDA memory per configuration.

Usage: ``python benchmarks/gpu_check.py --out DIR`` (writes ``gpu_check.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dualflow as df
from bench_step import cnn, mlp
from dualflow import models


def timed_steps(nets: dict, x, y, steps: int, warmup: int, dev) -> dict:
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-3, fused=dev.type == "cuda") for k, n in nets.items()}

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        out = nets[k](x)
        loss = df.losses.categorical_nll(out, y) + df.nn.kl(nets[k]) / 50_000
        loss.backward()
        opts[k].step()

    times = {k: [] for k in nets}
    for i in range(warmup + steps):
        for k in nets:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    mem = {}
    for k in nets:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(k)
            torch.cuda.synchronize()
            mem[k] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            mem[k] = float("nan")
    return {k: {"ms": 1e3 * statistics.median(v), "peak_mb": mem[k]} for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    cases = {
        "mlp 784-400-400-10, batch 128": (
            {"bp": mlp(True), "point": mlp(False)}, (128, 1, 28, 28)),
        "cnn 3x32x32, batch 64": ({"bp": cnn(True), "point": cnn(False)}, (64, 3, 32, 32)),
        "resnet20 CIFAR, batch 128": (
            {
                "bp (BP/NF)": models.create("resnet20", normalization="none", bayes=True),
                "point (vanilla, BatchNorm)": models.create("resnet20", normalization="batch", bayes=False),
            },
            (128, 3, 32, 32),
        ),
    }  # fmt: skip
    for name, (nets, shape) in cases.items():
        nets = {k: v.to(dev) for k, v in nets.items()}
        for n in nets.values():
            df.nn.set_checks(n, False)
        x = torch.randn(*shape, device=dev)
        y = torch.randint(0, 10, (shape[0],), device=dev)
        res = timed_steps(nets, x, y, args.steps, 5, dev)
        keys = list(res)
        ratio = res[keys[0]]["ms"] / res[keys[1]]["ms"]
        rows.append({"case": name, "results": res, "time_ratio": ratio, "images_per_s": {
            k: shape[0] / (v["ms"] / 1e3) for k, v in res.items()}})  # fmt: skip
        print(name, json.dumps(res), f"ratio {ratio:.2f}", flush=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [
        f"Command: `{meta['command']}` on {meta['device']} (torch {meta['torch']}).",
        "",
        "| case | configuration | ms/step | images/s | peak MB | time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for i, (k, v) in enumerate(r["results"].items()):
            ratio = f"{r['time_ratio']:.2f}x" if i == 0 else ""
            ips = r["images_per_s"][k]
            md.append(f"| {r['case']} | {k} | {v['ms']:.2f} | {ips:.0f} | {v['peak_mb']:.0f} | {ratio} |")
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
