"""Max pooling: the pool-before-activation rewrite, window correlations, k-way max rules.

Monte Carlo tolerances: ``Z`` standard errors of the MC estimate (``tests/test_rules_mc.py``),
plus a stated relative slack where a rule is an approximation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dualflow as df
from dualflow import models, rules
from dualflow import nn as dnn
from dualflow.methods import set_propagation
from dualflow.nn.base import BayesLayer
from dualflow.nn.rewrite import is_monotone, pool_before_activation

D = torch.float64
Z = 5.0


def mc_moments(samples):
    n = samples.shape[0]
    mean = samples.mean(0)
    c = samples - mean
    var = (c * c).mean(0)
    mu4 = (c**4).mean(0)
    return mean, var, (var / n).sqrt(), ((mu4 - var * var).clamp_min(0) / n).sqrt()


def assert_mc(mean, var, samples, rel_slack=0.0, abs_slack=1e-12):
    mm, mv, se_m, se_v = mc_moments(samples)
    tol_m = Z * se_m + abs_slack + rel_slack * mv.sqrt()
    tol_v = Z * se_v + abs_slack + rel_slack * mv
    assert bool(((mean - mm).abs() <= tol_m).all()), float(((mean - mm).abs() / mv.sqrt()).max())
    assert bool(((var - mv).abs() <= tol_v).all()), float(((var - mv).abs() / mv).max())


# ----------------------------------------------------------------------------- is_monotone


def test_is_monotone_modules():
    assert is_monotone(dnn.ReLU()) and is_monotone(dnn.ReLU(method="taylor"))
    assert is_monotone(dnn.Identity()) and is_monotone(dnn.Tanh()) and is_monotone(dnn.ELU())
    assert not is_monotone(dnn.GELU()) and not is_monotone(dnn.SiLU())
    assert not is_monotone(dnn.Activation(lambda x: x * x))
    assert not is_monotone(dnn.Dropout(0.1)) and not is_monotone(dnn.Linear(2, 2))
    assert is_monotone(torch.nn.ReLU()) and is_monotone(torch.nn.LeakyReLU(0.1))
    assert not is_monotone(torch.nn.LeakyReLU(-0.5)) and not is_monotone(torch.nn.GELU())
    assert (
        is_monotone(torch.nn.Hardtanh())
        and is_monotone(torch.nn.ELU())
        and not is_monotone(torch.nn.ELU(-1.0))
    )


def test_is_monotone_is_the_op_table():
    """One source of truth: the Sequential rewrite and the fx converter read the same property
    (checked against the functions themselves in ``tests/test_ops.py::test_elementwise_properties``)."""
    for op in df.ops.elementwise():
        assert is_monotone(dnn.Activation(op.name)) == op.is_monotone(), op.name


# ----------------------------------------------------------------------------- the rewrite


def _conv_stack(pool_first, act=dnn.ReLU, pool=lambda: dnn.MaxPool2d(2), bayes=True):
    torch.manual_seed(0)
    return dnn.Sequential(
        dnn.Conv2d(2, 3, 3, padding=1, bayes=bayes),
        act(),
        pool(),
        dnn.Conv2d(3, 4, 3, padding=1, bayes=bayes),
        act(),
        pool(),
        dnn.Flatten(),
        dnn.Linear(4, 2, bayes=bayes),
        pool_first=pool_first,
    ).to(D)


@pytest.mark.parametrize("act", [dnn.ReLU, dnn.Tanh, dnn.Sigmoid, dnn.ELU, dnn.Softplus])
@pytest.mark.parametrize(
    "pool", [lambda: dnn.MaxPool2d(2), lambda: dnn.MaxPool2d(3, 2, 1)], ids=["2x2", "3x3pad"]
)
def test_rewrite_is_function_identical_and_keeps_state_dict_keys(act, pool):
    before = _conv_stack(False, act, pool, bayes=False)
    after = _conv_stack(True, act, pool, bayes=False)
    assert [type(m) for m in before][1:3] == [act, dnn.MaxPool2d]
    assert [type(m) for m in after][1:3] == [dnn.MaxPool2d, act]
    assert list(before.state_dict()) == list(after.state_dict())
    after.load_state_dict(before.state_dict())
    x = torch.randn(5, 2, 4, 4, dtype=D)
    # max commutes with f exactly; float f may be non-monotone at the last bit (softplus)
    tol = 0.0 if act is dnn.ReLU else 1e-14
    torch.testing.assert_close(after(x), before(x), rtol=0, atol=tol)
    # the same for sampled weights (every point network of the Bayesian one)
    b_before, b_after = _conv_stack(False, act, pool), _conv_stack(True, act, pool)
    b_after.load_state_dict(b_before.state_dict())
    for model in (b_before, b_after):
        set_propagation(model, "reparam")
    torch.manual_seed(3)
    y1 = b_before(x)
    torch.manual_seed(3)
    torch.testing.assert_close(b_after(x), y1, rtol=0, atol=tol)


def test_rewrite_leaves_non_monotone_and_stateful_modules_alone():
    for mods in (
        [dnn.Conv2d(1, 1, 1), dnn.SiLU(), dnn.MaxPool2d(2)],
        [dnn.Conv2d(1, 1, 1), dnn.Dropout(0.2), dnn.MaxPool2d(2)],
        [dnn.Conv2d(1, 1, 1), dnn.BatchNorm2d(1), dnn.MaxPool2d(2)],
        [dnn.Conv2d(1, 1, 1), dnn.ReLU(), dnn.AvgPool2d(2)],
    ):
        seq = dnn.Sequential(*mods)
        assert [type(m) for m in seq] == [type(m) for m in mods]


def test_rewrite_bubbles_through_several_activations_and_nested_sequentials():
    seq = dnn.Sequential(dnn.Conv2d(1, 2, 3), dnn.ReLU(), dnn.Tanh(), dnn.MaxPool2d(2))
    assert [type(m) for m in seq] == [dnn.Conv2d, dnn.MaxPool2d, dnn.ReLU, dnn.Tanh]
    inner = dnn.Sequential(dnn.Conv2d(1, 2, 3, bayes=False), dnn.ReLU(), pool_first=False)
    outer = torch.nn.Sequential(inner, dnn.MaxPool2d(2), dnn.Flatten())
    keys = list(outer.state_dict())
    x = torch.randn(2, 1, 6, 6)
    ref = outer(x)
    assert pool_before_activation(outer) == 1
    assert [type(m) for m in inner] == [dnn.Conv2d, dnn.MaxPool2d]
    assert [type(m) for m in outer] == [dnn.Sequential, dnn.ReLU, dnn.Flatten]
    assert list(outer.state_dict()) == keys
    torch.testing.assert_close(outer(x), ref, rtol=0, atol=0)
    # opting out keeps the order
    kept = dnn.Sequential(dnn.Conv2d(1, 2, 3), dnn.ReLU(), dnn.MaxPool2d(2), pool_first=False)
    assert [type(m) for m in kept] == [dnn.Conv2d, dnn.ReLU, dnn.MaxPool2d]


@pytest.mark.parametrize("name", ["vgg16", "lenet5"])
@pytest.mark.parametrize("normalization", ["none", "batch"])
def test_model_builders_pool_pre_activations_with_unchanged_keys(name, normalization):
    kw = dict(image_size=8, blocks=(2, 1), channels=(4, 8)) if name == "vgg16" else dict(in_channels=1)
    model = models.create(name, normalization=normalization, **kw)
    body = list(model.body)
    pools = [i for i, m in enumerate(body) if isinstance(m, dnn.MaxPool2d)]
    assert pools and all(
        isinstance(body[i + 1], dnn.Activation) and body[i + 1].name == "relu" for i in pools
    )
    assert all(not is_monotone(body[i - 1]) for i in pools)
    # the same network in the ReLU -> MaxPool order has the same state_dict keys
    old = list(body)
    for i in pools:
        old[i], old[i + 1] = old[i + 1], old[i]
    assert list(dnn.Sequential(*old, pool_first=False).state_dict()) == list(model.body.state_dict())


# ----------------------------------------------------------------------------- window covariances


def _conv_mc(m, v, wm, wv, bm, bv, n, g, **kw):
    """Samples of the conv output over independent Gaussian inputs, weights and bias."""
    out = []
    for _ in range(n // 10_000):
        x = m + v.sqrt() * torch.randn(10_000, *m.shape, dtype=D, generator=g)
        w = wm + wv.sqrt() * torch.randn(10_000, *wm.shape, dtype=D, generator=g)
        b = bm + bv.sqrt() * torch.randn(10_000, *bm.shape, dtype=D, generator=g)
        out.append(torch.vmap(lambda x, w, b: F.conv2d(x, w, b, **kw))(x, w, b))
    return torch.cat(out)


@pytest.mark.parametrize(
    "kw", [dict(padding=(1, 1)), dict(stride=(2, 2), padding=(1, 1)), dict(padding=(0, 0), groups=2)]
)
def test_conv_window_cov_meanfield_matches_mc(kw):
    """For independent inputs the "meanfield" covariances are exact (shared weights, shared
    input elements of overlapping receptive fields, shared bias)."""
    g = torch.Generator().manual_seed(0)
    groups = kw.get("groups", 1)
    m = torch.randn(1, 4, 6, 6, dtype=D, generator=g)
    v = torch.rand(1, 4, 6, 6, dtype=D, generator=g)
    wm = torch.randn(4, 4 // groups, 3, 3, dtype=D, generator=g) * 0.4
    wv = torch.rand(4, 4 // groups, 3, 3, dtype=D, generator=g) * 0.05
    bm, bv = torch.randn(4, dtype=D, generator=g), torch.rand(4, dtype=D, generator=g) * 0.1
    offsets = rules.window_offsets((2, 2))
    conv_kw = {"stride": kw.get("stride", (1, 1)), "padding": kw["padding"], "groups": groups}
    cov = rules.conv2d_window_cov(m, v, wm, wv, bv, offsets, mode="meanfield", **conv_kw)
    y = _conv_mc(m, v, wm, wv, bm, bv, 100_000, g, **conv_kw)
    c = y - y.mean(0)
    n = c.shape[0]
    for o, (dy, dx) in enumerate(offsets):
        prod = c * rules._shift2d(c, dy, dx)
        inside = rules._shift2d(torch.ones_like(c[0]), dy, dx) > 0
        err = (prod.mean(0) - cov[:, o])[inside].abs()
        se = (prod.std(0) / math.sqrt(n))[inside]
        assert bool((err <= Z * se + 1e-12).all()), float((err / se).max())
    # a wrong kernel alignment would be far off: the test can fail
    assert float(cov.abs().max()) > 20 * float(se.max())


def test_conv_window_cov_smooth_structure():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(2, 3, 5, 5, dtype=D, generator=g)
    v = torch.rand(2, 3, 5, 5, dtype=D, generator=g)
    wm = torch.randn(4, 3, 3, 3, dtype=D, generator=g)
    wv = torch.rand(4, 3, 3, 3, dtype=D, generator=g) * 0.1
    bv = torch.rand(4, dtype=D, generator=g)
    offsets = rules.window_offsets((2, 2))
    kw = dict(padding=(1, 1))
    _, var = rules.conv(m, v, wm, wv, None, bv, **kw)
    # zero offset: the covariance is the variance of rules.conv
    c0 = rules.conv2d_window_cov(m, v, wm, wv, bv, ((0, 0),), **kw)
    torch.testing.assert_close(c0[:, 0], var)
    # deterministic input: "smooth" and "meanfield" coincide (only the own weight noise)
    a = rules.conv2d_window_cov(m, None, wm, wv, bv, offsets, **kw)
    b = rules.conv2d_window_cov(m, None, wm, wv, bv, offsets, mode="meanfield", **kw)
    torch.testing.assert_close(a, b)
    # point weights, deterministic input: nothing random
    assert rules.conv2d_window_cov(m, None, wm, None, None, offsets, **kw) is None
    corr = rules.window_corr(rules.conv2d_window_cov(m, v, wm, wv, bv, offsets, **kw), var, offsets)
    assert float(corr.max()) <= 1.0 and float(corr.min()) >= -1.0
    # point weights with random input: the smooth model makes windows perfectly correlated
    cp = rules.conv2d_window_cov(m, v, wm, None, None, offsets, **kw)
    _, vp = rules.conv(m, v, wm, None, None, None, **kw)
    rho = rules.window_corr(cp, vp, offsets)[..., :-1, 1:-1]
    torch.testing.assert_close(rho, torch.ones_like(rho))


# ----------------------------------------------------------------------------- correlated max


def _correlated(mean, cov, n, g):
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, *mean.shape, dtype=D, generator=g)
    return mean + (chol @ z.unsqueeze(-1)).squeeze(-1)


def test_max2_corr_matches_mc():
    """Clark's formula is exact for any correlation (two elements)."""
    g = torch.Generator().manual_seed(2)
    m = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 0.3], [2.0, 2.1], [0.0, 3.0]], dtype=D)
    s = torch.tensor([[1.0, 1.0], [1.0, 2.0], [0.3, 1.5], [1.0, 1.0], [2.0, 0.5]], dtype=D)
    rho = torch.tensor([0.9, -0.5, 0.6, 0.999, 0.0], dtype=D)
    cov = torch.zeros(5, 2, 2, dtype=D)
    cov[:, 0, 0], cov[:, 1, 1] = s[:, 0] ** 2, s[:, 1] ** 2
    cov[:, 0, 1] = cov[:, 1, 0] = rho * s[:, 0] * s[:, 1]
    x = _correlated(m, cov, 1_000_000, g)
    mean, var, p1 = rules.max2_corr(m[:, 0], s[:, 0] ** 2, m[:, 1], s[:, 1] ** 2, cov[:, 0, 1])
    assert_mc(mean, var, x.max(-1).values)
    # Phi(alpha) gives Cov(max, x3) exactly for x3 = x1 + x2 (a linear function of the pair)
    y, x3 = x.max(-1).values, x.sum(-1)
    mc_cov = ((y - y.mean(0)) * (x3 - x3.mean(0))).mean(0)
    pred = (cov[:, 0, 0] + cov[:, 0, 1]) * p1 + (cov[:, 0, 1] + cov[:, 1, 1]) * (1 - p1)
    se = ((y - y.mean(0)) * (x3 - x3.mean(0))).std(0) / 1000.0
    assert bool(((mc_cov - pred).abs() <= Z * se).all())


def _window_corr_field(shape, g, rho_lo=0.3, rho_hi=0.95):
    """One correlation per 2x2 window, ``(B, C, H/2, W/2)``: each element is a shared window
    factor plus its own noise, so every pair in the window has this correlation."""
    b, c, h, w = shape
    return rho_lo + (rho_hi - rho_lo) * torch.rand(b, c, h // 2, w // 2, dtype=D, generator=g)


def test_max_pool2d_clark_corr_matches_mc_on_correlated_windows():
    g = torch.Generator().manual_seed(3)
    b, c, h, w = 1, 3, 4, 4
    m = torch.randn(b, c, h, w, dtype=D, generator=g)
    s = (torch.rand(b, c, h, w, dtype=D, generator=g) + 0.3).sqrt()
    share = _window_corr_field((b, c, h, w), g)  # per-window factor loading
    # x = m + s (sqrt(r) f_window + sqrt(1 - r) e): corr(x_i, x_j) = r within a window
    r_full = share.repeat_interleave(2, -2).repeat_interleave(2, -1)
    n = 400_000
    f = torch.randn(n, b, c, h // 2, w // 2, dtype=D, generator=g)
    f = f.repeat_interleave(2, -2).repeat_interleave(2, -1)
    e = torch.randn(n, b, c, h, w, dtype=D, generator=g)
    x = m + s * (r_full.sqrt() * f + (1 - r_full).sqrt() * e)
    y = F.max_pool2d(x.reshape(n * b, c, h, w), 2).reshape(n, b, c, h // 2, w // 2)
    offsets = rules.window_offsets((2, 2))
    corr = torch.zeros(b, len(offsets), c, h, w, dtype=D)
    for o in range(len(offsets)):
        corr[:, o] = r_full  # within-window pairs read these entries
    mean, var = rules.max_pool2d_clark_corr(m, s * s, corr, offsets, (2, 2), (2, 2))
    # Clark's recursion treats intermediate maxima as Gaussian: within 0.03 sd / 8% here
    assert_mc(mean, var, y, rel_slack=0.08)
    # independence (the tree) is far off on these windows: the correlation matters
    tm, _ = rules.max_pool2d_clark(m, s * s, (2, 2), (2, 2))
    mm, mv, _, _ = mc_moments(y)
    assert float(((tm - mm).abs() / mv.sqrt()).median()) > 0.15
    assert float(((mean - mm).abs() / mv.sqrt()).max()) < 0.03


def test_max_pool2d_clark_corr_two_element_windows_exact_and_padding():
    g = torch.Generator().manual_seed(4)
    m = torch.randn(1, 2, 3, 4, dtype=D, generator=g)
    v = torch.rand(1, 2, 3, 4, dtype=D, generator=g) + 0.2
    offsets = rules.window_offsets((1, 2))
    assert offsets == ((0, 1),)
    rho = 0.8
    corr = torch.full((1, 1, 2, 3, 4), rho, dtype=D)
    mean, var = rules.max_pool2d_clark_corr(m, v, corr, offsets, (1, 2), (1, 2))
    a, b = (m[..., 0::2], v[..., 0::2]), (m[..., 1::2], v[..., 1::2])
    em, ev, _ = rules.max2_corr(a[0], a[1], b[0], b[1], rho * (a[1] * b[1]).sqrt())
    torch.testing.assert_close(mean, em)
    torch.testing.assert_close(var, ev)
    # padded windows: padding never wins (all-negative input, tiny variances)
    m2 = torch.randn(1, 1, 5, 5, dtype=D, generator=g) - 5.0
    v2 = torch.full_like(m2, 1e-12)
    offs = rules.window_offsets((3, 3))
    c2 = torch.full((1, len(offs), 1, 5, 5), 0.5, dtype=D)
    got, _ = rules.max_pool2d_clark_corr(m2, v2, c2, offs, (3, 3), (2, 2), (1, 1))
    torch.testing.assert_close(got, F.max_pool2d(m2, 3, 2, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="lacks offsets"):
        rules.max_pool2d_clark_corr(m, v, corr, offsets, (2, 2), (2, 2))


# ----------------------------------------------------------------------------- exact independent max


REGIMES = {
    "similar": (1.0, 0.5, 1.5),
    "spread100": (1.0, 0.1, 10.0),  # variances over 0.01 .. 100
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_max_pool2d_quad_matches_mc(regime):
    g = torch.Generator().manual_seed(5)
    scale, lo, hi = REGIMES[regime]
    m = scale * torch.randn(1, 4, 4, 4, dtype=D, generator=g)
    sd = lo * (hi / lo) ** torch.rand(1, 4, 4, 4, dtype=D, generator=g)
    v = sd * sd
    x = m[0] + sd[0] * torch.randn(400_000, 4, 4, 4, dtype=D, generator=g)
    y = F.max_pool2d(x, 2)
    mean, var = rules.max_pool2d_quad(m, v, (2, 2), (2, 2))
    # quadrature error < 0.6% of the variance (measured max over random windows)
    assert_mc(mean[0], var[0], y, rel_slack=0.006)
    if regime == "spread100":  # where the pairwise tree fails
        _, tv = rules.max_pool2d_clark(m, v, (2, 2), (2, 2))
        _, mv, _, _ = mc_moments(y)
        assert float(((tv[0] - mv).abs() / mv).max()) > 0.2


def test_max_pool2d_quad_padding_float32_and_chunks():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(2, 3, 5, 5, dtype=D, generator=g)
    v = torch.rand(2, 3, 5, 5, dtype=D, generator=g) + 0.1
    full = rules.max_pool2d_quad(m, v, (3, 3), (2, 2), (1, 1))
    chunked = rules.max_pool2d_quad(m, v, (3, 3), (2, 2), (1, 1), chunk=7)
    torch.testing.assert_close(full, chunked)
    f32 = rules.max_pool2d_quad(m.float(), v.float(), (3, 3), (2, 2), (1, 1))
    torch.testing.assert_close(f32[0].double(), full[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f32[1].double(), full[1], rtol=1e-3, atol=1e-4)
    m2 = torch.randn(1, 1, 5, 5, dtype=D, generator=g) - 5.0
    got, _ = rules.max_pool2d_quad(m2, torch.full_like(m2, 1e-12), (3, 3), (2, 2), (1, 1))
    torch.testing.assert_close(got, F.max_pool2d(m2, 3, 2, 1), atol=1e-5, rtol=0)


def test_gradcheck_new_max_rules():
    g = torch.Generator().manual_seed(7)
    m = torch.randn(1, 2, 4, 4, dtype=D, generator=g).requires_grad_(True)
    v = (torch.rand(1, 2, 4, 4, dtype=D, generator=g) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rules.max_pool2d_quad(a, b, (2, 2), (2, 2)), (m, v))
    assert torch.autograd.gradcheck(lambda a, b: rules.max_pool2d_quad(a, b, (3, 3), (2, 2), (1, 1)), (m, v))
    offsets = rules.window_offsets((2, 2))
    corr = (0.2 + 0.6 * torch.rand(1, 4, 2, 4, 4, dtype=D, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: rules.max_pool2d_clark_corr(a, b, c, offsets, (2, 2), (2, 2)), (m, v, corr)
    )
    pc = (0.2 + 0.6 * torch.rand(1, 2, 6, 2, 2, dtype=D, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: rules.max_pool2d_clark_pairs(a, b, c, (2, 2)), (m, v, pc))
    wm = torch.randn(3, 2, 3, 3, dtype=D, generator=g).requires_grad_(True)
    wv = (torch.rand(3, 2, 3, 3, dtype=D, generator=g) * 0.1).requires_grad_(True)
    bv = torch.rand(3, dtype=D, generator=g).requires_grad_(True)
    for mode in ("smooth", "meanfield"):
        assert torch.autograd.gradcheck(
            lambda *a, mode=mode: rules.conv2d_window_cov(*a, offsets, padding=(1, 1), mode=mode),
            (m, v, wm, wv, bv),
        )
        assert torch.autograd.gradcheck(
            lambda *a, mode=mode: rules.conv2d_pair_cov(*a, (2, 2), padding=(1, 1), mode=mode),
            (m, v, wm, wv, bv),
        )


# ----------------------------------------------------------------------------- whole networks


def _mc_net(bayes, point, x, samples, seed=0):
    """Output moments of the point network over weights drawn from q (vmapped)."""
    g = torch.Generator().manual_seed(seed)
    draws = {}
    for prefix, mod in bayes.named_modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            pre = f"{prefix}." if prefix else ""
            draws[pre + "weight_mu"] = (mod.weight_mu.detach(), mod.weight_var.detach().sqrt())
            draws[pre + "bias_mu"] = (mod.bias_mu.detach(), mod.bias_var.detach().sqrt())
    fixed = {k: t for k, t in models.point_state_dict(bayes).items() if k not in draws}
    ys = []
    for _ in range(samples // 500):
        batch = {
            k: mu + sd * torch.randn((500, *mu.shape), dtype=D, generator=g) for k, (mu, sd) in draws.items()
        }
        with torch.no_grad():
            ys.append(torch.vmap(lambda b: torch.func.functional_call(point, {**fixed, **b}, (x,)))(batch))
    y = torch.cat(ys)
    return y.mean(0), y.var(0)


def _errors(out, mm, mv):
    """Median |mean error| in MC sds and median relative variance error (random elements only)."""
    keep = mv > 1e-9 * float(mv.max())
    return (
        float(((out.mean - mm).abs() / mv.sqrt())[keep].median()),
        float(((out.var - mv).abs() / mv)[keep].median()),
    )


@pytest.mark.slow
def test_conv_relu_maxpool_moments_closer_to_mc_after_rewrite_and_with_correlations():
    """Conv-ReLU-Conv-ReLU-MaxPool on smooth inputs, moments of the pooled map against
    weight-sampling Monte Carlo (4000 samples: MC error ~0.02 sd / 2%). Measured (median mean
    error in sd, median variance error): ReLU then pool 0.26 / 43%; pool then ReLU 0.17 / 21%;
    and with the window correlations of the convolution 0.04 / 10%."""
    torch.manual_seed(0)
    x = F.avg_pool2d(torch.randn(8, 1, 16, 16, dtype=D), 3, 1, 1) * 3  # spatially smooth inputs

    def net(pool_first, correlation, bayes=True):
        torch.manual_seed(1)
        seq = dnn.Sequential(
            dnn.Conv2d(1, 4, 3, padding=1, bayes=bayes, init_var_ratio=0.1),
            dnn.ReLU(),
            dnn.Conv2d(4, 4, 3, padding=1, bayes=bayes, init_var_ratio=0.1),
            dnn.ReLU(),
            dnn.MaxPool2d(2, correlation=correlation),
            pool_first=pool_first,
        )
        return dnn.set_checks(seq, False).to(D)

    mm, mv = _mc_net(net(True, "none"), net(True, "none", bayes=False), x, 4000)
    with torch.no_grad():
        act_first = _errors(net(False, "none")(x), mm, mv)
        pool_first = _errors(net(True, "none")(x), mm, mv)
        correlated = _errors(net(True, "smooth")(x), mm, mv)
    assert pool_first[1] < 0.6 * act_first[1]  # the rewrite: variance
    assert correlated[0] < 0.5 * pool_first[0]  # window correlations: mean
    assert correlated[0] < 0.08 and correlated[1] < 0.15, correlated


def test_sequential_passes_window_correlations_through_batchnorm():
    torch.manual_seed(2)
    conv, bn = dnn.Conv2d(2, 3, 3, padding=1, init_var_ratio=0.2), dnn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, -0.5)  # a negative gain flips no correlation within a channel
    seq = dnn.Sequential(conv, bn, dnn.MaxPool2d(2), dnn.ReLU()).to(D).eval()
    x = df.Gaussian(torch.randn(2, 2, 4, 4, dtype=D), torch.rand(2, 2, 4, 4, dtype=D))
    out = seq(x)
    y = conv(x)
    z = bn(y)
    corr = rules.window_corr(
        rules.conv2d_window_cov(
            x.mean,
            x.var,
            conv.weight_mean,
            conv.weight_var,
            conv.bias_var,
            rules.window_offsets((2, 2)),
            padding=conv.padding,
        ),
        y.var,
        rules.window_offsets((2, 2)),
    )
    want = rules.relu(*rules.max_pool2d_clark_corr(*z, corr, rules.window_offsets((2, 2)), (2, 2), (2, 2)))
    torch.testing.assert_close(out.mean, want[0])
    torch.testing.assert_close(out.var, want[1])
    # correlation="none" is the independent tree
    assert dnn.set_max_pool(seq, correlation="none") is seq and seq[2].correlation == "none"
    with pytest.raises(ValueError, match="correlation"):
        dnn.set_max_pool(seq, correlation="full")
    plain = seq(x)
    ref = rules.relu(*rules.max_pool2d_clark(*z, (2, 2), (2, 2)))
    torch.testing.assert_close(plain.mean, ref[0])
    assert not torch.allclose(plain.mean, out.mean)


@pytest.mark.parametrize(
    "h,stride,pk,groups,mode",
    [
        (6, (1, 1), (2, 2), 1, "smooth"),
        (7, (1, 1), (2, 2), 2, "meanfield"),
        (9, (2, 2), (2, 2), 1, "smooth"),
        (7, (1, 1), (3, 3), 1, "smooth"),
    ],
)
def test_tiling_fast_path_equals_general_path(h, stride, pk, groups, mode):
    """conv2d_pair_cov / pair_corr / max_pool2d_clark_pairs (windows that tile the map) give
    what conv2d_window_cov / window_corr / max_pool2d_clark_corr give, odd sizes included."""
    g = torch.Generator().manual_seed(8)
    m = torch.randn(2, 4, h, h, dtype=D, generator=g)
    v = torch.rand(2, 4, h, h, dtype=D, generator=g)
    wm = torch.randn(6, 4 // groups, 3, 3, dtype=D, generator=g)
    wv = torch.rand(6, 4 // groups, 3, 3, dtype=D, generator=g) * 0.1
    bv = torch.rand(6, dtype=D, generator=g)
    kw = dict(stride=stride, padding=(1, 1), groups=groups, mode=mode)
    offs = rules.window_offsets(pk)
    full = rules.conv2d_window_cov(m, v, wm, wv, bv, offs, **kw)
    pairs = rules.conv2d_pair_cov(m, v, wm, wv, bv, pk, **kw)
    oh, ow = pairs.shape[-2:]
    for i, (e, f) in enumerate(rules.window_pairs(pk)):
        o = offs.index((f // pk[1] - e // pk[1], f % pk[1] - e % pk[1]))
        want = full[:, o][..., e // pk[1] :: pk[0], e % pk[1] :: pk[1]][..., :oh, :ow]
        torch.testing.assert_close(pairs[:, :, i], want)
    mo, vo = rules.conv(m, v, wm, wv, None, bv, stride=stride, padding=(1, 1), groups=groups)
    fast = rules.max_pool2d_clark_pairs(mo, vo, rules.pair_corr(pairs, vo, pk), pk)
    slow = rules.max_pool2d_clark_corr(mo, vo, rules.window_corr(full, vo, offs), offs, pk, pk)
    torch.testing.assert_close(fast, slow)


def test_from_torch_conversion_pools_pre_activations():
    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten()
    )
    conv = dnn.from_torch(net, bayes=False)
    assert [type(m) for m in conv][:2] == [dnn.Conv2d, dnn.MaxPool2d] and conv[2].name == "relu"
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(conv(x), net(x))
