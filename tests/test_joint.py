"""dualflow.joint: NUTS on the joint (x, y) of a trained model against closed forms, and its errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("pyro")

import dualflow.methods as dm
from dualflow import joint as dj
from dualflow import nn as dnn
from dualflow.train import TrainConfig

MU = torch.tensor([1.0, -1.0])
L = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
W = torch.tensor([0.8, -0.5])
B = 0.3
TAU2 = 0.25


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = MU + torch.randn(n, 2, generator=g) @ L.T
    y = (x @ W + B).unsqueeze(1) + math.sqrt(TAU2) * torch.randn(n, 1, generator=g)
    return x, y


def _linear_method(bayes_fit: bool = True) -> dm.Method:
    """A fitted ``vanilla`` linear-Gaussian model with weights set to ``W``, ``B``, noise ``TAU2``."""
    x, y = _data()
    m = dm.create("vanilla", dm.mlp_builder(2, [], 1), task="regression", noise_var=TAU2, learn_noise=False)
    if bayes_fit:
        m.fit((x, y), TrainConfig(epochs=1, batch_size=64, progress=False))
    lin = m.net[0]
    with torch.no_grad():
        lin.weight_mu.copy_(W.unsqueeze(0))
        lin.bias_mu.fill_(B)
    return m


def _check_moments(values: torch.Tensor, ess: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance within 4.5 Monte Carlo standard errors (from the smallest ESS)."""
    flat = values.reshape(-1, values.shape[-1]).double()
    n_eff = float(ess.min())
    m_hat = flat.mean(0)
    c_hat = torch.cov(flat.T)
    sd = cov.diagonal().sqrt()
    assert torch.all((m_hat - mean).abs() <= 4.5 * sd / math.sqrt(n_eff)), (m_hat, mean, n_eff)
    se_cov = ((cov.diagonal().unsqueeze(0) * cov.diagonal().unsqueeze(1) + cov**2) / n_eff).sqrt()
    assert torch.all((c_hat - cov).abs() <= 4.5 * se_cov), (c_hat, cov, n_eff)


@pytest.mark.parametrize("parameterization", ["noncentered", "centered"])
def test_linear_gaussian_joint_matches_closed_form(parameterization):
    # x ~ N(MU, L L^T) (the base), y | x ~ N(W x + B, TAU2): the joint is Gaussian
    m = _linear_method()
    x, y = _data()
    base = dj.GaussianBase(MU.clone(), L.clone())
    res = dj.sample_joint(
        m, x, y, base=base, chains=4, warmup=80, samples=150, seed=1, parameterization=parameterization
    )
    assert res.x.shape == (4, 150, 2) and res.y.shape == (4, 150, 1)
    assert res.names == ["x[0]", "x[1]", "y[0]"]
    assert res.converged and res.max_rhat < 1.05
    sx = L @ L.T
    mean = torch.cat([MU, (W @ MU + B).reshape(1)]).double()
    cov = torch.zeros(3, 3, dtype=torch.float64)
    cov[:2, :2] = sx
    cov[:2, 2] = cov[2, :2] = sx @ W
    cov[2, 2] = W @ sx @ W + TAU2
    _check_moments(res.monitored(), res.ess, mean, cov)
    rec = res.summary()
    assert rec["settings"]["parameterization"] == parameterization
    assert len(rec["per_dimension"]) == 3 and rec["converged"]


def test_expected_energy_tilts_x_by_the_output_variance():
    # Bayesian linear model: m(x) = W x + B, v_f(x) = sum_i s_i^2 x_i^2 + s_b^2.
    # E_q J = ((y - m)^2 + v_f) / (2 TAU2) + c, so pi(x) ~ p0(x) exp(-v_f(x) / (2 TAU2)): Gaussian with
    # precision Sigma^-1 + diag(s^2) / TAU2, and y | x ~ N(m(x), TAU2) (the predictive would add v_f).
    lin = dnn.Linear(2, 1, bayes=True)
    s2 = torch.tensor([0.3, 0.1])
    with torch.no_grad():
        lin.weight_mu.copy_(W.unsqueeze(0))
        lin.bias_mu.fill_(B)
        lin.weight_rho.copy_(torch.log(torch.expm1(s2.sqrt())).unsqueeze(0))
        lin.bias_rho.fill_(math.log(math.expm1(0.5)))
    net = dnn.Sequential(lin)
    x, y = _data()
    base = dj.GaussianBase(MU.clone(), L.clone())
    res = dj.sample_joint(
        net,
        x,
        y,
        base=base,
        energy="expected",
        task="regression",
        noise_var=TAU2,
        warmup=80,
        samples=150,
        seed=2,
    )
    sx_inv = torch.linalg.inv(L @ L.T)
    prec = sx_inv + torch.diag(s2) / TAU2
    cov_x = torch.linalg.inv(prec)
    mean_x = cov_x @ sx_inv @ MU
    mean = torch.cat([mean_x, (W @ mean_x + B).reshape(1)]).double()
    cov = torch.zeros(3, 3, dtype=torch.float64)
    cov[:2, :2] = cov_x
    cov[:2, 2] = cov[2, :2] = cov_x @ W
    cov[2, 2] = W @ cov_x @ W + TAU2
    _check_moments(res.monitored(), res.ess, mean, cov)


def test_classification_label_and_marginal_match_quadrature():
    # 1-D logistic point classifier, base N(0, 1): p(x | y=1) ~ N(x; 0, 1) sigmoid(a x + c)
    x = torch.linspace(-2, 2, 40).unsqueeze(1)
    y = (x[:, 0] > 0).long()
    m = dm.create("vanilla", dm.mlp_builder(1, [], 2), task="classification")
    m.fit((x, y), TrainConfig(epochs=1, batch_size=40, progress=False))
    with torch.no_grad():
        m.net[0].weight_mu.copy_(torch.tensor([[-1.0], [1.0]]))
        m.net[0].bias_mu.copy_(torch.tensor([0.25, -0.25]))
    base = dj.GaussianBase(torch.zeros(1), torch.ones(1, 1))
    grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    p1 = torch.sigmoid(2 * grid - 0.5)
    w = torch.exp(-0.5 * grid**2) * p1
    mean1 = float((grid * w).sum() / w.sum())
    sd1 = float(((grid - mean1) ** 2 * w).sum().sqrt() / w.sum().sqrt())
    res = dj.sample_joint(m, x, y, base=base, label=1, warmup=60, samples=150, seed=3)
    assert res.y.unique().tolist() == [1]
    assert abs(float(res.x.mean()) - mean1) <= 4.5 * sd1 / math.sqrt(float(res.ess.min()))
    # the x-marginal under the predictive energy is p0 itself; y | x is drawn exactly
    res0 = dj.sample_joint(m, x, y, base=base, label=None, warmup=60, samples=150, seed=4)
    share = float((torch.exp(-0.5 * grid**2) * p1).sum() / torch.exp(-0.5 * grid**2).sum())
    n = res0.y.numel()
    assert abs(float(res0.y.float().mean()) - share) <= 4.5 * math.sqrt(
        share * (1 - share) / float(res0.ess.min())
    )
    assert abs(float(res0.x.mean())) <= 4.5 / math.sqrt(float(res0.ess.min())) and n == 600


@pytest.mark.filterwarnings("ignore::dualflow.joint.ConvergenceWarning")
def test_cache_resumes_identical_chains(tmp_path):
    m = _linear_method()
    x, y = _data()
    kw = dict(chains=4, warmup=30, samples=30, seed=5, cache_dir=tmp_path)
    a = dj.sample_joint(m, x, y, **kw)
    b = dj.sample_joint(m, x, y, **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert all(ci.get("loaded_from_cache") for ci in b.chains_info)
    assert len(list(tmp_path.glob("chain*.pt"))) == 4


@pytest.mark.filterwarnings("ignore::dualflow.joint.ConvergenceWarning")
def test_seeded_runs_are_reproducible_and_leave_global_rng_alone():
    m = _linear_method()
    x, y = _data()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = dj.sample_joint(m, x, y, warmup=20, samples=20, seed=6)
    assert torch.equal(torch.get_rng_state(), before)
    b = dj.sample_joint(m, x, y, warmup=20, samples=20, seed=6)
    assert torch.equal(a.x, b.x)


def test_nonconvergence_warns_and_is_recorded(monkeypatch):
    m = _linear_method()
    x, y = _data()

    def fake(values, max_cells=0):
        p = values.shape[-1]
        return torch.tensor([1.0] * (p - 1) + [1.3], dtype=torch.float64), torch.full((p,), 50.0)

    monkeypatch.setattr(dj, "convergence", fake)
    with pytest.warns(dj.ConvergenceWarning, match="split R-hat"):
        res = dj.sample_joint(m, x, y, warmup=10, samples=20, seed=7)
    assert not res.converged and res.not_converged() == {"y[0]": 1.3}
    rec = res.summary(per_dim=False)
    assert rec["not_converged"] == {"y[0]": 1.3} and rec["warnings"]


def test_convergence_diagnostics_detect_disagreeing_chains():
    g = torch.Generator().manual_seed(0)
    good = torch.randn(4, 200, 3, generator=g)
    rhat, ess = dj.convergence(good)
    assert rhat.max() < 1.05 and ess.min() > 300
    bad = good + torch.tensor([0.0, 0.0, 3.0, 3.0]).view(4, 1, 1)
    rhat_b, _ = dj.convergence(bad)
    assert rhat_b.min() > 1.5
    const = torch.ones(4, 10, 1)
    assert dj.convergence(const)[0].item() == 1.0


# ------------------------------------------------------------------------------ errors


def test_untrained_method_is_refused():
    m = dm.create("bp", dm.mlp_builder(2, [4], 1), task="regression")
    x, y = _data()
    with pytest.raises(ValueError, match="not been trained"):
        dj.sample_joint(m, x, y)


def test_unsupported_models_are_refused():
    x, y = _data()
    with pytest.raises(TypeError, match="unsupported model"):
        dj.sample_joint(lambda t: t, x, y)
    with pytest.raises(ValueError, match="needs task="):
        dj.sample_joint(torch.nn.Linear(2, 1), x, y)
    with pytest.raises(ValueError, match="noise_var"):
        dj.sample_joint(torch.nn.Linear(2, 1), x, y, task="regression")


class _NaNNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * float("nan")


def test_non_finite_energy_at_the_start_is_an_error():
    x, y = _data()
    with pytest.raises(ValueError, match=r"non-finite energy .* chain 0"):
        dj.sample_joint(_NaNNet(), x, y, task="regression", noise_var=1.0)


def test_too_few_chains_or_samples_and_bad_arguments():
    m = _linear_method()
    x, y = _data()
    with pytest.raises(ValueError, match="chains must be >= 4"):
        dj.sample_joint(m, x, y, chains=3)
    with pytest.raises(ValueError, match="samples must be >= 20"):
        dj.sample_joint(m, x, y, samples=10)
    with pytest.raises(ValueError, match="energy must be one of"):
        dj.sample_joint(m, x, y, energy="free")
    with pytest.raises(ValueError, match="label= is for classification"):
        dj.sample_joint(m, x, y, label=0)
    with pytest.raises(ValueError, match=r"NaN|finite"):
        dj.sample_joint(m, x * float("nan"), y)
    with pytest.raises(ValueError, match="split R-hat needs"):
        dj.convergence(torch.zeros(1, 10, 2))


# ------------------------------------------------------------------------------ Method additions


def test_method_is_fitted_predictive_and_state_dict():
    x, y = _data()
    m = dm.create("bp", dm.mlp_builder(2, [4], 1), task="regression")
    assert not m.is_fitted
    m.fit((x, y), TrainConfig(epochs=1, batch_size=32, progress=False))
    assert m.is_fitted
    m2 = dm.create("bp", dm.mlp_builder(2, [4], 1), task="regression")
    m2.load_state_dict(m.state_dict())
    assert m2.is_fitted
    # predictive: the distribution of predict, differentiable in x
    m.eval()
    xq = x[:5].clone().requires_grad_(True)
    g = m.predictive(xq)
    (g.mean.sum() + g.var.sum()).backward()
    assert xq.grad is not None and torch.isfinite(xq.grad).all() and xq.grad.abs().sum() > 0
    p = m.predict(x[:5])
    torch.testing.assert_close(g.mean.detach(), p.mean)
    torch.testing.assert_close(g.var.detach(), p.var)
    with pytest.raises(ValueError, match="unknown propagation"):
        m.predictive(x, propagation="nope")


def test_gaussian_base_fit_and_whitening():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g) @ torch.tensor([[2.0, 0, 0], [1.0, 1.0, 0], [0, 0, 0.0]]).T
    base = dj.GaussianBase.fit(x)  # a constant feature: the shrinkage keeps it invertible
    z = base.whiten(x)
    torch.testing.assert_close(base.unwhiten(z), x, atol=1e-4, rtol=1e-4)
    ref = torch.distributions.MultivariateNormal(base.mean.double(), scale_tril=base.scale_tril.double())
    torch.testing.assert_close(
        base.log_prob(x[:4]).double(), ref.log_prob(x[:4].double()), atol=1e-3, rtol=1e-4
    )
    with pytest.raises(ValueError, match="at least 2"):
        dj.GaussianBase.fit(x[:1])


def test_import_dualflow_does_not_import_pyro():
    import subprocess
    import sys

    code = "import sys, dualflow, dualflow.joint; assert 'pyro' not in sys.modules, 'pyro imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.filterwarnings("ignore::dualflow.joint.ConvergenceWarning")
def test_warnings_filter_unchanged():
    before = list(warnings.filters)
    m = _linear_method()
    x, y = _data()
    dj.sample_joint(m, x, y, warmup=10, samples=20, seed=8)
    assert list(warnings.filters) == before


# ------------------------------------------------------------------------------ the command


@pytest.mark.slow
def test_cli_boston_smoke(tmp_path, monkeypatch, data_root):
    import json

    from dualflow.experiments import joint as ej
    from dualflow.experiments.cli import main

    monkeypatch.setitem(ej.BOSTON_RECIPE, "epochs", 3)
    args = ["joint", "boston", "--warmup", "5", "--samples", "20", "--energies", "predictive"]
    args += ["--out-dir", str(tmp_path), "--workdir", "", "--data-dir", str(data_root), "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dj.ConvergenceWarning)  # 25 steps per chain
        assert main(args) == 0
    assert (tmp_path / "fig2_boston.png").stat().st_size > 10_000
    rec = json.loads((tmp_path / "fig2_boston.json").read_text())
    assert set(rec["chain_sets"]) == {
        "bp/predictive",
        "vanilla_a/predictive",
        "vanilla_b/predictive",
        "ensemble/predictive",
    }
    one = rec["chain_sets"]["bp/predictive"]
    assert len(one["per_dimension"]) == 14 and one["chains"] == 4 and one["samples_per_chain"] == 20
    assert {"versions", "seed", "cpu_seconds", "options"} <= set(rec)
    assert rec["networks"]["bp"]["test_rmse"] > 0


def test_cli_rejects_bad_options_before_work(tmp_path, capsys):
    from dualflow.experiments.cli import main

    assert main(["joint", "mixture", "--chains", "3", "--out-dir", str(tmp_path)]) == 2
    assert "--chains must be >= 4" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["joint", "mixture", "--out-dir", str(blocker / "sub")]) == 2
    assert "cannot write --out-dir" in capsys.readouterr().err
    assert main(["joint", "mixture", "--samples", "10", "--out-dir", str(tmp_path)]) == 2
    assert "--samples must be >= 20" in capsys.readouterr().err
    assert main(["joint", "images", "--workers", "2", "--workdir", "", "--out-dir", str(tmp_path)]) == 2
    assert "needs a --workdir" in capsys.readouterr().err
    assert main(["joint", "images", "--energies", "predictive,expected", "--out-dir", str(tmp_path)]) == 2
    assert "give one energy" in capsys.readouterr().err


def test_cli_without_pyro_names_the_pip_line(tmp_path, monkeypatch, capsys):
    import sys

    from dualflow.experiments.cli import main

    monkeypatch.setitem(sys.modules, "pyro", None)  # import pyro -> ImportError
    assert main(["joint", "mixture", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'dualflow[hmc]'" in err
