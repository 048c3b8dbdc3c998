"""Where the time of one BP training step goes (MLP and small CNN of ``bench_step.py``).

Two views, both of the library's step as ``bench_step.py`` runs it (``categorical_nll +
kl / N``, fused Adam, input checks off):

1. Line timings: every component of the step, run alone (forward + backward on the exact
   tensors the step sees, captured by forward hooks), interleaved round by round with the
   whole BP step and the whole point step; median over rounds. Components:
   ``variances`` (``softplus(rho)^2`` of every weight and bias), ``kl`` (the KL given the
   variances), ``mean maps`` (``A_mu(m) + b``), ``variance maps`` (the rest of
   ``rules.linear`` / ``rules.conv``: ``mu^2``, concatenations, the doubled map), ``relu``
   (closed-form moments), ``max-pool`` (Clark), ``loss`` (probit cross-entropy),
   ``adam`` (``opt.step()`` over ``mu`` and ``rho``), ``zero_grad``, and ``checks`` (the
   same step with input validation on, minus the step). ``rest`` = step minus the
   components: autograd bookkeeping, gradient accumulation of parameters used in several
   places, Python and module overhead.
2. ``torch.profiler``: self CPU time per op of one BP step (top ops).

Usage::

    python benchmarks/profile_step.py [--rounds 30] [--threads 1]

writes ``benchmarks/results/profile_step.json`` and ``profile_step.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import dualflow as df
from dualflow import rules
from dualflow.gaussian import Gaussian
from dualflow.nn.base import BayesLayer, kl_normal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import cnn_builder, mlp_builder

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 50_000
CASES = {"mlp": (mlp_builder, (128, 1, 28, 28)), "cnn": (cnn_builder, (64, 3, 32, 32))}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _fwd_bwd(fn: Callable[[], object]) -> Callable[[], None]:
    """Run ``fn`` (returning tensors) and backpropagate ones through every output."""

    def run() -> None:
        out = fn()
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o is not None]
        outs = [t for o in outs for t in (o if isinstance(o, Gaussian) else [o])]
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bayes: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = df.losses.categorical_nll(model(x), y)
        if bayes:
            loss = loss + df.nn.kl(model) / N_TRAIN
        loss.backward()
        opt.step()

    return step, opt


def components(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt) -> dict[str, list]:
    """Per component a list of zero-argument callables (one per layer) that redo its work."""
    captured: list[tuple[torch.nn.Module, object, object]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: captured.append((mod, inp[0], out)))
        for m in model.modules()
        if m is not model and not list(m.children())
    ]
    out = model(x)
    for h in hooks:
        h.remove()
    comps: dict[str, list] = {k: [] for k in ("variances", "kl", "mean maps", "variance maps", "relu")}
    comps["max-pool"] = []

    def split(t):
        if isinstance(t, Gaussian):
            return _leaf(t.mean), _leaf(t.var)
        return _leaf(t), None

    for mod, inp, _ in captured:
        if isinstance(mod, BayesLayer) and mod.bayes:
            for mu, rho in mod.variational_pairs():
                r = _leaf(rho)
                comps["variances"].append(_fwd_bwd(lambda r=r: F.softplus(r).square()))
                m_, v_ = _leaf(mu), _leaf(F.softplus(rho).square())
                s0 = mod.prior_var
                comps["kl"].append(_fwd_bwd(lambda m_=m_, v_=v_, s0=s0: kl_normal(m_, v_, s0) / N_TRAIN))
            m, v = split(inp)
            wm, wv = _leaf(mod.weight_mu), _leaf(mod.weight_var)
            bm = _leaf(mod.bias_mu) if mod.bias_mu is not None else None
            bv = _leaf(mod.bias_var) if mod.bias_mu is not None else None
            if isinstance(mod, df.nn.Linear):
                comps["mean maps"].append(_fwd_bwd(lambda m=m, wm=wm, bm=bm: F.linear(m, wm, bm)))
                full = _fwd_bwd(
                    lambda m=m, v=v, wm=wm, wv=wv, bm=bm, bv=bv: rules.linear(m, v, wm, wv, bm, bv)
                )
            else:
                kw = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
                mean_map = _fwd_bwd(lambda m=m, wm=wm, bm=bm, kw=kw: F.conv2d(m, wm, bm, **kw))
                comps["mean maps"].append(mean_map)
                full = _fwd_bwd(
                    lambda m=m, v=v, wm=wm, wv=wv, bm=bm, bv=bv, kw=kw: rules.conv(m, v, wm, wv, bm, bv, **kw)
                )
            comps["variance maps"].append(("minus", full, comps["mean maps"][-1]))
        elif isinstance(mod, df.nn.ReLU):
            m, v = split(inp)
            comps["relu"].append(_fwd_bwd(lambda m=m, v=v: rules.relu(m, v)))
        elif isinstance(mod, df.nn.MaxPool2d):
            m, v = split(inp)
            comps["max-pool"].append(_fwd_bwd(lambda m=m, v=v, mod=mod: mod(Gaussian(m, v))))
    lm, lv = split(out)
    comps["loss"] = [_fwd_bwd(lambda: df.losses.categorical_nll(Gaussian(lm, lv), y))]
    comps["adam"] = [lambda: opt.step()]
    comps["zero_grad"] = [lambda: None]  # timed separately below (needs grads present)
    return comps


def line_timings(arch: str, rounds: int) -> dict:
    builder, shape = CASES[arch]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    bp, point = builder(True), builder(False)
    checked = builder(True)
    checked.load_state_dict(bp.state_dict())
    df.nn.set_checks(bp, False)
    df.nn.set_checks(point, False)
    step_bp, opt_bp = make_step(bp, x, y, True)
    step_pt, _ = make_step(point, x, y, False)
    step_ck, _ = make_step(checked, x, y, True)
    step_bp()
    comps = components(bp, x, y, opt_bp)

    def zero_grad_with_grads() -> float:
        # zero_grad alone: give every parameter a gradient, then time set_to_none
        for p in bp.parameters():
            p.grad = torch.zeros_like(p)
        t0 = time.perf_counter()
        opt_bp.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    names = ["bp step", "point step", "bp step (checks on)", *comps]
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 2):
        row: dict[str, float] = {}
        for name, fn in (("bp step", step_bp), ("point step", step_pt), ("bp step (checks on)", step_ck)):
            t0 = time.perf_counter()
            fn()
            row[name] = time.perf_counter() - t0
        for name, fns in comps.items():
            total = 0.0
            for f in fns:
                if isinstance(f, tuple):  # ("minus", full, part): full - part
                    _, full, part = f
                    t0 = time.perf_counter()
                    full()
                    t1 = time.perf_counter()
                    part()
                    total += (t1 - t0) - (time.perf_counter() - t1)
                else:
                    t0 = time.perf_counter()
                    f()
                    total += time.perf_counter() - t0
            row[name] = total
        row["zero_grad"] = zero_grad_with_grads()
        if r >= 2:
            for k, v in row.items():
                times[k].append(v)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    step = med["bp step"]
    parts = {k: med[k] for k in comps}
    parts["checks (off in the step)"] = med["bp step (checks on)"] - step
    rest = step - sum(v for k, v in parts.items() if not k.startswith("checks"))
    return {
        "arch": arch,
        "batch": shape[0],
        "rounds": rounds,
        "bp_step_ms": step,
        "point_step_ms": med["point step"],
        "ratio": step / med["point step"],
        "parts_ms": parts,
        "rest_ms": rest,
    }


def op_table(arch: str, top: int = 18) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    builder, shape = CASES[arch]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    bp = builder(True)
    df.nn.set_checks(bp, False)
    step, _ = make_step(bp, x, y, True)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev)
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / 5,
            "self_ms_per_step": e.self_cpu_time_total / 5 / 1e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in ev[:top]
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", nargs="*", default=["mlp", "cnn"])
    ap.add_argument("--out", default=str(RESULTS / "profile_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    lines, ops = [], {}
    for arch in args.arch:
        rounds = args.rounds if arch == "mlp" else max(5, args.rounds // 4)
        res = line_timings(arch, rounds)
        lines.append(res)
        print(f"{arch}: bp {res['bp_step_ms']:.1f} ms, point {res['point_step_ms']:.1f} ms", flush=True)
        for k, v in res["parts_ms"].items():
            print(f"  {k:28s} {v:8.2f} ms  {100 * v / res['bp_step_ms']:5.1f}%")
        print(f"  {'rest':28s} {res['rest_ms']:8.2f} ms  {100 * res['rest_ms'] / res['bp_step_ms']:5.1f}%")
        ops[arch] = op_table(arch)
    cmd = "python " + " ".join(["benchmarks/profile_step.py", *sys.argv[1:]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": cmd, "torch": torch.__version__, "threads": args.threads}
    meta["seconds"] = time.perf_counter() - t_start
    out.write_text(json.dumps({"meta": meta, "line_timings": lines, "ops": ops}, indent=2))
    md = [
        "# Where one BP training step spends its time",
        "",
        f"Command: `{cmd}`; torch {torch.__version__}, CPU, {args.threads} thread(s), "
        f"{meta['seconds']:.0f} s. Components run alone (forward + backward on the tensors the "
        "step sees), interleaved with the whole steps; medians over rounds. Shared machine: "
        "the parts do not add up exactly (cache state differs when run alone).",
    ]
    for res in lines:
        s = res["bp_step_ms"]
        md += [
            "",
            f"## {res['arch'].upper()}, batch {res['batch']}: BP step {s:.1f} ms, point step "
            f"{res['point_step_ms']:.1f} ms ({res['ratio']:.2f}x)",
            "",
            "| component | ms | share of the BP step | point steps |",
            "|---|---|---|---|",
        ]
        for k, v in res["parts_ms"].items():
            md.append(f"| {k} | {v:.2f} | {100 * v / s:.1f}% | {v / res['point_step_ms']:.2f} |")
        r = res["rest_ms"]
        md.append(f"| rest (autograd, accumulation, Python) | {r:.2f} | {100 * r / s:.1f}% | "
                  f"{r / res['point_step_ms']:.2f} |")  # fmt: skip
    for arch, rows in ops.items():
        md += [
            "",
            f"## {arch.upper()}: top ops of one BP step (torch.profiler, self CPU time)",
            "",
            "| op | calls / step | self ms / step | share |",
            "|---|---|---|---|",
        ]
        for r in rows:
            md.append(
                f"| `{r['op']}` | {r['calls_per_step']:.0f} | {r['self_ms_per_step']:.2f} "
                f"| {100 * r['share']:.1f}% |"
            )
    md.append("")
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
