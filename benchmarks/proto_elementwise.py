"""The element-wise side of the CNN's BP cost: ReLU and Clark max-pool moments.

For the small CNN of ``bench_step.py`` (3 conv, 2 max-pool, global average pool), times
in one process, interleaved round by round, medians:

* the BP training step (forward + probit loss + KL/N + backward + fused Adam) and the BP
  predictive (one moment pass, ``Method.predict``) against a plain torch step and against
  32-sample Monte Carlo (``reparam`` propagation, ``Method.predict(samples=32)``), for:

  - ``library``: the library's modules as they are (conv -> ReLU -> max-pool);
  - ``relu kernels before``: the ReLU's previous kernels (out-of-place temporaries), for
    the gain of this branch's in-place ReLU kernels;
  - ``pool before ReLU``: conv -> max-pool -> ReLU (the rewrite "moments" is adding: the
    ReLU then runs on a 4x smaller map; a different, more accurate approximation of the
    same network, not the same numbers);
  - ``in-place Clark``: Clark's max with in-place forward/backward kernels (this file's
    prototype, bitwise equal to ``rules._max2_forward`` / ``rules._max2_backward``);
  - both rewrites together, with a one-``erfc`` Clark forward, and with the whole 2x2 Clark
    tree as one autograd node on contiguous regrouped windows (the first-level pairs as one
    call; no zero-filled gradient per strided view), alone and with pool before ReLU;
  - ``floor``: average-pool moments in place of Clark's max (a different network: the cost
    the step would have if max-pooling were as cheap as average pooling).

* an op-level split of one BP predictive pass (``torch.profiler``).

Usage::

    python benchmarks/proto_elementwise.py [--quick]

writes ``benchmarks/results/proto_elementwise.json`` and ``proto_elementwise.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import dualflow as df
import dualflow.methods as dm
from dualflow import rules
from dualflow.gaussian import Gaussian

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import peak_step_bytes, step_torch

RESULTS = Path(__file__).resolve().parent / "results"
N_TRAIN = 50_000
_K = rules._INV_SQRT_2PI


# ----------------------------------------------------------------------------- Clark, in place
def _ndtr_(x: Tensor) -> Tensor:
    """``torch.special.ndtr`` = ``(1 + erf(x / sqrt 2)) / 2`` written in place (``x`` is consumed)."""
    return x.mul_(0.7071067811865476).erf_().add_(1.0).mul_(0.5)


def max2_forward_inplace(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """``rules._max2_forward`` with its temporaries reused in place (same ops, same order)."""
    first = m1 >= m2
    ma = torch.maximum(m1, m2)
    va = torch.where(first, v1, v2)
    del first
    th2 = torch.add(v1, v2).clamp_min_(rules.var_floor(m1.dtype))
    vb = torch.sub(th2, va)
    th = th2.sqrt_()
    d = torch.sub(m1, m2).abs_()
    a = torch.div(d, th).clamp_max_(rules._relu_tail(m1.dtype))
    cdf = _ndtr_(torch.mul(a, 1.0))
    ccdf = _ndtr_(torch.neg(a))
    pdf = torch.mul(a, -0.5).mul_(a).exp_().mul_(_K)
    shift = torch.mul(th, pdf).sub_(torch.mul(d, ccdf))  # E[max] - ma
    second = va.mul_(cdf).add_(torch.mul(d, d).add_(vb).mul_(ccdf)).sub_(d.mul_(th).mul_(pdf))
    var = second.sub_(torch.mul(shift, shift)).clamp_min_(0.0)
    return ma.add_(shift), var


def max2_backward_inplace(g_mu, g_var, m1, v1, m2, v2, mu) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``rules._max2_backward`` with temporaries reused in place (same ops, same order)."""
    c = rules._relu_tail(m1.dtype)
    th2 = torch.add(v1, v2).clamp_min_(rules.var_floor(m1.dtype))
    th = th2.sqrt()
    a = torch.sub(m1, m2).div_(th).clamp_(-c, c)
    p1 = _ndtr_(torch.mul(a, 1.0))
    p2 = torch.rsub(p1, 1.0)
    q = torch.mul(a, -0.5).mul_(a).exp_().mul_(th.reciprocal_().mul_(_K))  # exp(-a^2/2) (K / th)
    t = torch.mul(mu, 2.0).mul_(g_var)
    gt = torch.sub(g_mu, t, out=t)
    g2 = torch.mul(g_var, 2.0)
    cross = torch.mul(m1, v2).add_(torch.mul(m2, v1)).mul_(q).div_(th2)
    g_m1 = torch.mul(gt, p1).add_(torch.mul(m1, p1).add_(torch.mul(v1, q)).mul_(g2))
    g_m2 = torch.mul(gt, p2).add_(torch.mul(m2, p2).add_(torch.mul(v2, q)).mul_(g2))
    half_q_gt = q.mul_(0.5).mul_(gt)
    g_v1 = torch.add(p1, cross).mul_(g_var).add_(half_q_gt)
    g_v2 = p2.add_(cross).mul_(g_var).add_(half_q_gt)
    return g_m1, g_v1, g_m2, g_v2


def max2_forward_erfc(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """As :func:`max2_forward_inplace` but ``Phi(-a) = erfc(a / sqrt 2) / 2`` (one transcendental,
    accurate in the upper tail, where ``ndtr(-a)`` cancels) and ``Phi(a) = 1 - Phi(-a)``
    (``a >= 0``, so nothing cancels). Not bitwise the library's: a candidate for "moments"."""
    first = m1 >= m2
    ma = torch.maximum(m1, m2)
    va = torch.where(first, v1, v2)
    del first
    th2 = torch.add(v1, v2).clamp_min_(rules.var_floor(m1.dtype))
    vb = torch.sub(th2, va)
    th = th2.sqrt_()
    d = torch.sub(m1, m2).abs_()
    a = torch.div(d, th).clamp_max_(rules._relu_tail(m1.dtype))
    ccdf = torch.mul(a, 0.7071067811865476).erfc_().mul_(0.5)
    cdf = torch.rsub(ccdf, 1.0)
    pdf = a.mul_(-0.5).mul_(torch.div(d, th).clamp_max_(rules._relu_tail(m1.dtype))).exp_().mul_(_K)
    shift = torch.mul(th, pdf).sub_(torch.mul(d, ccdf))
    second = va.mul_(cdf).add_(torch.mul(d, d).add_(vb).mul_(ccdf)).sub_(d.mul_(th).mul_(pdf))
    var = second.sub_(torch.mul(shift, shift)).clamp_min_(0.0)
    return ma.add_(shift), var


class _Max2Erfc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m1, v1, m2, v2):  # type: ignore[override]
        mean, var = max2_forward_erfc(m1, v1, m2, v2)
        ctx.save_for_backward(m1, v1, m2, v2, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mu, g_var):  # type: ignore[override]
        return max2_backward_inplace(g_mu, g_var, *ctx.saved_tensors)


class _Max2InPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m1, v1, m2, v2):  # type: ignore[override]
        mean, var = max2_forward_inplace(m1, v1, m2, v2)
        ctx.save_for_backward(m1, v1, m2, v2, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mu, g_var):  # type: ignore[override]
        return max2_backward_inplace(g_mu, g_var, *ctx.saved_tensors)


def _regroup(t: Tensor) -> Tensor:
    """``(B, C, H, W) -> (2, 2, B, C, H/2, W/2)`` contiguous: ``[i, j]`` is window position
    ``(i, j)`` of every 2x2 window (one copy; every later op then reads contiguous memory)."""
    b, c, h, w = t.shape
    return t.view(b, c, h // 2, 2, w // 2, 2).permute(3, 5, 0, 1, 2, 4).contiguous()


def _ungroup(t: Tensor) -> Tensor:
    """Inverse of :func:`_regroup` (one copy)."""
    _, _, b, c, h2, w2 = t.shape
    return t.permute(2, 3, 4, 0, 5, 1).reshape(b, c, 2 * h2, 2 * w2)


class _ClarkPool2x2(torch.autograd.Function):
    """The whole 2x2 Clark tree (the library's pairing: (0,1), (2,3), then the two maxima) as
    one autograd node over contiguous regrouped windows: the two first-level maxima run as
    one call on stacked pairs, and the backward writes one gradient tensor (one copy) instead
    of autograd's zero-filled full-size gradient per strided view plus the adds that
    accumulate them."""

    @staticmethod
    def forward(ctx, m, v):  # type: ignore[override]
        qm, qv = _regroup(m), _regroup(v)  # [i, j]: row i, column j of each window
        am, av = max2_forward_inplace(qm[:, 0], qv[:, 0], qm[:, 1], qv[:, 1])  # rows: (0,1), (2,3)
        om, ov = max2_forward_inplace(am[0], av[0], am[1], av[1])
        # saving the regrouped copies was faster than regrouping again in backward, and
        # peaked lower in memory, in a trial run (the backward's gradient temporaries
        # coexist with the second copy)
        ctx.save_for_backward(qm, qv, am, av, om)
        return om, ov

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_om, g_ov):  # type: ignore[override]
        qm, qv, am, av, om = ctx.saved_tensors
        g0m, g0v, g1m, g1v = max2_backward_inplace(g_om, g_ov, am[0], av[0], am[1], av[1], om)
        g_am, g_av = torch.stack([g0m, g1m]), torch.stack([g0v, g1v])
        gq = max2_backward_inplace(g_am, g_av, qm[:, 0], qv[:, 0], qm[:, 1], qv[:, 1], am)
        gm = torch.stack([gq[0], gq[2]], dim=1)
        gv = torch.stack([gq[1], gq[3]], dim=1)
        return _ungroup(gm), _ungroup(gv)


class ClarkPool2x2OneNode(df.nn.MaxPool2d):
    """2x2 / stride-2 Clark max-pool as one autograd node (in-place kernels)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x):
        if not isinstance(x, Gaussian) or x.mean.shape[-1] % 2 or x.mean.shape[-2] % 2:
            return super().forward(x)
        return Gaussian(*_ClarkPool2x2.apply(*x))


class ClarkPool2x2InPlace(df.nn.MaxPool2d):
    """2x2 / stride-2 Clark max-pool (the library's pairwise tree) with the in-place kernels
    (``erfc=True``: the one-erfc forward of :func:`max2_forward_erfc`)."""

    def __init__(self, erfc: bool = False) -> None:
        super().__init__(2)
        self.fn = _Max2Erfc.apply if erfc else _Max2InPlace.apply

    def forward(self, x):
        if not isinstance(x, Gaussian):
            return super().forward(x)
        m, v = x
        q = [(m[..., i::2, j::2], v[..., i::2, j::2]) for i in range(2) for j in range(2)]
        a = self.fn(*q[0], *q[1])
        b = self.fn(*q[2], *q[3])
        return Gaussian(*self.fn(*a, *b))


class _ReLUOldKernels(torch.autograd.Function):
    """The ReLU's analytic-backward path with the previous out-of-place kernels."""

    @staticmethod
    def forward(ctx, m, v):  # type: ignore[override]
        mean, var, cdf, pdf_s = rules._relu_moments.fn(m, v)
        ctx.save_for_backward(cdf, pdf_s, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_var):  # type: ignore[override]
        return rules._relu_backward.fn(g_mean, g_var, *ctx.saved_tensors)


class ReLUOldKernels(df.nn.ReLU):
    def forward(self, x):
        if not isinstance(x, Gaussian):
            return super().forward(x)
        return Gaussian(*_ReLUOldKernels.apply(*x))


def check_pool_node() -> dict:
    """The one-node 2x2 Clark pool against ``df.nn.MaxPool2d(2)``: outputs and input gradients."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    w1, w2 = torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    res = []
    for pool in (df.nn.MaxPool2d(2), ClarkPool2x2OneNode()):
        o = pool(Gaussian(m, v))
        gm, gv = torch.autograd.grad((w1 * o.mean + w2 * o.var).sum(), (m, v))
        res.append((o.mean.detach(), o.var.detach(), gm, gv))
    return {"max_abs_diff": [float((a - b).abs().max()) for a, b in zip(*res)]}


def check_bitwise() -> dict:
    """The in-place Clark kernels against the library's, to the bit (float32 and float64)."""
    out = {}
    for dt in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(0)
        n = 50_000
        m1, m2 = (torch.randn(2, n, generator=g, dtype=torch.float64) * 3).to(dt)
        v1, v2 = (torch.rand(2, n, generator=g, dtype=torch.float64) * 2).to(dt)
        v1[:100] = 0.0
        v2[:50] = 0.0
        m2[:20] = m1[:20]
        ref = rules._max2_forward.fn(m1, v1, m2, v2)
        got = max2_forward_inplace(m1, v1, m2, v2)
        gm, gv = torch.randn(2, n, generator=g, dtype=torch.float64).to(dt)
        refb = rules._max2_backward.fn(gm, gv, m1, v1, m2, v2, ref[0])
        gotb = max2_backward_inplace(gm, gv, m1, v1, m2, v2, ref[0])
        erf_v = max2_forward_erfc(m1, v1, m2, v2)
        out[str(dt) + " one-erfc vs library, max |diff| / max |library|"] = [
            float((a - b).abs().max() / b.abs().max()) for a, b in zip(erf_v, ref)
        ]
        out[str(dt)] = {
            "forward_equal": [bool(torch.equal(a, b)) for a, b in zip(got, ref)],
            "forward_max_rel_diff": [
                float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()) for a, b in zip(got, ref)
            ],
            "backward_equal": [bool(torch.equal(a, b)) for a, b in zip(gotb, refb)],
            "backward_max_abs_diff": [float((a - b).abs().max()) for a, b in zip(gotb, refb)],
        }
    return out


# ----------------------------------------------------------------------------- networks
def builder(pool_first: bool, clark_inplace: bool | str, old_relu: bool):
    dn = df.nn

    def build(bayes: bool, dropout: float = 0.0) -> torch.nn.Module:
        def relu():
            return ReLUOldKernels() if old_relu else dn.ReLU()

        def pool():
            if clark_inplace == "avg":  # cost floor only: exact average-pool moments
                return dn.AvgPool2d(2)
            if clark_inplace == "node":
                return ClarkPool2x2OneNode()
            return ClarkPool2x2InPlace(erfc=clark_inplace == "erfc") if clark_inplace else dn.MaxPool2d(2)

        def block(cin, cout):
            conv = dn.Conv2d(cin, cout, 3, padding=1, bayes=bayes)
            return [conv, pool(), relu()] if pool_first else [conv, relu(), pool()]

        return dn.Sequential(
            *block(3, 32),
            *block(32, 64),
            dn.Conv2d(64, 64, 3, padding=1, bayes=bayes),
            relu(),
            dn.GlobalAvgPool2d(),
            dn.Linear(64, 10, bayes=bayes),
        )

    return build


VARIANTS = {
    "library": (False, False, False),
    "relu kernels before (out-of-place)": (False, False, True),
    "in-place Clark": (False, True, False),
    "pool before ReLU": (True, False, False),
    "pool before ReLU + in-place Clark": (True, True, False),
    "pool before ReLU + in-place one-erfc Clark": (True, "erfc", False),
    "2x2 Clark as one node (in place, contiguous)": (False, "node", False),
    "pool before ReLU + 2x2 Clark as one node (in place, contiguous)": (True, "node", False),
    # not the same network: what the step would cost if max-pooling were as cheap as avg-pooling
    "floor: pool before ReLU, avg-pool moments instead of Clark": (True, "avg", False),
}


def make_method(name: str, build, samples: int = 32) -> dm.Method:
    torch.manual_seed(0)
    m = dm.create(name, build, task="classification", samples=samples)
    df.nn.set_checks(m, False)
    return m


def bench_train(batch: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    steps = {"torch": step_torch("cnn", x, y)}
    for name, cfg in VARIANTS.items():
        meth = make_method("bp", builder(*cfg))
        opt = torch.optim.Adam(meth.parameters(), lr=1e-3, fused=True)
        meth.train()

        def step(meth=meth, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            (meth.loss(x, y) + df.nn.kl(meth) / N_TRAIN).backward()
            opt.step()

        steps[name] = (step, meth, opt)
    times = {k: [] for k in steps}
    for r in range(rounds + 1):
        for k, (fn, _, _) in steps.items():
            t0 = time.perf_counter()
            fn()
            if r >= 1:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: peak_step_bytes(*v) for k, v in steps.items()}
    return [
        {
            "batch": batch,
            "variant": k,
            "step_ms": 1e3 * med[k],
            "ratio_to_torch": med[k] / med["torch"],
            "mem_ratio_to_torch": mem[k] / mem["torch"],
        }
        for k in steps
    ]


@torch.no_grad()
def bench_predict(batch: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    runs = {"MC 32 (reparam)": make_method("reparam", builder(False, False, False), samples=32)}
    for name, cfg in VARIANTS.items():
        runs[f"BP, {name}"] = make_method("bp", builder(*cfg))
    for m in runs.values():
        m.eval()
    times = {k: [] for k in runs}
    for r in range(rounds + 1):
        for k, m in runs.items():
            t0 = time.perf_counter()
            m.predict(x, batch_size=batch)
            if r >= 1:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mc = med["MC 32 (reparam)"]
    return [{"batch": batch, "run": k, "ms": 1e3 * v, "mc32_over_this": mc / v} for k, v in med.items()]


def predictive_ops(batch: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    m = make_method("bp", builder(False, False, False))
    m.eval()
    m.predict(x, batch_size=batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            m.predict(x, batch_size=batch)
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ev)
    return [
        {
            "op": e.key,
            "calls": e.count / 2,
            "self_ms": e.self_cpu_time_total / 2e3,
            "share": e.self_cpu_time_total / total,
        }
        for e in ev[:14]
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "proto_elementwise.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    bits = check_bitwise()
    key = "one-node 2x2 pool vs library MaxPool2d (mean, var, grad m, grad v)"
    bits[key] = check_pool_node()["max_abs_diff"]
    print("bitwise:", json.dumps(bits), flush=True)
    train = bench_train(64, 2 if args.quick else 12)
    for r in train:
        print(f"train {r['variant']:40s} {r['step_ms']:8.1f} ms {r['ratio_to_torch']:.2f}x torch "
              f"mem {r['mem_ratio_to_torch']:.2f}x", flush=True)  # fmt: skip
    pred = bench_predict(128, 2 if args.quick else 8)
    for r in pred:
        print(f"predict {r['run']:45s} {r['ms']:8.1f} ms  MC32/this {r['mc32_over_this']:.2f}", flush=True)
    ops = predictive_ops(128)
    meta = {
        "command": "python " + " ".join(["benchmarks/proto_elementwise.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": args.threads,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "bitwise": bits, "train": train, "predict": pred, "ops": ops}, indent=2)
    )
    md = [
        "# CNN element-wise costs: ReLU and Clark max-pool moments (`benchmarks/proto_elementwise.py`)",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}, CPU, {args.threads} thread(s), "
        f"{meta['seconds']:.0f} s; runs interleaved round by round, medians. Shared machine: "
        "absolute times are noisy, ratios less so.",
        "",
        "## Training step, batch 64 (ratio to a plain torch step)",
        "",
        "| variant | ms | time / torch | memory / torch |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['variant']} | {r['step_ms']:.1f} | {r['ratio_to_torch']:.2f}x | "
        f"{r['mem_ratio_to_torch']:.2f}x |"
        for r in train
    ]
    md += [
        "",
        "## Predictive distribution of 128 inputs (`Method.predict`), MC = 32 sampled passes",
        "",
        "| run | ms | MC32 time / this |",
        "|---|---|---|",
    ]
    md += [f"| {r['run']} | {r['ms']:.1f} | {r['mc32_over_this']:.2f}x |" for r in pred]
    md += [
        "",
        "## One BP predictive pass (library), top ops (torch.profiler, self CPU)",
        "",
        "| op | calls | self ms | share |",
        "|---|---|---|---|",
    ]
    md += [f"| `{r['op']}` | {r['calls']:.0f} | {r['self_ms']:.1f} | {100 * r['share']:.1f}% |" for r in ops]
    md += [
        "",
        "In-place Clark kernels vs `rules._max2_forward`/`_max2_backward` (50,000 random inputs): "
        + "; ".join(
            f"{k}: forward equal {v['forward_equal']}, backward equal {v['backward_equal']}"
            if isinstance(v, dict)
            else f"{k}: {v}"
            for k, v in bits.items()
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
