"""dualflow.optim.NaturalGradient (docs/maths.md section 3).

The exactness tests use a conjugate Bayesian linear regression with known noise and the
``objective="elbo"`` loss: for a one-layer linear network moment propagation computes the
expected log-likelihood exactly, so ``mean J + KL/N`` is exactly the negative ELBO / N, whose
mean-field optimum is known in closed form: mean = exact posterior mean, precision =
diag(posterior precision). And ``h = 2 g_s2`` is then the constant ``diag(X^T X) / (N tau^2)``,
so one step with ``lr = 1``, ``b2 = 1`` must put ``lambda`` on that diagonal from anywhere.
(The predictive objective has a different optimum and a curvature that depends on the
current ``(mu, sigma)``; no one-step statement holds for it.)
"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dualflow as df
from dualflow.optim import NaturalGradient, bounded_mean_step, ng_param_groups, precision_update

DT = torch.float64


def _blr(orthogonal: bool, n: int = 64, d: int = 3, tau2: float = 0.3, s0: float = 2.0, seed: int = 0):
    """Design, targets and the exact posterior (mean, precision matrix) with a bias column."""
    g = torch.Generator().manual_seed(seed)
    if orthogonal:
        # columns orthogonal to each other and to the bias column: diagonal posterior precision
        a = torch.randn(n, d, generator=g, dtype=DT)
        a = a - a.mean(0)
        q, _ = torch.linalg.qr(a)
        x = q * torch.tensor([3.0, 7.0, 1.5], dtype=DT)
    else:
        x = torch.randn(n, d, generator=g, dtype=DT) @ torch.tensor(
            [[1.0, 0.3, 0.0], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]], dtype=DT
        )
        x = x + 0.3
    y = (
        x @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)
        + 0.7
        + math.sqrt(tau2) * torch.randn(n, generator=g, dtype=DT)
    )
    xa = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    lam = torch.eye(d + 1, dtype=DT) / s0 + xa.T @ xa / tau2
    mean = torch.linalg.solve(lam, xa.T @ y / tau2)
    return x, y, mean, lam, tau2, s0


def _net(d: int, s0: float) -> df.nn.Linear:
    net = df.nn.Linear(d, 1, prior_var=s0, gain=1.0, dtype=DT)
    with torch.no_grad():  # an arbitrary starting point, far from the posterior
        net.weight_mu.normal_(0.0, 2.0)
        net.bias_mu.fill_(-3.0)
        net.weight_rho.uniform_(-4.0, 1.0)
        net.bias_rho.fill_(0.5)
    return net


def _flat(net, opt):
    mu = torch.cat([net.weight_mu.detach().flatten(), net.bias_mu.detach().flatten()])
    lam = torch.cat([opt.precision(net.weight_mu).flatten(), opt.precision(net.bias_mu).flatten()])
    lam_rho = 1.0 / torch.cat([net.weight_var.detach().flatten(), net.bias_var.detach().flatten()])
    return mu, lam, lam_rho


def _elbo_step(net, opt, x, y, tau2, n, with_kl=True):
    opt.zero_grad()
    loss = df.losses.gaussian_nll(net(x), y.unsqueeze(1), tau2, "elbo")
    if with_kl:
        loss = loss + net.kl() / n
    loss.backward()
    opt.step()


def test_one_step_lands_on_mean_field_posterior_orthogonal_design():
    """lr = 1, b2 = 1: one step from an arbitrary point lands on (posterior mean, diag precision).
    The design has a diagonal posterior precision, so the mean-field optimum *is* the posterior."""
    x, y, mean, lam, tau2, s0 = _blr(orthogonal=True)
    assert torch.allclose(lam, torch.diag(lam.diag()), atol=1e-9)
    n = x.shape[0]
    net = _net(3, s0)
    opt = NaturalGradient(ng_param_groups(net), n, lr=1.0, betas=(0.0, 1.0))
    _elbo_step(net, opt, x, y, tau2, n)
    mu, prec, prec_rho = _flat(net, opt)
    torch.testing.assert_close(prec, lam.diag(), rtol=1e-12, atol=0)
    torch.testing.assert_close(prec_rho, lam.diag(), rtol=1e-10, atol=0)  # sigma written back to rho
    torch.testing.assert_close(mu, mean, rtol=0, atol=1e-10)


def test_one_step_general_design_is_exact_in_precision_and_jacobi_in_mean():
    """Correlated inputs: what is exactly true of one lr = 1, b2 = 1 step is
    lambda = diag(Lambda) and mu' = mu - diag(Lambda)^-1 (Lambda mu - X^T y / tau^2) (a Jacobi
    step, not the posterior mean); repeated steps converge to the exact posterior mean, and the
    fixed point is the mean-field optimum (posterior mean, diag posterior precision)."""
    x, y, mean, lam, tau2, s0 = _blr(orthogonal=False)
    n = x.shape[0]
    xa = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
    net = _net(3, s0)
    opt = NaturalGradient(ng_param_groups(net), n, lr=1.0, betas=(0.0, 1.0))
    mu0 = torch.cat([net.weight_mu.detach().flatten(), net.bias_mu.detach().flatten()])
    _elbo_step(net, opt, x, y, tau2, n)
    mu1, prec, _ = _flat(net, opt)
    torch.testing.assert_close(prec, lam.diag(), rtol=1e-12, atol=0)
    jacobi = mu0 - (lam @ mu0 - xa.T @ y / tau2) / lam.diag()
    torch.testing.assert_close(mu1, jacobi, rtol=0, atol=1e-10)
    assert float((mu1 - mean).abs().max()) > 1e-2  # one step is not the posterior mean here
    for _ in range(60):
        _elbo_step(net, opt, x, y, tau2, n)
    mu, prec, _ = _flat(net, opt)
    torch.testing.assert_close(mu, mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(prec, lam.diag(), rtol=1e-12, atol=0)


def test_kl_in_gradient_or_not_gives_the_same_step():
    """fit() differentiates mean J + KL/N; the optimizer removes the KL part itself. Passing the
    data term only with kl_weight=0 must give the identical update."""
    x, y, _, _, tau2, s0 = _blr(orthogonal=False)
    n = x.shape[0]
    a, b = _net(3, s0), _net(3, s0)
    b.load_state_dict(a.state_dict())
    oa = NaturalGradient(ng_param_groups(a), n, lr=0.3, betas=(0.9, 0.2))
    ob = NaturalGradient(ng_param_groups(b), n, lr=0.3, betas=(0.9, 0.2), kl_weight=0.0)
    for _ in range(3):
        _elbo_step(a, oa, x, y, tau2, n, with_kl=True)
        _elbo_step(b, ob, x, y, tau2, n, with_kl=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_math_md_ivon_rule_does_not_land_in_one_step_but_converges_quadratically():
    """The project's starting notes (docs/maths.md section 7.2) proposed IVON's correction
    lambda += 0.5 b2^2 (lambda - t)^2 / lambda and said b2 = 1, lr = 1 is the fixed point. The
    fixed point is right, but with the correction on the whole step, one b2 = 1 step from
    lambda != t lands on t + (lambda - t)^2 / (2 lambda), not t.
    (The default rule, positivity="split", applies the correction to the negative-curvature part
    only and lands exactly: see the tests above.)"""
    x, y, _, lam, tau2, s0 = _blr(orthogonal=True)
    n = x.shape[0]
    net = _net(3, s0)
    opt = NaturalGradient(ng_param_groups(net), n, lr=1.0, betas=(0.0, 1.0), positivity="ivon")
    lam0 = 1.0 / torch.cat([net.weight_var.detach().flatten(), net.bias_var.detach().flatten()])
    t = lam.diag()
    errs = []
    for k in range(40):
        _elbo_step(net, opt, x, y, tau2, n)
        prec = _flat(net, opt)[1]
        if k == 0:
            torch.testing.assert_close(prec, t + (lam0 - t) ** 2 / (2 * lam0), rtol=1e-12, atol=0)
            assert float(((prec - t) / t).abs().max()) > 0.1  # far from exact after one step
        errs.append(float(((prec - t) / t).abs().max()))
    assert errs[-1] < 1e-12
    # lambda_{k+1} = (lambda_k^2 + t^2) / (2 lambda_k): Heron's iteration. Far from t it only
    # halves the error per step (and the first step overshoots to ~t^2 / (2 lambda_0) when
    # lambda_0 << t); near t it converges quadratically:
    # e_{k+1} = e_k^2 t / (2 lambda_k) <= min(e_k, e_k^2) / 2, as lambda_k >= t after step 1.
    for e0, e1 in itertools.pairwise(errs):
        assert e1 <= 0.5 * min(e0, e0**2) * (1 + 1e-9) + 1e-15


@pytest.mark.parametrize("positivity", ["split", "ivon"])
@pytest.mark.parametrize("b2", [1.0, 0.5, 0.05])
def test_precision_stays_positive_under_negative_curvature(positivity, b2):
    torch.manual_seed(0)
    net = df.nn.Linear(5, 4, dtype=DT)
    n = 1000
    opt = NaturalGradient(
        ng_param_groups(net), n, lr=1.0, betas=(0.0, b2), positivity=positivity, kl_weight=0
    )
    for step in range(20):
        opt.zero_grad()
        lam_before = 1.0 / net.weight_var.detach()
        # strongly negative, random curvature: g_s2 = -c, c up to 50x what makes lambda + b2 (..) < 0
        g_s2 = -torch.rand_like(net.weight_mu) * 50 * lam_before / n
        sigma = F.softplus(net.weight_rho.detach())
        net.weight_mu.grad = torch.randn_like(net.weight_mu)
        net.weight_rho.grad = g_s2 * 2 * sigma * torch.sigmoid(net.weight_rho.detach())
        net.bias_mu.grad = torch.randn_like(net.bias_mu)
        net.bias_rho.grad = -torch.rand_like(net.bias_rho) * 10
        lam_prev = opt.precision(net.weight_mu)
        lam_prev = lam_before if lam_prev is None else lam_prev
        plain = (1 - b2) * lam_prev + b2 * (1.0 / net.prior_var + 2 * n * g_s2)
        if step == 0:
            assert bool((plain < 0).any())  # the uncorrected update would go negative
        opt.step()
        for p in (net.weight_mu, net.bias_mu):
            lam = opt.precision(p)
            assert bool((lam > 0).all()) and bool(torch.isfinite(lam).all())
        assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
        assert bool((net.weight_var > 0).all())


def test_precision_positive_with_predictive_objective_on_misfit_model():
    """Predictive objective on a badly fit model: g_s2 = (1/s - r^2/s^2) x^2 / 2 is negative where
    residuals exceed the predictive sd; lambda must stay positive through full steps."""
    x, y, _, _, _, s0 = _blr(orthogonal=False, tau2=0.01)
    y = 20 * y  # large residuals
    n = x.shape[0]
    net = _net(3, s0)
    opt = NaturalGradient(ng_param_groups(net), n, lr=1.0, betas=(0.0, 1.0))
    saw_negative = False
    for _ in range(30):
        opt.zero_grad()
        loss = df.losses.gaussian_nll(net(x), y.unsqueeze(1), 0.01, "predictive") + net.kl() / n
        loss.backward()
        sigma = F.softplus(net.weight_rho.detach())
        g_s2 = net.weight_rho.grad / (2 * sigma * torch.sigmoid(net.weight_rho.detach()))
        data = g_s2 - 0.5 * (1 / s0 - 1 / sigma**2) / n
        saw_negative |= bool((data < 0).any())
        opt.step()
        for p in (net.weight_mu, net.bias_mu):
            assert bool((opt.precision(p) > 0).all())
        assert all(bool(torch.isfinite(p).all()) for p in net.parameters())
    assert saw_negative


def test_needs_pairing_information():
    net = df.nn.Sequential(df.nn.Linear(3, 4), df.nn.ReLU(), df.nn.Linear(4, 1, bayes=False))
    with pytest.raises(ValueError, match="which rho belongs to which mu"):
        NaturalGradient(net.parameters(), 10)
    groups = ng_param_groups(net)
    assert [g["gaussian"] for g in groups] == [True, True, False]
    assert groups[0]["prior_precision"] == pytest.approx(1.0 / net[0].prior_var)
    opt = NaturalGradient(net.parameters(), 10, model=net)  # the flat form with model=
    assert len(opt.param_groups) == 3
    opt2 = NaturalGradient(groups, 10, prior_precision=4.0)
    assert all(g["prior_precision"] == 4.0 for g in opt2.param_groups if g["gaussian"])
    with pytest.raises(ValueError):
        NaturalGradient(groups, 0)
    with pytest.raises(ValueError):
        NaturalGradient(groups, 10, positivity="bogus")
    with pytest.raises(ValueError):
        NaturalGradient(groups, 10, betas=(0.9, 0.0))


def test_point_parameters_follow_adam():
    torch.manual_seed(0)
    net = df.nn.Sequential(df.nn.Linear(3, 4), df.nn.ReLU(), df.nn.Linear(4, 2, bayes=False))
    ref = torch.nn.Linear(4, 2)
    with torch.no_grad():
        ref.weight.copy_(net[2].weight_mu)
        ref.bias.copy_(net[2].bias_mu)
    opt = NaturalGradient(ng_param_groups(net), 50, point_lr=0.01)
    ropt = torch.optim.Adam(ref.parameters(), lr=0.01)
    x = torch.randn(8, 3)
    for _ in range(5):
        opt.zero_grad()
        ropt.zero_grad()
        h = net[1](net[0](x)).mean.detach()
        net[2](h).square().sum().backward()
        ref(h).square().sum().backward()
        opt.step()
        ropt.step()
    torch.testing.assert_close(net[2].weight_mu, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[2].bias_mu, ref.bias, rtol=1e-5, atol=1e-6)


def test_state_dict_roundtrip_continues_identically():
    x, y, _, _, tau2, s0 = _blr(orthogonal=False)
    n = x.shape[0]
    a = _net(3, s0)
    oa = NaturalGradient(ng_param_groups(a), n, lr=0.5, betas=(0.9, 0.3))
    for _ in range(2):
        _elbo_step(a, oa, x, y, tau2, n)
    b = _net(3, s0)
    b.load_state_dict(a.state_dict())
    ob = NaturalGradient(ng_param_groups(b), n, lr=0.5, betas=(0.9, 0.3))
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as torch.save / torch.load would
    for _ in range(2):
        _elbo_step(a, oa, x, y, tau2, n)
        _elbo_step(b, ob, x, y, tau2, n)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_momentum_is_debiased_so_first_step_matches_b1_zero():
    x, y, _, _, tau2, s0 = _blr(orthogonal=False)
    n = x.shape[0]
    a, b = _net(3, s0), _net(3, s0)
    b.load_state_dict(a.state_dict())
    oa = NaturalGradient(ng_param_groups(a), n, lr=1.0, betas=(0.0, 1.0))
    ob = NaturalGradient(ng_param_groups(b), n, lr=1.0, betas=(0.9, 1.0))
    _elbo_step(a, oa, x, y, tau2, n)
    _elbo_step(b, ob, x, y, tau2, n)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- safeguards (issue 10)


def test_precision_update_rules_agree_where_curvature_is_nonnegative():
    """Every rule is the plain update of docs/maths.md section 3, (1 - b2) lam + b2 (lam0 + N h),
    where N h >= 0 and lam = lam0 + N h (the fixed point); "split" and "clip" also away from the
    fixed point."""
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(50, dtype=DT, generator=g) * 10 + 0.1
    nh = torch.rand(50, dtype=DT, generator=g) * 100
    for b2 in (1.0, 0.3, 0.01):
        plain = (1 - b2) * lam + b2 * (2.0 + nh)
        for rule in ("split", "clip"):
            torch.testing.assert_close(precision_update(lam, nh, 2.0, b2, rule), plain, rtol=1e-12, atol=0)
        at_fixed_point = precision_update(2.0 + nh, nh, 2.0, b2, "ivon")
        torch.testing.assert_close(at_fixed_point, 2.0 + nh, rtol=1e-12, atol=0)


def test_clip_rule_bounds_the_precision_where_split_explodes():
    """The cause of the bp-ng divergences (results/uci, wine split 17): the predictive objective's
    g_s2 is negative wherever residuals exceed the predictive variance, with |N h| up to 1e4-1e7
    times lam0. "split" then halves lam per step (lam' >= A/2) and, once B = b2 |N h| >> A,
    jumps to ~B^2 / (2 A) (1e7x in one step, measured). "clip" keeps every step a convex
    combination: lam' in [min(lam, lam0), max(lam, lam0 + N h+)], at most a factor 1 - b2 down."""
    lam = torch.tensor([1.0, 1.0, 50.0, 3.0], dtype=DT)
    nh = torch.tensor([-1e6, -3e3, -1e2, 40.0], dtype=DT)
    lam0, b2 = 2.0, 0.1
    split = precision_update(lam, nh, lam0, b2, "split")
    assert float(split[0]) > 1e9  # the jump: (b2 |N h|)^2 / (2 A)
    clip = precision_update(lam, nh, lam0, b2, "clip")
    lo = torch.minimum(lam, torch.tensor(lam0, dtype=DT))
    hi = torch.maximum(lam, lam0 + nh.clamp_min(0))
    assert bool((clip >= lo).all() and (clip <= hi).all())
    assert bool((clip >= (1 - b2) * lam).all())
    with pytest.raises(ValueError, match="positivity"):
        precision_update(lam, nh, lam0, b2, "bogus")


def test_bounded_mean_step():
    delta = torch.tensor([-5.0, -0.1, 0.0, 0.3, 9.0], dtype=DT)
    lam = torch.tensor([1.0, 1.0, 4.0, 100.0, 0.25], dtype=DT)
    out = bounded_mean_step(delta.clone(), lam, 2.0)
    torch.testing.assert_close(out, torch.tensor([-2.0, -0.1, 0.0, 0.2, 4.0], dtype=DT))
    assert bool((out.abs() <= 2.0 / lam.sqrt() + 1e-15).all())


@pytest.mark.parametrize("positivity", ["clip", "split"])
def test_safeguarded_step_keeps_the_one_step_conjugate_property(positivity):
    """With max_step_sd large enough not to bind, the lr = 1, b2 = 1 step still lands exactly."""
    x, y, mean, lam, tau2, s0 = _blr(orthogonal=True)
    n = x.shape[0]
    net = _net(3, s0)
    opt = NaturalGradient(
        ng_param_groups(net), n, lr=1.0, betas=(0.0, 1.0), positivity=positivity, max_step_sd=1e6
    )
    _elbo_step(net, opt, x, y, tau2, n)
    mu, prec, _ = _flat(net, opt)
    torch.testing.assert_close(prec, lam.diag(), rtol=1e-12, atol=0)
    torch.testing.assert_close(mu, mean, rtol=0, atol=1e-10)
