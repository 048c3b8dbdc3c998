"""dualflow.variational: empirical-Bayes priors (closed-form optimum), the scale-mixture prior's
KL bound (Monte Carlo), the variance hold and KL warm-up hooks; NaturalGradient's damping and
precision hold."""

from __future__ import annotations

import copy

import pytest
import torch

from dualflow import losses
from dualflow import nn as dnn
from dualflow.optim import NaturalGradient
from dualflow.variational import EmpiricalBayesPrior, ScaleMixturePrior, TrainingAids


def _net(dtype: torch.dtype = torch.float64) -> dnn.Sequential:
    torch.manual_seed(0)
    net = dnn.Sequential(
        dnn.Conv2d(2, 3, 3, padding=1, dtype=dtype),
        dnn.ReLU(),
        dnn.Flatten(1),
        dnn.Linear(3 * 4 * 4, 5, dtype=dtype),
        dnn.ReLU(),
        dnn.Linear(5, 4, gain=1.0, dtype=dtype),
    )
    with torch.no_grad():  # spread the variances, so that the groups differ
        for m in net.modules():
            if isinstance(m, dnn.Linear | dnn.Conv2d):
                m.weight_rho.add_(torch.randn_like(m.weight_rho))
    return net


def test_eb_prior_starts_at_the_layer_priors():
    net = _net()
    eb = EmpiricalBayesPrior(net, "in")
    assert torch.allclose(eb.kl(), dnn.kl(net), rtol=1e-12)


@pytest.mark.parametrize("granularity", ["tensor", "in", "out"])
def test_eb_update_minimises_the_kl_over_each_prior(granularity):
    net = _net()
    eb = EmpiricalBayesPrior(net, granularity, floor=1e-12)
    eb.update()
    eb.kl = torch.no_grad()(eb.kl)
    base = float(eb.kl())
    assert base < float(dnn.kl(net))  # the layer priors are not the optimum here
    for name, buf in eb.named_buffers():
        for j in range(buf.numel()):  # every prior value is a minimum in its own coordinate
            for f in (0.9, 1.1):
                saved = buf.clone()
                buf.view(-1)[j] *= f
                assert float(eb.kl()) > base, (name, j, f)
                buf.copy_(saved)
    # shapes broadcast against the weights: one value per input / output feature
    conv_w = eb.priors()[0][1]
    want = {"tensor": (1, 1, 1, 1), "in": (1, 2, 1, 1), "out": (3, 1, 1, 1)}[granularity]
    assert tuple(conv_w.shape) == want


def test_eb_closed_form_value_and_floor():
    net = _net()
    layer = net[3]
    eb = EmpiricalBayesPrior(net, "tensor", floor=1e-12)
    eb.update()
    s0 = (layer.weight_mu.square() + layer.weight_var).mean()
    assert torch.allclose(eb.priors()[1][1].reshape(()), s0, rtol=1e-12)
    with torch.no_grad():
        layer.weight_mu.zero_()
        layer.weight_rho.fill_(-30.0)
    eb2 = EmpiricalBayesPrior(net, "tensor", floor=1e-3)
    eb2.update()
    assert float(eb2.priors()[1][1]) == pytest.approx(1e-3 * layer.prior_var)
    with pytest.raises(ValueError, match="granularity"):
        EmpiricalBayesPrior(net, "rows")


def test_hold_keeps_variances_and_warmup_ramps_the_kl():
    net = _net(torch.float32)
    aids = TrainingAids(net, hold_steps=3, kl_warmup_steps=4)
    assert [aids.kl_factor(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rho0 = net[3].weight_rho.detach().clone()
    mu0 = net[3].weight_mu.detach().clone()
    x, y = torch.randn(16, 2, 4, 4), torch.randint(0, 4, (16,))
    for t in range(5):
        opt.zero_grad()
        loss = losses.categorical_nll(net(x), y) + aids.kl_factor(t) * aids.kl() / 100
        loss.backward()
        aids.before_optimizer_step(t)
        opt.step()
        aids.after_optimizer_step(t)
        if t < 3:
            assert torch.equal(net[3].weight_rho, rho0), t
    assert not torch.equal(net[3].weight_rho, rho0)
    assert not torch.equal(net[3].weight_mu, mu0)


def test_hold_sd_scales_sigma():
    net = _net(torch.float64)
    s_before = net[3].weight_var.sqrt().clone()
    TrainingAids(net, hold_steps=1, hold_sd=0.1)
    assert torch.allclose(net[3].weight_var.sqrt(), 0.1 * s_before, rtol=1e-9)


def test_aids_state_dict_round_trip():
    net = _net()
    aids = TrainingAids(net, prior="eb", eb_granularity="out")
    aids.after_optimizer_step(0)
    other = TrainingAids(copy.deepcopy(net), prior="eb", eb_granularity="out")
    other.load_state_dict(aids.state_dict())
    for a, b in zip(aids.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert float(other.kl()) == pytest.approx(float(aids.kl()), rel=1e-12)
    assert float(other.kl()) != pytest.approx(float(dnn.kl(net)), rel=1e-6)  # not the layer priors


def _train(opt_a, net_a, opt_b, net_b, steps: int = 6) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(32, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (32,))
    for _ in range(steps):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            opt.zero_grad()
            loss = losses.categorical_nll(net(x), y) + dnn.kl(net) / 200
            loss.backward()
            opt.step()


def test_ng_hold_and_damping():
    """NaturalGradient(hold_steps=, damping=): the precision (so sigma) stays at 1/sigma_init^2
    during the hold; the mean step is lr N mom / (lambda + N delta)."""
    b = _net()
    lam_init = [1.0 / m.weight_var.detach().clone() for m in b.modules() if isinstance(m, dnn.Linear)]
    a = _net()
    oa = NaturalGradient(a.parameters(), 200, model=a)
    ob = NaturalGradient(b.parameters(), 200, model=b, hold_steps=3, damping=0.5)
    _train(oa, a, ob, b, steps=3)
    lins = [m for m in b.modules() if isinstance(m, dnn.Linear)]
    for m, lam in zip(lins, lam_init):
        assert torch.allclose(ob.precision(m.weight_mu), lam, rtol=1e-10)
        assert torch.allclose(m.weight_var, 1.0 / lam, rtol=1e-8)
    assert not torch.allclose(oa.precision(a[3].weight_mu), lam_init[0], rtol=1e-3)  # without the hold
    # one step from equal states, with and without damping: the mean moves by lambda / (lambda + N delta)
    c, d = _net(), _net()
    oc = NaturalGradient(c.parameters(), 200, model=c, hold_steps=1)
    od = NaturalGradient(d.parameters(), 200, model=d, hold_steps=1, damping=0.5)
    mu0 = c[3].weight_mu.detach().clone()
    _train(oc, c, od, d, steps=1)
    lam = 1.0 / _net()[3].weight_var.detach()
    ratio = (d[3].weight_mu - mu0) / (c[3].weight_mu - mu0)
    assert torch.allclose(ratio, lam / (lam + 200 * 0.5), rtol=1e-8)
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(d.parameters(), 200, model=d, damping=-1.0)


def test_mixture_kl_bound_against_monte_carlo():
    """The closed-form KL of ScaleMixturePrior is an upper bound of the exact KL(q || mixture)
    (Monte Carlo, 200 000 draws per weight), tight for a weight well inside one component."""
    net = dnn.Sequential(dnn.Linear(1, 4, dtype=torch.float64))
    prior = ScaleMixturePrior(net, pi=0.3, slab_var=0.5, spike_var=1e-4)
    mus = torch.tensor([0.0, 0.01, 0.3, 1.0], dtype=torch.float64)
    sds = torch.tensor([0.01, 0.01, 0.05, 0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for mu, sd in zip(mus, sds):
        with torch.no_grad():
            for p_mu, p_rho in net[0].variational_pairs():
                p_mu.fill_(float(mu))
                p_rho.fill_(float(sd + torch.log(-torch.expm1(-sd))))
        k_bound = float(prior.kl()) / 8  # 4 weights and 4 biases, all equal
        w = mu + sd * torch.randn(200_000, generator=g, dtype=torch.float64)
        log_q = torch.distributions.Normal(mu, sd).log_prob(w)
        comps = torch.stack(
            [
                torch.distributions.Normal(0.0, 0.5**0.5).log_prob(w) + torch.log(torch.tensor(0.3)),
                torch.distributions.Normal(0.0, 1e-2).log_prob(w) + torch.log(torch.tensor(0.7)),
            ]
        )
        diff = log_q - torch.logsumexp(comps, 0)
        k_mc, se = float(diff.mean()), float(diff.std() / 200_000**0.5)
        assert k_bound >= k_mc - 4 * se, (float(mu), k_bound, k_mc)
        if float(mu) >= 0.3:  # well inside the slab: the bound is tight
            assert k_bound == pytest.approx(k_mc, abs=4 * se + 1e-3)
