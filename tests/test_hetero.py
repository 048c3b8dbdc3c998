"""Heteroscedastic Gaussian likelihood (issue 10, item 4): closed forms against Monte Carlo,
reduction to the homoscedastic loss, and a method that learns an input-dependent noise."""

from __future__ import annotations

import math

import pytest
import torch

import dualflow as df
import dualflow.methods as dm

D = torch.float64


def _out(b: int = 7, seed: int = 0) -> df.Gaussian:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, 2, dtype=D, generator=g)
    v = torch.rand(b, 2, dtype=D, generator=g) * 0.5 + 0.05
    return df.Gaussian(m, v)


def test_reduces_to_the_homoscedastic_loss_without_epistemic_noise_variance():
    out = _out()
    y = torch.randn(7, 1, dtype=D)
    c = math.log(0.3)
    point_z = df.Gaussian(out.mean, torch.cat([out.var[:, :1], torch.zeros(7, 1, dtype=D)], 1))
    tau2 = torch.exp(out.mean[:, 1:] + c)
    f = df.Gaussian(out.mean[:, :1], out.var[:, :1])
    for objective in ("predictive", "elbo"):
        got = df.losses.heteroscedastic_nll(point_z, y, objective, log_noise_offset=c, min_noise_var=0.0)
        ref = df.losses.gaussian_nll(f, y, tau2, objective)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_elbo_form_and_predictive_moments_match_monte_carlo():
    """E_q[-log N(y; f, exp(z + c))] and E[tau^2] for independent f ~ N(m_f, v_f), z ~ N(m_z, v_z)."""
    out = _out(5, seed=1)
    y = torch.randn(5, 1, dtype=D, generator=torch.Generator().manual_seed(9))
    c = -0.4
    s = 400_000
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(s, 5, 2, dtype=D, generator=g)
    draws = out.mean + out.var.sqrt() * eps
    f, z = draws[..., :1], draws[..., 1:] + c
    nll = 0.5 * (math.log(2 * math.pi) + z + (y - f) ** 2 * torch.exp(-z))  # (S, B, 1)
    mc, se = nll.mean(0), nll.std(0) / math.sqrt(s)
    per_example = torch.stack(
        [
            df.losses.heteroscedastic_nll(
                df.Gaussian(out.mean[i : i + 1], out.var[i : i + 1]), y[i : i + 1], "elbo", c, 0.0
            )
            for i in range(5)
        ]
    )
    assert bool(((per_example - mc.squeeze(1)).abs() < 5 * se.squeeze(1)).all())
    pred = df.losses.HeteroscedasticLikelihood(math.exp(c), min_noise_var=0.0).predictive(out)
    tau2 = torch.exp(z)
    var_mc = f.var(0) + tau2.mean(0)  # law of total variance: Var f + E tau^2 (independent)
    torch.testing.assert_close(pred.mean, out.mean[:, :1])
    assert bool(((pred.var - var_mc).abs() / var_mc < 0.02).all())


def test_gauss_newton_surrogate_matches_the_homoscedastic_one_without_noise_uncertainty():
    """With v_z = 0 the heteroscedastic curvature surrogate is the homoscedastic one at
    tau^2 = E[tau^2] (the log-variance column adds v_z F_z = 0); it is >= 0 and its gradient
    in v_z is F_z / 2 = E[tau^2]^2 / (4 s^2)."""
    out = _out(6, seed=4)
    lik = df.losses.HeteroscedasticLikelihood(0.5, min_noise_var=0.0)
    point_z = df.Gaussian(out.mean, torch.cat([out.var[:, :1], torch.zeros(6, 1, dtype=D)], 1))
    f, e_tau2, _ = df.losses.heteroscedastic_moments(point_z, lik.offset, 0.0)
    ref = (f.var / (f.var + e_tau2)).sum(1).mean() * 0.5
    torch.testing.assert_close(lik.ggn_surrogate(point_z), ref, rtol=1e-12, atol=0)
    v = out.var.clone().requires_grad_(True)
    lik.ggn_surrogate(df.Gaussian(out.mean, v)).backward()
    e_tau2 = df.losses.heteroscedastic_moments(out, lik.offset, 0.0)[1]
    s = out.var[:, :1] + e_tau2
    torch.testing.assert_close(v.grad[:, 1:], (e_tau2 / s) ** 2 / 4 / 6, rtol=1e-10, atol=0)
    assert bool((v.grad >= 0).all())


def test_bad_shapes_give_a_clear_error():
    with pytest.raises(ValueError, match="2 D"):
        df.losses.heteroscedastic_nll(df.Gaussian(torch.zeros(4, 3), torch.ones(4, 3)), torch.zeros(4, 1))


@pytest.mark.parametrize("name", ["bp", "ensemble"])
def test_learns_input_dependent_noise(name):
    """y = x + noise with sd 0.05 for x < 0 and 0.5 for x > 0: the heteroscedastic model's
    predictive variance follows the noise and its test log-likelihood beats the homoscedastic one."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        x = torch.rand(n, 1, generator=g) * 4 - 2
        sd = torch.where(x < 0, 0.05, 0.5)
        return x, x + sd * torch.randn(n, 1, generator=g)

    (xtr, ytr), (xte, yte) = data(400), data(400)
    cfg = df.train.TrainConfig(epochs=300, batch_size=400, lr=0.02, progress=False)
    res = {}
    for noise, d_out in (("homoscedastic", 1), ("heteroscedastic", 2)):
        torch.manual_seed(0)
        m = dm.create(name, dm.mlp_builder(1, 32, d_out), noise=noise, noise_var=0.1, ensemble_size=2)
        m.fit((xtr, ytr), cfg)
        res[noise] = m.evaluate(xte, yte)["nll"]
        p = m.predict(torch.tensor([[-1.0], [1.0]]))
        assert p.mean.shape == (2, 1)
        if noise == "heteroscedastic":
            assert float(p.var[1, 0]) > 10 * float(p.var[0, 0]), p.var
    assert res["heteroscedastic"] < res["homoscedastic"] - 0.3, res
