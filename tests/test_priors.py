"""Empirical-Bayes priors and closed-form noise (issue 10, item 1; docs/maths.md section 3.2).

The claims proved here, in float64:
* the closed-form prior variance of a tensor, ``mean(mu^2 + sigma^2)`` (with a hyperprior:
  its MAP-II form), is the numerical maximiser of the ELBO in that prior variance;
* the KL at the optimal prior has the gradient of the profiled objective (envelope theorem):
  detaching ``s0*`` or differentiating through it gives the same gradient;
* the closed-form ELBO noise variance is the numerical optimum;
* the natural-gradient optimizer uses the same prior the KL was evaluated at.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import minimize_scalar

import dualflow as df
from dualflow import nn as dnn
from dualflow.optim import NaturalGradient, ng_param_groups

D = torch.float64


def _net(seed: int = 0) -> dnn.Sequential:
    torch.manual_seed(seed)
    net = dnn.Sequential(dnn.Linear(3, 5, dtype=D), dnn.ReLU(), dnn.Linear(5, 1, dtype=D))
    with torch.no_grad():  # an arbitrary q, far from the prior
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.7 - (1.5 if "rho" in _name_of(net, p) else 0.0))
    return net


def _name_of(net: torch.nn.Module, p: torch.Tensor) -> str:
    return next(n for n, q in net.named_parameters() if q is p)


def _elbo(net, x, y, tau2, layer, which: str, s0: float) -> float:
    """Negative ELBO / N with the prior variance of one tensor (``which`` of ``layer``) set to ``s0``
    and every other tensor at its fixed prior."""
    n = x.shape[0]
    data = df.losses.gaussian_nll(net(x), y, tau2, "elbo")
    total = data * 0
    for mod in net.modules():
        if isinstance(mod, dnn.BayesLayer):
            for name, (mu, var) in (
                ("weight", (mod.weight_mu, mod.weight_var)),
                ("bias", (mod.bias_mu, mod.bias_var)),
            ):
                prior = s0 if (mod is layer and name == which) else mod._prior_var
                total = total + dnn.kl_normal(mu, var, prior)
    return float((data + total / n).detach())


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("pseudo_count", [0.0, 11.0])
def test_closed_form_prior_variance_is_the_numerical_optimum_of_the_elbo(which, pseudo_count):
    net = _net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, dtype=D, generator=g)
    y = torch.randn(40, 1, dtype=D, generator=g)
    layer = net[2] if which == "weight" else net[0]
    anchor = layer._prior_var
    mu, var = (layer.weight_mu, layer.weight_var) if which == "weight" else (layer.bias_mu, layer.bias_var)
    closed = float(dnn.empirical_prior_var(mu, var, anchor, pseudo_count))
    # the hyperprior IG(a, b) with pseudo_count = 2 (a + 1), anchor = b / (a + 1) (its mode)
    a = pseudo_count / 2 - 1
    b = (a + 1) * anchor
    n = x.shape[0]

    def objective(log_s0: float) -> float:
        s0 = math.exp(log_s0)
        hyper = 0.0 if pseudo_count == 0 else -((a + 1) * math.log(s0) + b / s0)  # log IG up to a constant
        return _elbo(net, x, y, 0.3, layer, which, s0) - hyper / n

    res = minimize_scalar(objective, bounds=(-12, 8), method="bounded", options={"xatol": 1e-10})
    assert math.exp(res.x) == pytest.approx(closed, rel=1e-6)
    if pseudo_count == 0:  # plain type-II ML: the mean second moment
        assert closed == pytest.approx(float((mu.detach() ** 2 + var.detach()).mean()), rel=1e-12)


def test_kl_at_optimal_prior_has_the_profiled_gradient():
    """Envelope theorem: d/dq KL(q || p_{s0*(q)}) with s0* differentiated through equals the KL's
    gradient at s0 held fixed at s0*. The layer detaches s0*; its gradient must match the
    fully differentiated profile ``0.5 (n log s0*(q) - sum log sigma^2)``."""
    net = _net(3)
    dnn.set_prior(net, "empirical", pseudo_count=0.0)
    grads = torch.autograd.grad(dnn.kl(net), list(net.parameters()))
    profile = 0.0
    for mod in net.modules():
        if isinstance(mod, dnn.BayesLayer):
            for mu, var in ((mod.weight_mu, mod.weight_var), (mod.bias_mu, mod.bias_var)):
                s0 = (mu**2 + var).mean()  # differentiated through
                profile = profile + 0.5 * (mu.numel() * torch.log(s0) - torch.log(var).sum())
    ref = torch.autograd.grad(profile, list(net.parameters()))
    for a_, b_ in zip(grads, ref):
        torch.testing.assert_close(a_, b_, rtol=1e-10, atol=1e-12)
    # and the value is the profiled KL
    torch.testing.assert_close(dnn.kl(net), profile, rtol=1e-12, atol=1e-12)


def test_prior_var_reading_and_set_prior():
    net = _net()
    lin = net[0]
    assert lin.prior_var == pytest.approx(2.0 / 3)  # gain^2 / fan_in, a float
    lin.prior_var = 0.5
    assert lin.prior_var == 0.5
    with pytest.raises(ValueError, match="prior_var"):
        lin.prior_var = -1.0
    dnn.set_prior(net, "empirical")
    assert lin.prior_pseudo_count == dnn.EMPIRICAL_PSEUDO_COUNT == 11.0  # DVI's hyperprior by default
    dnn.set_prior(net, "empirical", pseudo_count=0.0)
    w, b = lin.prior_variances()
    assert lin.prior_var == pytest.approx(float(w))  # reading gives the value in effect
    assert float(w) == pytest.approx(float((lin.weight_mu**2 + lin.weight_var).mean()), rel=1e-12)
    assert float(b) == pytest.approx(float((lin.bias_mu**2 + lin.bias_var).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="prior must be one of"):
        dnn.set_prior(net, "flat")
    with pytest.raises(ValueError, match="pseudo_count"):
        dnn.set_prior(net, "empirical", pseudo_count=-1)
    # the KL at the optimal prior is never larger than at any fixed prior
    kl_eb = float(dnn.kl(net))
    dnn.set_prior(net, "fixed")
    assert kl_eb <= float(dnn.kl(net)) + 1e-12
    point = dnn.Linear(3, 2, bayes=False, dtype=D)
    dnn.set_prior(point, "empirical")
    assert float(point.kl_own()) == 0.0 and point.prior_var == pytest.approx(2.0 / 3)


def test_methods_take_the_prior_option():
    import dualflow.methods as dm

    build = dm.mlp_builder(3, 4, 1)
    assert dm.create("bp", build).net[0].prior == "empirical"  # the default of bp and bp-ng (regression)
    assert dm.create("bp-ng", build).net[0].prior == "empirical"
    assert dm.create("bp", build, task="classification").net[0].prior == "fixed"
    assert dm.create("bp", build, prior="fixed").net[0].prior == "fixed"
    assert dm.create("reparam", build).net[0].prior == "fixed"
    with pytest.raises(ValueError, match="prior must be one of"):
        dm.create("bp", build, prior="flat")


def test_natural_gradient_uses_the_empirical_prior_of_the_kl():
    """One NG step with prior="empirical" equals one with the fixed prior precision set to the
    current 1/s0* of each tensor (the prior its KL was evaluated at)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 3, dtype=D, generator=g)
    y = torch.randn(30, 1, dtype=D, generator=g)
    a, b = _net(5), _net(5)
    dnn.set_prior(a, "empirical", pseudo_count=4.0)
    groups_b = ng_param_groups(b)
    for mod_a, mod_b in zip(a.modules(), b.modules()):
        if isinstance(mod_a, dnn.BayesLayer):
            w, bias = mod_a.prior_variances()
            mod_b.weight_prior, mod_b.bias_prior = float(w), float(bias)
    for grp in groups_b:
        if grp["gaussian"]:
            mu = grp["params"][0]
            mod = next(
                m
                for m in b.modules()
                if isinstance(m, dnn.BayesLayer) and (mu is m.weight_mu or mu is m.bias_mu)
            )
            grp["prior_precision"] = 1.0 / (mod.weight_prior if mu is mod.weight_mu else mod.bias_prior)
    oa = NaturalGradient(ng_param_groups(a), 30, lr=0.5, betas=(0.5, 0.3))
    ob = NaturalGradient(groups_b, 30, lr=0.5, betas=(0.5, 0.3))
    for net, opt in ((a, oa), (b, ob)):
        opt.zero_grad()
        # b's KL at the same (fixed) priors as a's optimum
        if net is a:
            kl = dnn.kl(net)
        else:
            kl = sum(
                dnn.kl_normal(m.weight_mu, m.weight_var, m.weight_prior)
                + dnn.kl_normal(m.bias_mu, m.bias_var, m.bias_prior)
                for m in net.modules()
                if isinstance(m, dnn.BayesLayer)
            )
        (df.losses.gaussian_nll(net(x), y, 0.5) + kl / 30).backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_closed_form_elbo_noise_is_the_numerical_optimum():
    net = _net(7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(25, 3, dtype=D, generator=g)
    y = torch.randn(25, 1, dtype=D, generator=g)
    with torch.no_grad():
        out = net(x)
    closed = float(df.losses.elbo_noise_var(out, y))
    res = minimize_scalar(
        lambda t: float(df.losses.gaussian_nll(out, y, math.exp(t), "elbo")),
        bounds=(-10, 10),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert math.exp(res.x) == pytest.approx(closed, rel=1e-6)
    lik = df.losses.GaussianLikelihood(1.0, objective="elbo", empirical=True, ema=1.0).double()
    lik.train()
    lik(out, y)
    assert float(lik.noise_var) == pytest.approx(closed, rel=1e-6)  # full batch, ema 1: exact
    with pytest.raises(ValueError, match="objective='elbo'"):
        df.losses.GaussianLikelihood(1.0, objective="predictive", empirical=True)


def test_method_options_are_traits_and_the_state_dict_keeps_its_keys():
    """prior/noise/NG safeguards are Traits (validated), and they add no state_dict keys."""
    import dualflow.methods as dm

    build = dm.mlp_builder(3, 4, 1)
    m = dm.create("bp-ng", build, curvature="ggn", positivity="clip", precision_debias=True, max_step_sd=1.0)
    opt = m.traits.optimizer
    assert (opt.curvature, opt.positivity, opt.precision_debias, opt.max_step_sd) == (
        "ggn",
        "clip",
        True,
        1.0,
    )
    assert m.traits.prior == "auto" and m.prior == "empirical" and m.traits.ggn
    plain = dm.create("bp-ng", build, prior="fixed")
    assert set(m.state_dict()) == set(plain.state_dict())
    with pytest.raises(ValueError, match="curvature must be one of"):
        dm.create("bp-ng", build, curvature="hessian")
    with pytest.raises(ValueError, match="needs propagation 'moments'"):
        dm.create("reparam-ng-ensemble", build, curvature="ggn")
    with pytest.raises(ValueError, match="applies to regression"):
        dm.create("bp", build, task="classification", noise="heteroscedastic")
    with pytest.raises(ValueError, match="needs objective='elbo'"):
        dm.create("bp", build, noise="empirical")
    with pytest.raises(TypeError, match="takes no option 'curvature'"):
        dm.create("bp", build, curvature="ggn")


def test_ggn_curvature_reaches_the_optimizer_at_every_training_step(monkeypatch):
    import dualflow as df
    import dualflow.methods as dm
    from dualflow.optim import NaturalGradient

    calls = []
    orig = NaturalGradient.set_curvature
    monkeypatch.setattr(NaturalGradient, "set_curvature", lambda self, s: calls.append(1) or orig(self, s))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, 1, generator=g)
    cfg = df.train.TrainConfig(epochs=3, batch_size=20, progress=False, threads=1)
    dm.create("bp-ng", dm.mlp_builder(3, 4, 1), curvature="ggn").fit((x, y), cfg)
    assert len(calls) == 6  # 3 epochs x 2 batches
    calls.clear()
    dm.create("bp-ng", dm.mlp_builder(3, 4, 1)).fit((x, y), cfg)  # the gradient curvature: none
    assert calls == []
