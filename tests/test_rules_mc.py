"""Every rule of docs/maths.md section 1 against Monte Carlo (>= 1e6 samples, float64).

Tolerance: ``Z`` standard errors of the MC estimate (SE of the mean ``sqrt(var/N)``; SE
of the variance ``sqrt((mu4 - var^2)/N)`` from the samples) plus a tiny absolute slack for
quantities that are exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualflow import rules

N = 1_000_000
Z = 5.0
D = torch.float64


def mc_moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and their standard errors over dim 0."""
    n = samples.shape[0]
    mean = samples.mean(0)
    c = samples - mean
    var = (c * c).mean(0)
    mu4 = (c**4).mean(0)
    return mean, var, (var / n).sqrt(), ((mu4 - var * var).clamp_min(0) / n).sqrt()


def assert_mc(mean, var, samples, rel_slack=0.0, abs_slack=1e-12):
    mm, mv, se_m, se_v = mc_moments(samples)
    err_m = (mean - mm).abs()
    err_v = (var - mv).abs()
    tol_m = Z * se_m + abs_slack + rel_slack * mv.sqrt()
    tol_v = Z * se_v + abs_slack + rel_slack * mv
    assert bool((err_m <= tol_m).all()), f"mean off: max z={float((err_m / (se_m + 1e-300)).max()):.2f}"
    assert bool((err_v <= tol_v).all()), f"var off: max z={float((err_v / (se_v + 1e-300)).max()):.2f}"


def gauss(m, v, n=N, g=None):
    return m + v.sqrt() * torch.randn((n, *m.shape), dtype=D, generator=g)


# Inputs including extreme ratios |m|/sqrt(v) and tiny / huge variances.
EXTREME_M = torch.tensor([0.0, 0.3, -0.3, 2.0, -2.0, 6.0, -6.0, 1e-3, 50.0, -50.0, 1e4, 3.0], dtype=D)
EXTREME_V = torch.tensor([1.0, 0.01, 2.0, 1.0, 1.0, 1.0, 1.0, 1e-8, 1e-6, 1e-6, 1e6, 1e-10], dtype=D)


def test_relu_closed_form_matches_mc():
    g = torch.Generator().manual_seed(1)
    x = gauss(EXTREME_M, EXTREME_V, g=g)
    mean, var = rules.relu(EXTREME_M, EXTREME_V)
    # m=-6, v=1: P(x > 0) = 1e-9, so 1e6 samples see no positive value (MC SE = 0) while the
    # exact mean is 1.6e-10: allow that unsampled tail.
    assert_mc(mean, var, torch.relu(x), abs_slack=1e-9)


def test_relu_float32_extremes_finite_and_close():
    m = EXTREME_M.float()
    v = EXTREME_V.float()
    mean, var = rules.relu(m, v)
    ref_m, ref_v = rules.relu(EXTREME_M, EXTREME_V)
    assert bool(torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all())
    torch.testing.assert_close(mean.double(), ref_m, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_v, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_lower_tail_against_high_precision(dtype):
    """Rectified-Gaussian moments for a = m/s from -1 to the tail clamp point, against
    50-digit arithmetic. torch.special.ndtr (1 + erf) cancels in the lower tail: with it the
    float32 mean was negative at a = -5 and 10-70x too large at a = -6..-8.5."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 50
    c = rules._relu_tail(dtype)
    a = torch.linspace(-1.0, -(c - 0.1), 40, dtype=torch.float64)
    ref_m, ref_v = [], []
    for x in a.tolist():
        x = mp.mpf(x)
        cdf, pdf = mp.ncdf(x), mp.npdf(x)
        mean = x * cdf + pdf
        ref_m.append(float(mean))
        ref_v.append(float((x * x + 1) * cdf + x * pdf - mean * mean))
    scale = 3.0  # s = 3: m = 3 a, v = 9
    mean, var = rules.relu((scale * a).to(dtype), torch.full_like(a, scale**2).to(dtype))
    ref_m = scale * torch.tensor(ref_m, dtype=torch.float64)
    ref_v = scale**2 * torch.tensor(ref_v, dtype=torch.float64)
    assert bool((mean > 0).all())
    # h loses ~a^2 ulps and the variance ~a^4 (see rules._relu_moments)
    tol_m, tol_v = (5e-4, 2e-2) if dtype == torch.float32 else (1e-9, 1e-7)
    assert float(((mean.double() - ref_m) / ref_m).abs().max()) < tol_m
    assert float(((var.double() - ref_v) / ref_v).abs().max()) < tol_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_in_place_kernels_bitwise_equal_graph_kernels(dtype):
    """The fused path's in-place forward/backward are the graph versions, to the bit."""
    g = torch.Generator().manual_seed(0)
    n = 20_000
    m = torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, n, dtype=torch.float64)
    v = torch.rand(n, generator=g, dtype=torch.float64) * torch.logspace(-30, 4, n, dtype=torch.float64)
    m, v = m[torch.randperm(n, generator=g)].to(dtype), v.to(dtype)
    v[:50] = 0.0
    ref = rules._relu_moments(m, v)
    for a, b in zip(rules._relu_moments_fused(m, v), ref):
        assert torch.equal(a, b)
    gm, gv = torch.randn(2, n, generator=g, dtype=torch.float64).to(dtype)
    saved = (ref[2], ref[3], ref[0])
    for a, b in zip(rules._relu_backward_fused(gm, gv, *saved), rules._relu_backward(gm, gv, *saved)):
        assert torch.equal(a, b)


def test_relu_zero_variance_is_relu():
    m = torch.tensor([-1.0, 0.5, 3.0], dtype=D, requires_grad=True)
    mean, var = rules.relu(m, torch.zeros(3, dtype=D))
    torch.testing.assert_close(mean, torch.relu(m))
    assert float(var.detach().abs().max()) < 1e-20
    mean.sum().backward()
    torch.testing.assert_close(m.grad, torch.tensor([0.0, 1.0, 1.0], dtype=D))


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh", "sigmoid", "elu", "softplus", "relu"])
def test_gauss_hermite_matches_mc(name):
    from dualflow.nn import ACTIVATIONS

    f = ACTIVATIONS[name]
    m = torch.tensor([0.0, 0.7, -1.5, 3.0, -4.0, 0.1, 20.0, -20.0], dtype=D)
    v = torch.tensor([1.0, 0.25, 2.0, 0.01, 4.0, 1e-8, 1.0, 1.0], dtype=D)
    g = torch.Generator().manual_seed(2)
    x = gauss(m, v, g=g)
    mean, var = rules.elementwise_gh(f, m, v, nodes=64)
    # ReLU/ELU have kinks, where a 64-node rule has a small quadrature error of its own
    slack = 2e-3 if name in ("relu", "elu") else 0.0
    assert_mc(mean, var, f(x), rel_slack=slack)


def test_taylor_rule_is_eq3():
    m = torch.tensor([0.3, -1.0], dtype=D)
    v = torch.tensor([0.5, 0.2], dtype=D)
    mean, var = rules.elementwise_taylor(torch.tanh, m, v)
    torch.testing.assert_close(mean, torch.tanh(m))
    torch.testing.assert_close(var, (1 - torch.tanh(m) ** 2) ** 2 * v)


def test_linear_bayes_matches_mc():
    g = torch.Generator().manual_seed(3)
    m = torch.tensor([[0.5, -1.0, 2.0]], dtype=D)
    v = torch.tensor([[0.2, 1.0, 0.05]], dtype=D)
    wm = torch.randn(2, 3, dtype=D, generator=g)
    wv = torch.rand(2, 3, dtype=D, generator=g) * 0.5
    bm = torch.randn(2, dtype=D, generator=g)
    bv = torch.rand(2, dtype=D, generator=g) * 0.1
    mean, var = rules.linear(m, v, wm, wv, bm, bv)
    n = N
    x = gauss(m[0], v[0], n, g)  # (n, 3)
    w = gauss(wm, wv, n, g)  # (n, 2, 3)
    b = gauss(bm, bv, n, g)
    y = torch.einsum("noi,ni->no", w, x) + b
    assert_mc(mean[0], var[0], y)


def test_algorithm1_linear_variance_misses_the_weight_noise_times_input_variance():
    """Correction to the paper (docs/maths.md section 7): Algorithm 1's variance of ``W x``,
    ``A_{mu^2}(v) + A_{sigma^2}(m^2)``, lacks ``A_{sigma^2}(v)``. Against Monte Carlo the printed
    form is off by far more than the standard error; ``rules.linear`` (with ``m^2 + v``) is not."""
    g = torch.Generator().manual_seed(4)
    m = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    v = torch.tensor([1.0, 2.0, 0.5], dtype=D)
    wm = torch.randn(2, 3, dtype=D, generator=g)
    wv = torch.rand(2, 3, dtype=D, generator=g) * 0.5 + 0.25
    y = torch.einsum("noi,ni->no", gauss(wm, wv, N, g), gauss(m, v, N, g))
    _, mc_var, _, se_v = mc_moments(y)
    _, var = rules.linear(m[None], v[None], wm, wv)
    paper = (wm * wm) @ v + wv @ (m * m)
    assert bool(((var[0] - mc_var).abs() <= Z * se_v).all())
    assert bool(((paper - mc_var).abs() > 100 * se_v).all())
    torch.testing.assert_close(var[0] - paper, wv @ v)  # exactly the missing term


def test_linear_point_weights_and_deterministic_input():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(4, 5, dtype=D, generator=g)
    v = torch.rand(4, 5, dtype=D, generator=g)
    wm = torch.randn(3, 5, dtype=D, generator=g)
    wv = torch.rand(3, 5, dtype=D, generator=g)
    # point weights: A_{W^2}(v)
    _, var = rules.linear(m, v, wm, None)
    torch.testing.assert_close(var, v @ (wm**2).T)
    # deterministic input: A_{sigma^2}(m^2) only
    _mean, var = rules.linear(m, None, wm, wv)
    torch.testing.assert_close(var, (m**2) @ wv.T)
    # the fused call equals the two separate maps
    _, var = rules.linear(m, v, wm, wv)
    torch.testing.assert_close(var, v @ (wm**2).T + (m**2 + v) @ wv.T)


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=1, dilation=1, groups=1),
        dict(stride=2, padding=0, dilation=1, groups=2),
        dict(stride=1, padding=2, dilation=2, groups=1),
    ],
)
def test_conv2d_matches_mc(kw):
    g = torch.Generator().manual_seed(5)
    cin, cout, k = 2, 2, 3
    m = torch.randn(1, cin, 5, 5, dtype=D, generator=g)
    v = torch.rand(1, cin, 5, 5, dtype=D, generator=g) * 0.3
    wm = torch.randn(cout, cin // kw["groups"], k, k, dtype=D, generator=g) * 0.5
    wv = torch.rand(cout, cin // kw["groups"], k, k, dtype=D, generator=g) * 0.2
    bm = torch.randn(cout, dtype=D, generator=g)
    bv = torch.rand(cout, dtype=D, generator=g) * 0.1
    mean, var = rules.conv(m, v, wm, wv, bm, bv, **kw)
    outs = []
    chunk = 100_000
    for _ in range(N // chunk):
        x = gauss(m[0], v[0], chunk, g)  # (c, cin, H, W)
        w = gauss(wm, wv, chunk, g)  # (c, cout, cin/g, k, k)
        b = gauss(bm, bv, chunk, g)
        # per-sample weights: im2col patches times each sample's weights, group by group
        cols = F.unfold(x, k, dilation=kw["dilation"], padding=kw["padding"], stride=kw["stride"])
        gi, go = cin // kw["groups"], cout // kw["groups"]
        cols = cols.reshape(chunk, kw["groups"], gi * k * k, -1)
        wg = w.reshape(chunk, kw["groups"], go, gi * k * k)
        y = torch.einsum("ngoi,ngil->ngol", wg, cols).reshape(chunk, cout, *mean.shape[-2:])
        outs.append(y + b[:, :, None, None])
    assert_mc(mean[0], var[0], torch.cat(outs))


def test_conv1d_equals_linear_on_patches():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(2, 3, 7, dtype=D, generator=g)
    v = torch.rand(2, 3, 7, dtype=D, generator=g)
    wm = torch.randn(4, 3, 3, dtype=D, generator=g)
    wv = torch.rand(4, 3, 3, dtype=D, generator=g)
    mean, var = rules.conv(m, v, wm, wv, None, None, stride=2)
    pm = m.unfold(2, 3, 2).permute(0, 2, 1, 3).reshape(2, -1, 9)
    pv = v.unfold(2, 3, 2).permute(0, 2, 1, 3).reshape(2, -1, 9)
    lm, lv = rules.linear(pm, pv, wm.reshape(4, 9), wv.reshape(4, 9))
    torch.testing.assert_close(mean, lm.transpose(1, 2))
    torch.testing.assert_close(var, lv.transpose(1, 2))


def test_avg_and_global_pool_match_mc():
    g = torch.Generator().manual_seed(7)
    m = torch.randn(1, 1, 4, 4, dtype=D, generator=g)
    v = torch.rand(1, 1, 4, 4, dtype=D, generator=g)
    x = gauss(m[0], v[0], N, g)
    mean, var = rules.avg_pool2d(m, v, (2, 2), (2, 2))
    assert_mc(mean[0], var[0], F.avg_pool2d(x, 2))
    mean, var = rules.global_avg_pool(m, v)
    assert_mc(mean[0], var[0], x.mean(dim=(-2, -1)))


def test_product_matches_mc():
    g = torch.Generator().manual_seed(8)
    mx = torch.tensor([0.5, -2.0, 0.0], dtype=D)
    vx = torch.tensor([1.0, 0.1, 2.0], dtype=D)
    my = torch.tensor([1.5, 0.3, -1.0], dtype=D)
    vy = torch.tensor([0.2, 3.0, 0.5], dtype=D)
    mean, var = rules.product(mx, vx, my, vy)
    assert_mc(mean, var, gauss(mx, vx, N, g) * gauss(my, vy, N, g))


def test_clark_max2_matches_mc_including_extremes():
    g = torch.Generator().manual_seed(9)
    m1 = torch.tensor([0.0, 1.0, -3.0, 40.0, 0.0, 5.0, 1e3], dtype=D)
    v1 = torch.tensor([1.0, 0.1, 2.0, 1.0, 1e-8, 100.0, 1.0], dtype=D)
    m2 = torch.tensor([0.0, -1.0, 2.0, 0.0, 0.0, 5.0, 1e3 + 1], dtype=D)
    v2 = torch.tensor([1.0, 3.0, 0.01, 1.0, 1e-8, 0.01, 1e-6], dtype=D)
    mean, var = rules.max2(m1, v1, m2, v2)
    assert_mc(mean, var, torch.maximum(gauss(m1, v1, N, g), gauss(m2, v2, N, g)))


def _maxpool_mc(m, v, g):
    x = gauss(m[0], v[0], 400_000, g)
    return F.max_pool2d(x, 2)


def test_maxpool_clark_tree_accuracy_bound():
    """A 2x2 window as a tree of pairwise Clark maxima is approximate (docs/maths.md section 1.3): assert the
    documented accuracy (mean within 0.05 sd, variance within 35%) against MC."""
    g = torch.Generator().manual_seed(10)
    m = torch.randn(1, 3, 4, 4, dtype=D, generator=g)
    v = torch.rand(1, 3, 4, 4, dtype=D, generator=g) * 2 + 0.05
    mean, var = rules.max_pool2d_clark(m, v, (2, 2), (2, 2))
    mm, mv, _, _ = mc_moments(_maxpool_mc(m, v, g))
    assert float(((mean[0] - mm).abs() / mv.sqrt()).max()) < 0.05
    assert float(((var[0] - mv).abs() / mv).max()) < 0.35


def test_maxpool_clark_padding_ignores_pad():
    g = torch.Generator().manual_seed(11)
    m = torch.randn(1, 1, 3, 3, dtype=D, generator=g) - 5.0  # all negative: zero padding would win
    v = torch.full((1, 1, 3, 3), 1e-12, dtype=D)
    mean, _ = rules.max_pool2d_clark(m, v, (3, 3), (1, 1), (1, 1))
    torch.testing.assert_close(mean, F.max_pool2d(m, 3, 1, 1), atol=1e-5, rtol=0)


def test_maxpool_lse_is_smooth_max_with_linearised_variance():
    m = torch.tensor([[[[1.0, 0.0], [0.5, -1.0]]]], dtype=D)
    v = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]], dtype=D)
    t = 0.5
    mean, var = rules.max_pool2d_lse(m, v, (2, 2), (2, 2), temperature=t)
    flat_m, flat_v = m.flatten(), v.flatten()
    torch.testing.assert_close(mean.flatten(), (t * torch.logsumexp(flat_m / t, 0)).reshape(1))
    w = torch.softmax(flat_m / t, 0)
    torch.testing.assert_close(var.flatten(), (w**2 * flat_v).sum().reshape(1))


def test_layer_norm_rule():
    g = torch.Generator().manual_seed(12)
    m = torch.randn(3, 6, dtype=D, generator=g)
    v = torch.rand(3, 6, dtype=D, generator=g)
    w = torch.rand(6, dtype=D, generator=g) + 0.5
    b = torch.randn(6, dtype=D, generator=g)
    mean, var = rules.layer_norm(m, v, (6,), w, b, 1e-5)
    torch.testing.assert_close(mean, F.layer_norm(m, (6,), w, b, 1e-5))
    torch.testing.assert_close(var, v * w**2 / (m.var(-1, unbiased=False, keepdim=True) + 1e-5))


def test_floors_are_sane():
    for dt in (torch.float16, torch.float32, torch.float64):
        f = rules.var_floor(dt)
        assert f > 0 and math.isfinite(1.0 / math.sqrt(f))
