"""Step-time benchmark: one training step of BP and of the installed peers vs a plain torch step.

A step is ``zero_grad`` + forward + loss (+ KL/N for the Bayesian methods) + backward +
optimizer update. Every method of one (architecture, batch) case runs in one process,
interleaved round by round so that machine noise hits all alike; the figure is the ratio of
medians to ``torch`` (a plain ``torch.nn`` point network with ``torch.optim.Adam(fused=True)``).

Methods (absent packages are skipped and reported):

* ``torch``: the reference, ``torch.nn`` layers, cross-entropy, fused Adam.
* ``df-point``: the same network built from ``dualflow.nn`` layers with ``bayes=False``.
* ``bp``: ``dualflow`` moment propagation (Algorithm 1), mean-field Gaussian weights,
  ``categorical_nll + kl / N``, fused Adam (what ``dualflow.train.fit`` uses), input checks
  off (``dualflow.nn.set_checks``); ``bp-checked``: the same with the default checks on.
* ``bt-reparam`` / ``bt-flipout``: bayesian-torch (0.5) ``LinearReparameterization`` /
  ``Conv2dReparameterization`` resp. the ``*Flipout`` layers, one weight sample per step,
  the layers' own KL / N, fused Adam.
* ``ivon``: the ``torch`` network trained by ``ivon.IVON`` (ivon-opt 0.1.3), one MC sample
  per step (``sampled_params(train=True)``), ``ess = N``.

Memory ("peak training memory", CPU has no allocator peak counter): the live bytes at the
start of a step (parameters, gradients, optimizer state, module buffers) plus the peak of
the running sum of every allocation and free during the step, from ``torch.profiler``'s
memory events: every tensor the step allocates, temporaries included (not the process RSS).

Usage::

    python benchmarks/bench_step.py [--quick] [--threads 1] [--compile]

writes ``benchmarks/results/step_time.json`` and ``step_time.md`` (``step_time_compiled.*``
with ``--compile``, which runs dualflow's element-wise kernels through ``torch.compile``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dualflow as df

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import cnn_builder, mlp_builder, peak_step_bytes

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 50_000
LR = 1e-3


# ----------------------------------------------------------------------------- networks
def mlp(bayes: bool) -> nn.Module:
    """The dualflow MLP (``gpu_check.py`` imports it from here)."""
    return mlp_builder(bayes)


def cnn(bayes: bool) -> nn.Module:
    """The dualflow CNN (``gpu_check.py`` imports it from here)."""
    return cnn_builder(bayes)


# plain torch networks with the layers of bench_methods' dualflow builders
def torch_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
    )


def torch_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class BTNet(nn.Module):
    """A bayesian-torch network: its layers return ``(out, kl)``; ``forward`` sums the KLs."""

    def __init__(self, arch: str, flipout: bool) -> None:
        super().__init__()
        from bayesian_torch.layers import (
            Conv2dFlipout,
            Conv2dReparameterization,
            LinearFlipout,
            LinearReparameterization,
        )

        lin = LinearFlipout if flipout else LinearReparameterization
        conv = Conv2dFlipout if flipout else Conv2dReparameterization
        self.arch = arch
        if arch == "mlp":
            self.layers = nn.ModuleList([lin(784, 400), lin(400, 400), lin(400, 10)])
        else:
            convs = [conv(3, 32, 3, padding=1), conv(32, 64, 3, padding=1), conv(64, 64, 3, padding=1)]
            self.layers = nn.ModuleList([*convs, lin(64, 10)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl = x.new_zeros(())
        if self.arch == "mlp":
            h = x.flatten(1)
            for i, layer in enumerate(self.layers):
                h, k = layer(h)
                kl = kl + k
                if i < len(self.layers) - 1:
                    h = torch.relu(h)
            return h, kl
        h = x
        for i, layer in enumerate(self.layers[:3]):
            h, k = layer(h)
            kl = kl + k
            h = torch.relu(h)
            if i < 2:
                h = F.max_pool2d(h, 2)
        h, k = self.layers[3](h.mean((-2, -1)))
        return h, kl + k


# ----------------------------------------------------------------------------- steps
Step = tuple[Callable[[], None], nn.Module, torch.optim.Optimizer]


def _adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR, fused=True)  # as dualflow.train uses


def step_torch(arch: str, x, y) -> Step:
    model = torch_mlp() if arch == "mlp" else torch_cnn()
    opt = _adam(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, model, opt


# ``--pool-correlation``: the window-correlation mode of every max pool of the dualflow models
# (``None``: the library default). Correlations make the pooled means far more accurate
# (benchmarks/results/moments.md) and cost a convolution-sized computation per pool.
POOL_CORRELATION: str | None = None


def _step_dualflow(arch: str, x, y, bayes: bool, checks: bool) -> Step:
    model = (mlp_builder if arch == "mlp" else cnn_builder)(bayes)
    df.nn.set_checks(model, checks)
    if POOL_CORRELATION is not None:
        df.nn.set_max_pool(model, correlation=POOL_CORRELATION)
    opt = _adam(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = df.losses.categorical_nll(model(x), y)
        if bayes:
            loss = loss + df.nn.kl(model) / N_TRAIN
        loss.backward()
        opt.step()

    return step, model, opt


def step_bt(arch: str, x, y, flipout: bool) -> Step:
    model = BTNet(arch, flipout)
    opt = _adam(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out, kl = model(x)
        (F.cross_entropy(out, y) + kl / N_TRAIN).backward()
        opt.step()

    return step, model, opt


def step_ivon(arch: str, x, y) -> Step:
    import ivon

    model = torch_mlp() if arch == "mlp" else torch_cnn()
    opt = ivon.IVON(model.parameters(), lr=0.1, ess=N_TRAIN, mc_samples=1)

    def step() -> None:
        with opt.sampled_params(train=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, model, opt


METHODS: dict[str, tuple[str | None, Callable[..., Step]]] = {
    "torch": (None, step_torch),
    "df-point": (None, lambda a, x, y: _step_dualflow(a, x, y, bayes=False, checks=False)),
    "bp": (None, lambda a, x, y: _step_dualflow(a, x, y, bayes=True, checks=False)),
    "bp-checked": (None, lambda a, x, y: _step_dualflow(a, x, y, bayes=True, checks=True)),
    "bt-reparam": ("bayesian_torch", lambda a, x, y: step_bt(a, x, y, flipout=False)),
    "bt-flipout": ("bayesian_torch", lambda a, x, y: step_bt(a, x, y, flipout=True)),
    "ivon": ("ivon", step_ivon),
}


def available_methods() -> tuple[list[str], dict[str, str]]:
    ok, missing = [], {}
    for name, (pkg, _) in METHODS.items():
        if pkg is None or importlib.util.find_spec(pkg) is not None:
            ok.append(name)
        else:
            missing[name] = f"package {pkg!r} not installed"
    return ok, missing


# ----------------------------------------------------------------------------- memory
# _live_bytes and peak_step_bytes live in bench_methods (imported above; the prototypes import
# peak_step_bytes from here).


# ----------------------------------------------------------------------------- driver
SHAPES = {"mlp": (1, 28, 28), "cnn": (3, 32, 32)}
TITLES = {"mlp": "MLP 784-400-400-10", "cnn": "CNN 3x32x32 (3 conv + 2 max-pool + global avg pool)"}


def bench_case(arch: str, batch: int, methods: list[str], rounds: int, warmup: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, *SHAPES[arch])
    y = torch.randint(0, 10, (batch,))
    steps: dict[str, Step] = {}
    for name in methods:
        torch.manual_seed(0)
        steps[name] = METHODS[name][1](arch, x, y)
    times: dict[str, list[float]] = {n: [] for n in methods}
    for r in range(warmup + rounds):
        for n in methods:  # interleaved: noise hits all alike
            t0 = time.perf_counter()
            steps[n][0]()
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    mem = {n: peak_step_bytes(*steps[n]) for n in methods}
    return [
        {
            "arch": arch,
            "batch": batch,
            "method": n,
            "rounds": rounds,
            "step_ms": 1e3 * med[n],
            "time_ratio": med[n] / med["torch"],
            "peak_mb": mem[n] / 2**20,
            "mem_ratio": mem[n] / mem["torch"],
        }
        for n in methods
    ]


PLAN = {
    "mlp": [(32, 60), (128, 40), (512, 20), (2048, 8)],
    "cnn": [(32, 10), (64, 8), (128, 5)],
}
QUICK = {"mlp": [(128, 3)], "cnn": [(32, 1)]}


def write_markdown(path: Path, meta: dict, rows: list[dict]) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    md = [
        "# Training-step cost: dualflow BP and the installed peers vs a plain torch step",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}, CPU, {meta['threads']} thread(s), "
        f"compiled kernels: {meta['compiled_kernels']}, total {meta['seconds']:.0f} s. "
        "Shared machine: absolute times are noisy, ratios less so (all methods of a case "
        "interleaved round by round, median over rounds).",
        "",
        "Reference `torch`: plain `torch.nn` network, cross-entropy, `Adam(fused=True)`. "
        "`bp`: dualflow moments, loss + KL/N, fused Adam, input checks off (`bp-checked`: on). "
        "`bt-*`: bayesian-torch 0.5 layers (one weight sample per step), fused Adam. "
        "`ivon`: ivon-opt IVON on the torch network, 1 MC sample.",
    ]
    if meta["skipped"]:
        md += ["", "Skipped (absent): " + ", ".join(f"{k} ({v})" for k, v in meta["skipped"].items()) + "."]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        sub = [r for r in rows if r["arch"] == arch]
        batches = sorted({r["batch"] for r in sub})
        for key, unit, title in (
            ("step_ms", "time_ratio", "time per step, ms (ratio to torch)"),
            ("peak_mb", "mem_ratio", "peak step memory, MB (ratio to torch)"),
        ):
            md += [
                "",
                f"## {TITLES[arch]}: {title}",
                "",
                "| method | " + " | ".join(f"B={b}" for b in batches) + " |",
                "|---|" + "---|" * len(batches),
            ]
            for n in methods:
                cells = []
                for b in batches:
                    r = next((r for r in sub if r["method"] == n and r["batch"] == b), None)
                    cells.append("-" if r is None else f"{r[key]:.1f} ({r[unit]:.2f}x)")
                md.append(f"| {n} | " + " | ".join(cells) + " |")
    md.append("")
    path.write_text("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one small case per architecture (smoke run)")
    ap.add_argument("--arch", nargs="*", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--methods", nargs="*", default=None, help="subset (torch always runs)")
    ap.add_argument("--compile", action="store_true", help="dualflow.rules.enable_compile(True)")
    ap.add_argument("--out", default=None, help="default: results/step_time[_compiled].json")
    ap.add_argument(
        "--pool-correlation",
        default=None,
        choices=["smooth", "meanfield", "none"],
        help="window correlations of the dualflow max pools (default: the library's)",
    )
    args = ap.parse_args()
    global POOL_CORRELATION
    POOL_CORRELATION = args.pool_correlation
    if args.out is None:
        args.out = str(RESULTS / ("step_time_compiled.json" if args.compile else "step_time.json"))
    if args.compile:
        df.rules.enable_compile(True)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    ok, skipped = available_methods()
    methods = [m for m in ok if args.methods is None or m in args.methods or m == "torch"]
    for name, why in skipped.items():
        print(f"skip {name}: {why}", flush=True)
    t_start = time.perf_counter()
    plan = QUICK if args.quick else PLAN
    rows: list[dict] = []
    for arch in args.arch:
        for batch, rounds in plan[arch]:
            t0 = time.perf_counter()
            case = bench_case(arch, batch, methods, rounds=rounds, warmup=2)
            rows += case
            print(
                f"{arch} B={batch}: "
                + ", ".join(f"{r['method']} {r['time_ratio']:.2f}x/{r['mem_ratio']:.2f}x" for r in case)
                + f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    meta = {
        "command": "python " + " ".join(["benchmarks/bench_step.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "compiled_kernels": args.compile,
        "pool_correlation": args.pool_correlation or "library default",
        "n_train": N_TRAIN,
        "skipped": skipped,
        "seconds": time.perf_counter() - t_start,
        "memory": "live params+grads+optimizer state+buffers at step start + peak running sum of "
        "torch.profiler memory events during the step",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    write_markdown(out.with_suffix(".md"), meta, rows)
    print(f"wrote {out} and {out.with_suffix('.md')} in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
