"""Moment rules: pure functions mapping input moments to output moments.

Every rule of docs/maths.md section 1 (the paper's Algorithm 1, "filtering"), grouped
by the assumption it makes:

* structural ops (reshape, concat, pad, ...) are exact and live on :class:`~dualflow.Gaussian`;
* linear mixing with Gaussian or point weights (:func:`linear`, :func:`conv`) is exact in
  its first two moments for independent weights and inputs;
* element-wise non-linearities: ReLU in closed form (exact moments of a rectified
  Gaussian), any ``f`` by Gauss-Hermite quadrature (exact as ``K`` grows), or the paper's
  first-order Taylor rule (Eq. 3; approximate);
* binary ops on *independent* inputs: sum, product, Clark's max of two Gaussians.

All rules take and return plain tensors ``(mean, var)`` so they compose with
``torch.func``; ``var=None`` means "known to be exactly 0" and lets linear maps skip the
variance map of the input (a saving, not an approximation).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "avg_pool2d",
    "compile_enabled",
    "compiled_kernels",
    "conv",
    "elementwise_gh",
    "elementwise_taylor",
    "enable_compile",
    "global_avg_pool",
    "layer_norm",
    "linear",
    "max2",
    "max_pool2d_clark",
    "max_pool2d_lse",
    "product",
    "relu",
    "relu_taylor",
    "var_floor",
]

_SQRT2 = math.sqrt(2.0)


class _Kernel:
    """An element-wise kernel that can run eagerly or through ``torch.compile``.

    The closed-form rules chain 20-30 element-wise ops; eagerly each one is a pass over
    memory, compiled they fuse into one loop (5x faster on a 2M-element CPU map, measured).
    Compilation is opt-in, only by an explicit call (:func:`compiled_kernels`, a context
    manager, or :func:`enable_compile`; no environment variable is read), because it needs a
    C++ compiler (CPU) or Triton (GPU) and costs ~30 s on first use.
    """

    enabled: bool = False

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]]) -> None:
        self.fn = fn
        self.compiled: Callable[..., tuple[Tensor, ...]] | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        if not _Kernel.enabled:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        return self.compiled(*args)


def enable_compile(enabled: bool = True) -> bool:
    """Run the fused element-wise kernels (ReLU and Clark-max moments and their analytic
    backward passes) through ``torch.compile`` from now on (process-wide; prefer
    :func:`compiled_kernels`, which restores the previous mode). Same results to float
    rounding. Returns the previous setting."""
    previous = _Kernel.enabled
    _Kernel.enabled = bool(enabled)
    return previous


def compile_enabled() -> bool:
    """Whether the fused element-wise kernels currently run through ``torch.compile``."""
    return _Kernel.enabled


@contextlib.contextmanager
def compiled_kernels(enabled: bool = True) -> Iterator[None]:
    """Context manager: the fused element-wise kernels run through ``torch.compile`` (or, with
    ``enabled=False``, eagerly) inside the block; the previous mode is restored on exit, also on
    an exception. Process-wide (not per thread), like every ``torch`` backend flag.

    Example::

        with dualflow.rules.compiled_kernels():
            train(...)
    """
    previous = enable_compile(enabled)
    try:
        yield
    finally:
        _Kernel.enabled = previous


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
# _ncdf_note: the ReLU rule evaluates Phi(a) as erfc(-a / sqrt 2) / 2, not torch.special.ndtr,
# which computes (1 + erf(a / sqrt 2)) / 2 and cancels in the lower tail: in float32 its
# relative error is ~20% at a = -5 and it is exactly 0 below a ~ -8.3 (float64 too), which
# made the ReLU mean negative at a = -5 (float32) and 10-100x too large for a < -6.


def var_floor(dtype: torch.dtype) -> float:
    """Smallest variance used before ``sqrt``/division (docs/maths.md section 1.6).

    Chosen so that ``1/sqrt(floor)`` and ``m/floor`` stay far from overflow.
    """
    if dtype == torch.float64:
        return 1e-24
    if dtype == torch.float16:
        return 1e-4
    return 1e-12


def _flush(x: Tensor) -> Tensor:
    """Set magnitudes below 1e-25 (float32) / 1e-250 (float64) to 0 (no subnormals downstream)."""
    tiny = 1e-250 if x.dtype == torch.float64 else 1e-25
    return torch.where(x.abs() < tiny, 0.0, x)


# ----------------------------------------------------------------------------- linear mixing


def linear(
    m: Tensor,
    v: Tensor | None,
    w_mean: Tensor,
    w_var: Tensor | None,
    b_mean: Tensor | None = None,
    b_var: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Moments of ``y = x W^T + b`` for independent Gaussian ``x``, ``W``, ``b``.

    Mean ``m W_mu^T + b_mu``; variance ``v (W_mu^2)^T + (m^2 + v)(W_var)^T + b_var``
    (docs/maths.md section 1.1; the paper's Algorithm 1 omits the ``W_var v`` term: section 7.1). The two
    variance maps run as one matmul over a doubled inner dimension.

    Args:
        m: input mean ``(..., in)``.
        v: input variance ``(..., in)`` or ``None`` (exactly 0).
        w_mean: ``(out, in)``.
        w_var: ``(out, in)`` or ``None`` for point weights.
        b_mean, b_var: ``(out,)`` or ``None``.

    Returns:
        ``(mean, var)``, each ``(..., out)``.
    """
    mean = F.linear(m, w_mean, b_mean)
    if w_var is None:
        var = F.linear(v, w_mean * w_mean) if v is not None else torch.zeros_like(mean)
    elif v is None:
        var = F.linear(m * m, w_var)
    else:
        # one call: [v, m^2] @ [mu^2 + s^2, s^2]^T  ==  v mu^2 + (m^2 + v) s^2
        x2 = torch.cat([v, m * m], dim=-1)
        w2 = torch.cat([w_mean * w_mean + w_var, w_var], dim=-1)
        var = F.linear(x2, w2)
    if b_var is not None:
        var = var + b_var
    return mean, var


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _interleave_groups(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """Stack ``a`` and ``b`` on the channel axis so that each group sees ``[a_g, b_g]``."""
    if groups == 1:
        return torch.cat([a, b], dim=1)
    n, c = a.shape[:2]
    rest = a.shape[2:]
    ab = torch.stack([a.reshape(n, groups, c // groups, *rest), b.reshape(n, groups, c // groups, *rest)], 2)
    return ab.reshape(n, 2 * c, *rest)


def conv(
    m: Tensor,
    v: Tensor | None,
    w_mean: Tensor,
    w_var: Tensor | None,
    b_mean: Tensor | None = None,
    b_var: Tensor | None = None,
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Moments of an N-d convolution (N = 1, 2, 3) with independent Gaussian weights.

    Same rule as :func:`linear` with the convolution as the linear map ``A``: mean
    ``A_mu(m) + b_mu``, variance ``A_{mu^2}(v) + A_{var}(m^2 + v) + b_var``. The two
    variance convolutions run as one over doubled input channels (interleaved per group).

    Args:
        m: ``(B, C_in, *spatial)``.
        v: same shape, or ``None`` (exactly 0).
        w_mean, w_var: ``(C_out, C_in / groups, *kernel)``; ``w_var=None`` for point weights.
        b_mean, b_var: ``(C_out,)`` or ``None``.

    Returns:
        ``(mean, var)`` of shape ``(B, C_out, *spatial_out)``.
    """
    nd = w_mean.dim() - 2
    fn = _CONV[nd]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    mean = fn(m, w_mean, b_mean, **kw)
    if w_var is None:
        var = fn(v, w_mean * w_mean, None, **kw) if v is not None else torch.zeros_like(mean)
    elif v is None:
        var = fn(m * m, w_var, None, **kw)
    else:
        x2 = _interleave_groups(v, m * m, groups)
        w2 = torch.cat([w_mean * w_mean + w_var, w_var], dim=1)
        var = fn(x2, w2, None, **kw)
    if b_var is not None:
        var = var + b_var.reshape(-1, *([1] * nd))
    return mean, var


# ----------------------------------------------------------------------------- ReLU


def _relu_tail(dtype: torch.dtype) -> float:
    """``|a|`` beyond which the ReLU rule evaluates ``Phi``/``phi`` at the clamp point.

    At ``a = -c`` the outputs are already below 1e-18 (float32) / 1e-146 (float64) of the
    input scale, and ``phi(c)^2`` stays a normal float: no subnormal numbers are created,
    which would slow every later CPU matmul 10-100x. At ``a = +c``, ``Phi`` is exactly 1.
    """
    return 26.0 if dtype == torch.float64 else 9.0


@_Kernel
def _relu_moments(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean, variance, ``Phi(a)`` and ``phi(a)/s`` of ``max(0, x)``, ``x ~ N(m, v)``.

    With ``a = m/s`` and ``h(a) = a Phi(a) + phi(a)``: ``mean = s h(a)`` and
    ``var = v [Phi + a (a Phi (1-Phi) + phi (1 - 2 Phi)) - phi^2]``, the textbook
    ``(m^2+v) Phi + m s phi - mean^2`` rearranged so that nothing cancels when ``a >> 0``
    (where the textbook form loses all digits of ``v`` against ``m^2``). For ``a << 0``
    ``Phi`` comes from ``erfc`` (accurate to the last digits in the tail); ``h`` then loses
    about ``a^2`` and the variance ``a^4`` ulps (relative 5e-6 and 3e-4 at ``a = -9`` in
    float32, the clamp point).
    """
    c = _relu_tail(m.dtype)
    v = v.clamp_min(var_floor(v.dtype))
    s = v.sqrt()
    a = (m / s).clamp_min(-c)
    ac = a.clamp_max(c)
    cdf = torch.erfc(ac * -_SQRT_HALF) * 0.5  # Phi, accurate in the lower tail (see _ncdf_note)
    pdf = torch.exp(-0.5 * ac * ac) * _INV_SQRT_2PI
    ccdf = 1.0 - cdf
    mean = s * (a * cdf + pdf)
    var_n = cdf + a * (a * cdf * ccdf + pdf * (ccdf - cdf)) - pdf * pdf
    return mean, v * var_n.clamp_min(0.0), cdf, pdf / s


def _relu_moments_fused(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_relu_moments` with its temporaries reused in place (no autograd graph).

    The same operations in the same order on the same values, so the results are bitwise
    those of :func:`_relu_moments`; 10 full-size allocations instead of 26 (each new CPU
    buffer of a large map costs page faults on first touch). For the analytic-backward path,
    which runs without a graph.
    """
    c = _relu_tail(m.dtype)
    v = v.clamp_min(var_floor(v.dtype))
    s = v.sqrt()
    a = torch.div(m, s).clamp_min_(-c)
    ac = a.clamp_max(c)
    cdf = torch.mul(ac, -_SQRT_HALF).erfc_().mul_(0.5)
    pdf = torch.mul(ac, -0.5).mul_(ac).exp_().mul_(_INV_SQRT_2PI)  # exp(-ac^2/2)/sqrt(2pi)
    del ac
    ccdf = torch.rsub(cdf, 1.0)
    a_cdf = a * cdf
    t = a_cdf * ccdf
    mean = a_cdf.add_(pdf).mul_(s)  # s (a Phi + phi)
    t.add_(ccdf.sub_(cdf).mul_(pdf)).mul_(a).add_(cdf)  # Phi + a (a Phi (1-Phi) + phi (1-2Phi))
    var = t.sub_(torch.mul(pdf, pdf)).clamp_min_(0.0).mul_(v)
    return mean, var, cdf, pdf.div_(s)


class _ReLUMoments(torch.autograd.Function):
    """Closed-form rectified-Gaussian moments with an analytic backward.

    Backward (derived from the closed form; ``a = m/s``):
    ``dmean/dm = Phi(a)``, ``dmean/dv = phi(a)/(2s)``,
    ``dvar/dm = 2 mean (1 - Phi(a))``, ``dvar/dv = Phi(a) - mean phi(a)/s``.
    Saves ``Phi``, ``phi/s`` and the mean (3 tensors); first-order only (use
    ``relu(..., fused=False)`` for higher derivatives).
    """

    @staticmethod
    def forward(ctx, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        # eager: the in-place variant (bitwise the same); compiled: the fused kernel
        fn = _relu_moments if _Kernel.enabled else _relu_moments_fused
        mean, var, cdf, pdf_s = fn(m, v)
        ctx.save_for_backward(cdf, pdf_s, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: Tensor, g_var: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if _Kernel.enabled:
            return _relu_backward(g_mean, g_var, *ctx.saved_tensors)
        return _relu_backward_fused(g_mean, g_var, *ctx.saved_tensors)


@_Kernel
def _relu_backward(
    g_mean: Tensor, g_var: Tensor, cdf: Tensor, pdf_s: Tensor, mean: Tensor
) -> tuple[Tensor, Tensor]:
    g_m = g_mean * cdf + (2.0 * g_var) * mean * (1.0 - cdf)
    g_v = g_mean * (0.5 * pdf_s) + g_var * (cdf - mean * pdf_s)
    return g_m, g_v


def _relu_backward_fused(
    g_mean: Tensor, g_var: Tensor, cdf: Tensor, pdf_s: Tensor, mean: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_relu_backward` with temporaries reused in place (bitwise the same; 4 full-size
    allocations instead of 11)."""
    g_m = g_mean * cdf
    t = torch.mul(g_var, 2.0).mul_(mean)
    u = torch.rsub(cdf, 1.0)
    g_m.add_(t.mul_(u))  # g_mean Phi + (2 g_var) mean (1 - Phi)
    g_v = torch.mul(pdf_s, 0.5).mul_(g_mean)
    u = torch.mul(mean, pdf_s, out=u)
    g_v.add_(torch.sub(cdf, u, out=u).mul_(g_var))  # g_mean pdf_s/2 + g_var (Phi - mean pdf_s)
    return g_m, g_v


def relu(m: Tensor, v: Tensor, fused: bool = True) -> tuple[Tensor, Tensor]:
    """Exact mean and variance of ``max(0, x)`` for ``x ~ N(m, v)`` (docs/maths.md section 1.2).

    ``mean = m Phi(a) + s phi(a)``, ``var = (m^2 + v) Phi(a) + m s phi(a) - mean^2`` with
    ``s = sqrt(v)``, ``a = m / s``, computed in a cancellation-free form and clamped at 0.
    ``v`` is floored at :func:`var_floor` so that ``v = 0`` gives ``relu(m)`` with the
    gradient of ``relu``.

    Args:
        m, v: input mean and variance, same shape.
        fused: use the analytic first-order backward (fast, less memory); ``False`` builds
            the same formula from autograd ops (differentiable to any order).
    """
    if fused:
        return _ReLUMoments.apply(m, v)
    mean, var, _, _ = _relu_moments(m, v)
    return mean, var


def relu_taylor(m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's first-order rule (Eq. 3) for ReLU: ``(relu(m), 1[m > 0] v)``."""
    return torch.relu(m), v * (m > 0).to(v.dtype)


# ----------------------------------------------------------------------------- any f


@lru_cache(maxsize=32)
def _hermgauss(k: int) -> tuple[np.ndarray, np.ndarray]:
    t, w = np.polynomial.hermite.hermgauss(k)
    return t, w / math.sqrt(math.pi)


def elementwise_gh(
    f: Callable[[Tensor], Tensor], m: Tensor, v: Tensor, nodes: int = 20
) -> tuple[Tensor, Tensor]:
    """Moments of ``f(x)``, ``x ~ N(m, v)``, by ``K``-node Gauss-Hermite quadrature.

    ``E f = sum_i w_i f(m + sqrt(2v) t_i) / sqrt(pi)``; the variance is the same rule
    applied to ``(f - E f)^2`` (equal to ``E f^2 - (E f)^2`` without its cancellation).
    Exact for polynomials of degree < 2K; accurate for
    smooth ``f`` whenever ``f`` varies slowly on the scale ``sqrt(v)``.

    Args:
        f: element-wise function.
        m, v: same shape ``S``.
        nodes: ``K``.

    Returns:
        ``(mean, var)`` of shape ``S``.
    """
    t_np, w_np = _hermgauss(nodes)
    t = torch.as_tensor(t_np, dtype=m.dtype, device=m.device)
    w = torch.as_tensor(w_np, dtype=m.dtype, device=m.device)
    s = (2.0 * v.clamp_min(var_floor(v.dtype))).sqrt()
    x = m.unsqueeze(-1) + s.unsqueeze(-1) * t  # (..., K)
    fx = f(x)
    mean = (fx * w).sum(-1)
    # The quadrature of E[(f - mean)^2] avoids the cancellation of E f^2 - mean^2.
    var = (((fx - mean.unsqueeze(-1)) ** 2) * w).sum(-1)
    return _flush(mean), _flush(var.clamp_min(0.0))


def elementwise_taylor(f: Callable[[Tensor], Tensor], m: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's first-order rule (Eq. 3): ``(f(m), f'(m)^2 v)``.

    ``f'`` comes from autograd (``f`` acts element-wise, so the gradient of ``sum f(m)`` is
    ``f'(m)``); the result stays differentiable in ``m``.
    """
    with torch.enable_grad():
        x = m if m.requires_grad else m.detach().requires_grad_(True)
        fm = f(x)
        (df,) = torch.autograd.grad(fm.sum(), x, create_graph=True)
    if not m.requires_grad:
        fm, df = fm.detach(), df.detach()
    return fm, df * df * v


# ----------------------------------------------------------------------------- binary ops


def product(mx: Tensor, vx: Tensor, my: Tensor, vy: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of ``x * y`` for *independent* Gaussians (exact):
    ``(mx my, mx^2 vy + my^2 vx + vx vy)``."""
    return mx * my, mx * mx * vy + my * my * vx + vx * vy


@_Kernel
def _max2_forward(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
    """Clark's moments written relative to the larger mean (nothing cancels when one input
    dominates; the textbook ``E2 - mean^2`` loses all digits there)."""
    first = m1 >= m2
    ma = torch.maximum(m1, m2)
    va = torch.where(first, v1, v2)
    th2 = (v1 + v2).clamp_min(var_floor(m1.dtype))
    vb = th2 - va
    th = th2.sqrt()
    d = (m1 - m2).abs()
    # beyond a = c the larger input wins outright (Phi(-c) < 1e-19); clamping keeps phi^2 normal
    a = (d / th).clamp_max(_relu_tail(m1.dtype))
    cdf, ccdf = torch.special.ndtr(a), torch.special.ndtr(-a)
    pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    shift = th * pdf - d * ccdf  # E[max] - ma
    second = va * cdf + (d * d + vb) * ccdf - d * th * pdf  # E[(max - ma)^2]
    return ma + shift, (second - shift * shift).clamp_min(0.0)


class _Max2(torch.autograd.Function):
    """Clark's max with an analytic backward (saves the 4 inputs and the mean).

    With ``th = sqrt(v1 + v2)``, ``a = (m1 - m2)/th``, ``P = Phi(a)``, ``q = phi(a)/th``:
    ``dmu/dm1 = P``, ``dmu/dm2 = 1 - P``, ``dmu/dv1 = dmu/dv2 = q/2``;
    ``dE2/dm1 = 2(m1 P + v1 q)``, ``dE2/dm2 = 2(m2 (1-P) + v2 q)``,
    ``dE2/dv1 = P + q (m1 v2 + m2 v1)/th^2``, ``dE2/dv2 = 1 - P + q (m1 v2 + m2 v1)/th^2``
    (Stein's lemma and Price's theorem on ``E[max^k]``), and ``dvar = dE2 - 2 mu dmu``.
    """

    @staticmethod
    def forward(ctx, m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mean, var = _max2_forward(m1, v1, m2, v2)
        ctx.save_for_backward(m1, v1, m2, v2, mean)
        return mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mu: Tensor, g_var: Tensor):  # type: ignore[override]
        return _max2_backward(g_mu, g_var, *ctx.saved_tensors)


@_Kernel
def _max2_backward(
    g_mu: Tensor, g_var: Tensor, m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor, mu: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = _relu_tail(m1.dtype)
    th2 = (v1 + v2).clamp_min(var_floor(m1.dtype))
    th = th2.sqrt()
    a = ((m1 - m2) / th).clamp(-c, c)
    p1 = torch.special.ndtr(a)
    p2 = 1.0 - p1
    q = torch.exp(-0.5 * a * a) * (_INV_SQRT_2PI / th)
    # chain rule through var = E2 - mu^2: g_E2 = g_var, g_mu_total = g_mu - 2 mu g_var
    gt = g_mu - 2.0 * mu * g_var
    g2 = 2.0 * g_var
    cross = q * (m1 * v2 + m2 * v1) / th2
    g_m1 = gt * p1 + g2 * (m1 * p1 + v1 * q)
    g_m2 = gt * p2 + g2 * (m2 * p2 + v2 * q)
    half_q_gt = 0.5 * q * gt
    g_v1 = half_q_gt + g_var * (p1 + cross)
    g_v2 = half_q_gt + g_var * (p2 + cross)
    return g_m1, g_v1, g_m2, g_v2


def max2(m1: Tensor, v1: Tensor, m2: Tensor, v2: Tensor, fused: bool = True) -> tuple[Tensor, Tensor]:
    """Clark (1961): exact mean and variance of ``max(x1, x2)``, independent Gaussians.

    ``th = sqrt(v1+v2)``, ``a = (m1-m2)/th``: ``mean = m1 Phi(a) + m2 Phi(-a) + th phi(a)``,
    ``E2 = (m1^2+v1) Phi(a) + (m2^2+v2) Phi(-a) + (m1+m2) th phi(a)``, evaluated relative to
    the larger mean. ``fused=True`` uses the analytic backward of :class:`_Max2`;
    ``False`` builds the graph from autograd ops (any order of derivatives).
    """
    if fused:
        return _Max2.apply(m1, v1, m2, v2)
    return _max2_forward(m1, v1, m2, v2)


def _windows(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """``(B, C, H, W) -> (B, C, k, L)`` sliding windows (a copy, via ``unfold``)."""
    b, c = x.shape[:2]
    cols = F.unfold(x, kernel, padding=padding, stride=stride)  # (B, C*k, L)
    return cols.reshape(b, c, kernel[0] * kernel[1], -1)


def _out_hw(h: int, w: int, kernel, stride, padding) -> tuple[int, int]:
    return (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[
        1
    ] + 1


def max_pool2d_clark(
    m: Tensor,
    v: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] = (0, 0),
) -> tuple[Tensor, Tensor]:
    """Max pooling by a tree of pairwise Clark maxima (each intermediate max treated as Gaussian).

    Approximate for windows of more than 2 elements (docs/maths.md section 1.3). Padded
    positions are ignored (as ``-inf`` padding would be).
    """
    h, w = m.shape[-2:]
    oh, ow = _out_hw(h, w, kernel, stride, padding)
    if stride == kernel and padding == (0, 0) and h % kernel[0] == 0 and w % kernel[1] == 0:
        # non-overlapping windows tiling the map: each window position is a strided view
        items = [
            (m[..., i :: kernel[0], j :: kernel[1]], v[..., i :: kernel[0], j :: kernel[1]], None)
            for i in range(kernel[0])
            for j in range(kernel[1])
        ]
    else:
        mw = _windows(m, kernel, stride, padding)
        vw = _windows(v, kernel, stride, padding)
        valid = None
        if padding != (0, 0):
            ones = torch.ones(1, 1, h, w, dtype=m.dtype, device=m.device)
            valid = _windows(ones, kernel, stride, padding) > 0.5  # (1, 1, k, L)
        items = [
            (mw[:, :, i], vw[:, :, i], None if valid is None else valid[:, :, i]) for i in range(mw.shape[2])
        ]
    while len(items) > 1:
        nxt = []
        for j in range(0, len(items) - 1, 2):
            (ma, va, ka), (mb, vb, kb) = items[j], items[j + 1]
            mm, vv = max2(ma, va, mb, vb)
            if ka is not None:
                mm = torch.where(kb, torch.where(ka, mm, mb), ma)
                vv = torch.where(kb, torch.where(ka, vv, vb), va)
                kk = ka | kb
            else:
                kk = None
            nxt.append((mm, vv, kk))
        if len(items) % 2:
            nxt.append(items[-1])
        items = nxt
    mo, vo, _ = items[0]
    shape = (*m.shape[:2], oh, ow)
    return mo.reshape(shape), vo.reshape(shape)


def max_pool2d_lse(
    m: Tensor,
    v: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] = (0, 0),
    temperature: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The paper's smooth max: ``T logsumexp(x / T)`` over the window, first-order moments.

    Mean ``T logsumexp(m / T)``; variance ``sum_i w_i^2 v_i`` with ``w = softmax(m / T)``
    (the linearisation of the smooth max at the mean, as in Eq. 3). Biased upwards by up
    to ``T log k``; the variance ignores the spread of the max itself.
    """
    h, w = m.shape[-2:]
    oh, ow = _out_hw(h, w, kernel, stride, padding)
    mw = _windows(m, kernel, stride, padding) / temperature
    vw = _windows(v, kernel, stride, padding)
    if padding != (0, 0):
        ones = torch.ones(1, 1, h, w, dtype=m.dtype, device=m.device)
        valid = _windows(ones, kernel, stride, padding) > 0.5
        mw = mw.masked_fill(~valid, float("-inf"))
    mean = temperature * torch.logsumexp(mw, dim=2)
    wts = torch.softmax(mw, dim=2)
    var = (wts * wts * vw).sum(2)
    shape = (*m.shape[:2], oh, ow)
    return mean.reshape(shape), var.reshape(shape)


# ----------------------------------------------------------------------------- pooling / norms


def avg_pool2d(
    m: Tensor,
    v: Tensor | None,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] = (0, 0),
) -> tuple[Tensor, Tensor | None]:
    """Average pooling over ``k`` elements: ``(avgpool(m), avgpool(v) / k)``. Exact.

    Zero padding counts towards ``k`` (``count_include_pad=True``), so every window has
    the same divisor.
    """
    k = kernel[0] * kernel[1]
    mean = F.avg_pool2d(m, kernel, stride, padding, count_include_pad=True)
    var = None if v is None else F.avg_pool2d(v, kernel, stride, padding, count_include_pad=True) / k
    return mean, var


def global_avg_pool(
    m: Tensor, v: Tensor | None, dims: tuple[int, ...] = (-2, -1)
) -> tuple[Tensor, Tensor | None]:
    """Mean over ``k`` positions: ``(mean(m), mean(v) / k)``. Exact."""
    k = 1
    for d in dims:
        k *= m.shape[d]
    mean = m.mean(dim=dims)
    var = None if v is None else v.mean(dim=dims) / k
    return mean, var


def layer_norm(
    m: Tensor,
    v: Tensor | None,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | None]:
    """LayerNorm with the statistics of the mean (docs/maths.md section 1.5).

    ``m' = g (m - mean(m)) / sqrt(var(m) + eps) + b``, ``v' = v g^2 / (var(m) + eps)``: the
    statistics are taken over the means only (treated as deterministic in the variance
    path), an approximation.
    """
    dims = tuple(range(-len(normalized_shape), 0))
    mu = m.mean(dim=dims, keepdim=True)
    denom = m.var(dim=dims, keepdim=True, unbiased=False) + eps
    mean = (m - mu) * denom.rsqrt()
    var = None if v is None else v / denom
    if weight is not None:
        mean = mean * weight
        var = None if var is None else var * weight * weight
    if bias is not None:
        mean = mean + bias
    return mean, var
