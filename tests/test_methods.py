"""dualflow.methods: the registry, sampling propagation on the BP layers, and every method on
a conjugate model and on real data (scikit-learn's built-in diabetes and wine sets)."""

import copy
import functools
import math

import numpy as np
import pytest
import torch

import dualflow as df
import dualflow.methods as dm

EXPECTED = [
    "bp",
    "bp-ng",
    "vanilla",
    "reparam",
    "local-reparam",
    "flipout",
    "ensemble",
    "mc-dropout",
    "reparam-ng-ensemble",
]
BAYESIAN = ["bp", "bp-ng", "reparam", "local-reparam", "flipout", "reparam-ng-ensemble"]
SAMPLING_MODES = ["reparam", "local", "flipout"]


# ----------------------------------------------------------------------------- registry


def test_available_is_exactly_the_issue_list():
    assert dm.available() == EXPECTED
    for name in EXPECTED:
        assert dm.describe(name)  # documented


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError) as e:
        dm.create("svgd", dm.mlp_builder(2, 4, 1))
    for name in EXPECTED:
        assert name in str(e.value)


def test_bad_options_raise():
    b = dm.mlp_builder(2, 4, 1)
    with pytest.raises(TypeError):
        dm.create("vanilla", b, objective="elbo")  # an option the method does not take
    with pytest.raises(ValueError):
        dm.create("bp", b, task="ranking")
    with pytest.raises(ValueError):
        dm.create("bp", b, objective="mse")
    with pytest.raises(ValueError):
        dm.create("bp", b).predict(torch.randn(3, 2), propagation="gibbs")


# ----------------------------------------------------------------------------- propagation


def _layers():
    return {
        "linear": (df.nn.Linear(4, 3, init_var_ratio=0.5), torch.randn(6, 4)),
        "conv2d": (df.nn.Conv2d(2, 3, 3, padding=1, init_var_ratio=0.5), torch.randn(2, 2, 4, 4)),
        "conv1d": (df.nn.Conv1d(2, 3, 3, init_var_ratio=0.5), torch.randn(2, 2, 6)),
    }


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_sampling_modes_have_the_moment_marginals(mode, kind):
    """Every output element of a sampling mode is distributed as W x + b, W ~ q: its Monte Carlo
    mean and variance match the moments of Algorithm 1 for the same parameters."""
    torch.manual_seed(0)
    layer, x = _layers()[kind]
    layer.double()
    x = x.double()
    with torch.no_grad():
        layer.bias_rho.fill_(-1.0)
        ref = layer(x)
        k = 4000
        with dm.propagation(layer, mode):
            s = torch.stack([layer(x) for _ in range(k)])
    assert isinstance(ref, df.Gaussian) and isinstance(s, torch.Tensor)
    z_mean = (s.mean(0) - ref.mean) / (ref.var / k).sqrt()
    # var of the sample variance of a Gaussian: 2 v^2 / (k - 1)
    z_var = (s.var(0) - ref.var) / (ref.var * math.sqrt(2.0 / (k - 1)))
    assert float(z_mean.abs().max()) < 5.0
    assert float(z_var.abs().max()) < 5.0


def test_set_propagation_and_context_manager():
    net = dm.mlp_builder(3, [5, 5], 2)(True)
    assert dm.get_propagation(net) == "moments"
    x = torch.randn(4, 3)
    assert isinstance(net(x), df.Gaussian)
    with dm.propagation(net, "flipout"):
        assert dm.get_propagation(net) == "flipout"
        out = net(x)
        assert isinstance(out, torch.Tensor) and out.shape == (4, 2)
        with pytest.raises(TypeError, match="plain tensor"):
            net[0](df.Gaussian(x, torch.ones_like(x)))
    assert dm.get_propagation(net) == "moments"
    dm.set_propagation(net, "local")
    assert all(layer.propagation == "local" for layer in net if isinstance(layer, df.nn.BayesLayer))
    with pytest.raises(ValueError, match="known"):
        dm.set_propagation(net, "gibbs")
    point = dm.mlp_builder(3, 5, 2)(False)
    dm.set_propagation(point, "reparam")  # point layers compute W x + b in every mode
    with torch.no_grad():
        torch.testing.assert_close(point(x), dm.set_propagation(point, "moments")(x))
    assert dm.PROPAGATIONS == ("moments", "reparam", "local", "flipout")


def test_dropout_moments_and_mc_switch():
    """Dropout's Gaussian rule (mean m, variance (v + p m^2) / (1 - p)) against Monte Carlo;
    active in training mode, identity in eval mode unless MC dropout is switched on."""
    torch.manual_seed(0)
    d = df.nn.Dropout(0.3)
    mm, vv = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.2, 0.5]])
    xs = mm + vv.sqrt() * torch.randn(200000, 2)
    ys = d(xs)  # training mode: masks are drawn
    r = d(df.Gaussian(mm, vv))
    assert float((ys.mean(0) - r.mean).abs().max()) < 0.01
    assert float((ys.var(0) / r.var - 1).abs().max()) < 0.02
    d.eval()
    assert d(xs) is xs
    with dm.mc_dropout(d):
        assert not torch.equal(d(xs), xs)
    assert d(xs) is xs
    with pytest.raises(ValueError):
        df.nn.Dropout(1.0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_sampling_gradients_are_unbiased_estimates_of_the_elbo_gradient(mode):
    """One-layer linear network, Gaussian likelihood: moment propagation computes E_q[J] exactly,
    so BP's gradient with objective="elbo" is the exact ELBO gradient. The sampling gradient,
    averaged over many draws, must match it within a few standard errors, and must not match
    the gradient of a different objective (the predictive one: a check that the test has power)."""
    torch.manual_seed(0)
    dt = torch.float64
    net = df.nn.Linear(3, 2, init_var_ratio=0.4, dtype=dt)
    x, y, tau2 = torch.randn(8, 3, dtype=dt), torch.randn(8, 2, dtype=dt), 0.3
    params = list(net.parameters())

    def grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    ref = grad(df.losses.gaussian_nll(net(x), y, tau2, "elbo"))
    other = grad(df.losses.gaussian_nll(net(x), y, tau2, "predictive"))
    k = 3000
    with dm.propagation(net, mode):
        g = torch.stack([grad(df.losses.gaussian_nll(net(x), y, tau2)) for _ in range(k)])
    mean, se = g.mean(0), g.std(0) / math.sqrt(k)
    assert bool((se > 0).all())
    assert float(((mean - ref) / se).abs().max()) < 4.5
    assert float(((mean - other) / se).abs().max()) > 10.0


# ----------------------------------------------------------------------------- conjugate model


def _conjugate_problem():
    g = torch.Generator().manual_seed(1)
    n, tau2, s0 = 200, 0.25, 1.0
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 0.5, 2.0], dtype=torch.float64
    )
    y = x @ torch.tensor([0.8, -1.5, 0.3], dtype=torch.float64) + 0.4
    y = y + math.sqrt(tau2) * torch.randn(n, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    lam = torch.eye(4, dtype=torch.float64) / s0 + xa.T @ xa / tau2
    mean = torch.linalg.solve(lam, xa.T @ y / tau2)
    # mean-field optimum of the ELBO: exact posterior mean, variance 1 / diag(precision)
    return x.float(), y.float(), mean, 1.0 / lam.diag(), tau2, s0


def test_conjugate_linear_regression_every_bayesian_method_approaches_the_mean_field_posterior():
    """Bayesian linear regression with known noise. For a mean-field Gaussian q the ELBO optimum
    is exactly (posterior mean, 1/diag(posterior precision)) (the full posterior covariance is
    not representable). BP (objective="elbo", exact expected log-likelihood) and BP+NG reach it
    up to optimisation error; the sampling methods approach it with Monte Carlo noise."""
    x, y, mean, var, tau2, s0 = _conjugate_problem()

    def build(bayes, dropout=0.0):
        return df.nn.Linear(3, 1, bayes=bayes, prior_var=s0, gain=1.0)

    cfg = df.train.TrainConfig(epochs=200, batch_size=50, lr=0.05, progress=False)
    err = {}
    for name in BAYESIAN:
        torch.manual_seed(0)
        opts = {"objective": "elbo", "prior": "fixed"} if name in ("bp", "bp-ng") else {}
        m = dm.create(name, build, noise_var=tau2, learn_noise=False, **opts)
        m.fit((x, y), cfg)
        net = m.net
        mu = torch.cat([net.weight_mu.flatten(), net.bias_mu.flatten()]).detach().double()
        v = torch.cat([net.weight_var.flatten(), net.bias_var.flatten()]).detach().double()
        err[name] = (
            float(((mu - mean).abs() / var.sqrt()).max()),  # mean error in posterior sds
            float((v.sqrt() / var.sqrt() - 1).abs().max()),  # relative error of the sd
        )
    for name in ("bp", "bp-ng"):
        assert err[name][0] < 0.02 and err[name][1] < 0.02, (name, err[name])
    for name in BAYESIAN[2:]:
        assert err[name][0] < 0.25 and err[name][1] < 0.4, (name, err[name])
    worst_bp = max(max(err["bp"]), max(err["bp-ng"]))
    best_sampling = min(max(err[n]) for n in BAYESIAN[2:])
    assert worst_bp < best_sampling, err


# ----------------------------------------------------------------------------- real data


@functools.cache
def _diabetes():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    te, tr = perm[:89], perm[89:]
    xm, xs, ym, ys = x[tr].mean(0), x[tr].std(0), y[tr].mean(), y[tr].std()

    def f(a):
        return torch.as_tensor(a, dtype=torch.float32)

    xtr, xte, ytr, yte = (
        f((x[tr] - xm) / xs),
        f((x[te] - xm) / xs),
        f((y[tr] - ym) / ys),
        f((y[te] - ym) / ys),
    )
    # constant predictor N(train mean, train variance), in the same standardised units
    const = float(-df.losses.gaussian_log_density(torch.zeros(len(yte)), yte, 1.0).mean())
    return xtr, ytr, xte, yte, const


@functools.cache
def _wine():
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    te, tr = perm[:48], perm[48:]
    xm, xs = x[tr].mean(0), x[tr].std(0)
    freq = np.bincount(y[tr], minlength=3) / len(tr)
    const = float(-np.log(freq[y[te]]).mean())  # constant predictor: training class frequencies

    def f(a):
        return torch.as_tensor(a, dtype=torch.float32)

    return f((x[tr] - xm) / xs), torch.as_tensor(y[tr]), f((x[te] - xm) / xs), torch.as_tensor(y[te]), const


@functools.cache
def _trained_regression(name):
    xtr, ytr, *_ = _diabetes()
    torch.manual_seed(0)
    m = dm.create(name, dm.mlp_builder(10, 32, 1), noise_var=0.5, ensemble_size=3, samples=32)
    cfg = df.train.TrainConfig(epochs=25, batch_size=32, lr=3e-3, progress=False)
    hist = m.fit((xtr, ytr), cfg)
    return m, hist


@pytest.mark.parametrize("name", EXPECTED)
def test_every_method_beats_a_constant_predictor_on_diabetes(name):
    _, _, xte, yte, const = _diabetes()
    m, hist = _trained_regression(name)
    assert len(hist) == 25 and all(math.isfinite(v) for v in hist["loss"])
    res = m.evaluate(xte, yte)
    assert res["nll"] < const - 0.15, (name, res, const)
    p = m.predict(xte)
    assert isinstance(p, df.Gaussian) and p.mean.shape == (len(yte), 1)
    assert bool((p.var >= m.noise_var * (1 - 1e-6)).all())  # the noise is part of the predictive


@pytest.mark.parametrize("name", EXPECTED)
def test_every_method_beats_a_constant_predictor_on_wine(name):
    xtr, ytr, xte, yte, const = _wine()
    torch.manual_seed(0)
    m = dm.create(name, dm.mlp_builder(13, 32, 3), task="classification", ensemble_size=3, samples=16)
    m.fit((xtr, ytr), df.train.TrainConfig(epochs=20, batch_size=32, lr=1e-2, progress=False))
    p = m.predict(xte)
    assert p.shape == (len(yte), 3)
    torch.testing.assert_close(p.sum(1), torch.ones(len(yte)))
    res = m.evaluate(xte, yte)
    assert res["nll"] < 0.5 * const and res["accuracy"] > 0.85, (name, res, const)


def test_switching_propagation_on_trained_models():
    """A model trained by BP evaluates by weight sampling (and vice versa) with nearly the same
    predictive quality; the method's own propagation is restored afterwards."""
    _, _, xte, yte, const = _diabetes()
    bp, _ = _trained_regression("bp")
    own = bp.evaluate(xte, yte)
    torch.manual_seed(0)
    for mode in SAMPLING_MODES:
        r = bp.evaluate(xte, yte, propagation=mode, samples=64)
        assert r["nll"] < const - 0.15 and abs(r["nll"] - own["nll"]) < 0.05, (mode, r, own)
        assert dm.get_propagation(bp.net) == "moments"
    lr_, _ = _trained_regression("local-reparam")
    r_own = lr_.evaluate(xte, yte, samples=256)
    r_bp = lr_.evaluate(xte, yte, propagation="moments")
    assert r_bp["nll"] < const - 0.15 and abs(r_bp["nll"] - r_own["nll"]) < 0.05, (r_bp, r_own)
    assert dm.get_propagation(lr_.net) == "local"


def test_state_dict_roundtrip():
    _, _, xte, _, _ = _diabetes()
    for name in ("bp", "ensemble"):
        m, _ = _trained_regression(name)
        fresh = dm.create(name, dm.mlp_builder(10, 32, 1), noise_var=2.0, ensemble_size=3)
        fresh.load_state_dict(m.state_dict())
        a, b = m.predict(xte), fresh.predict(xte)
        torch.testing.assert_close(a.mean, b.mean)
        torch.testing.assert_close(a.var, b.var)


@pytest.mark.parametrize("name", ["bp-ng", "reparam"])
def test_checkpoint_resume_is_exact(name, tmp_path):
    """fit()'s checkpoint holds the method (networks + likelihood) and its optimizer state
    (NaturalGradient's precisions and momenta included): 2 + 2 resumed epochs == 4 epochs."""
    xtr, ytr, *_ = _diabetes()
    xtr, ytr = xtr[:96], ytr[:96]
    build = dm.mlp_builder(10, 8, 1)

    def run(epochs, ckpt):
        torch.manual_seed(0)
        m = dm.create(name, build, noise_var=0.5)
        cfg = df.train.TrainConfig(
            epochs=epochs, batch_size=32, lr=3e-3, schedule="constant", progress=False, checkpoint=ckpt
        )
        m.fit((xtr, ytr), cfg)
        return m

    full = run(4, None)
    ck = str(tmp_path / "ck.pt")
    run(2, ck)
    resumed = run(4, ck)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- traits and composition


def test_registry_is_data_and_experiments_read_traits():
    t = {name: dm.traits_of(name) for name in EXPECTED}
    assert {n for n in EXPECTED if t[n].natural_gradient} == {"bp-ng", "reparam-ng-ensemble"}
    assert {n for n in EXPECTED if t[n].gaussian} == set(BAYESIAN)
    assert {n: t[n].propagation for n in EXPECTED if t[n].sampling} == {
        "reparam": "reparam",
        "local-reparam": "local",
        "flipout": "flipout",
        "reparam-ng-ensemble": "reparam",
    }
    assert t["ensemble"].members == 5 and t["reparam-ng-ensemble"].train_samples == 4
    assert t["mc-dropout"].mc_dropout and t["mc-dropout"].dropout == 0.1
    assert "Traits: gaussian weights, moments propagation, natural-gradient optimizer" in dm.describe("bp-ng")
    m = dm.create("reparam-ng-ensemble", dm.mlp_builder(2, 4, 1), train_samples=2, ng_lr=0.05)
    assert m.traits.train_samples == 2 and m.traits.optimizer.lr == 0.05 and m.name == "reparam-ng-ensemble"
    assert dm.create("ensemble", dm.mlp_builder(2, 4, 1), ensemble_size=3).traits.members == 3
    with pytest.raises(TypeError, match="takes no option 'train_samples'"):
        dm.create("bp", dm.mlp_builder(2, 4, 1), train_samples=2)
    for bad in (
        dict(weights="point", propagation="flipout"),
        dict(train_samples=3),
        dict(weights="point", optimizer=dm.NaturalGradientOptimizer()),
        dict(propagation="local", objective="elbo"),
        dict(propagation="gibbs"),
    ):
        with pytest.raises(ValueError):
            dm.Traits(**bad)


def test_a_custom_composition_trains_and_predicts():
    """Traits compose beyond the registry: a natural-gradient flipout ensemble of 2 members."""
    xtr, ytr, xte, yte, const = _wine()
    traits = dm.Traits(propagation="flipout", members=2, optimizer=dm.NaturalGradientOptimizer(lr=0.1))
    torch.manual_seed(0)
    m = dm.Method(traits, dm.mlp_builder(13, 16, 3), task="classification", samples=8)
    m.fit((xtr, ytr), df.train.TrainConfig(epochs=15, batch_size=32, lr=1e-2, progress=False))
    assert isinstance(
        m.configure_optimizer(list(m.parameters()), 10, df.train.TrainConfig()), df.optim.NaturalGradient
    )
    res = m.evaluate(xte, yte)
    assert res["accuracy"] > 0.85 and res["nll"] < 0.5 * const, res


def test_ensemble_trains_every_member_exactly_as_alone():
    """Each member of an ensemble gets exactly its own gradient: trained together, every member
    equals the same member trained alone from the same initialisation on the same batches (a
    loop that trained only the first member, or mixed the members' gradients, fails this)."""
    xtr, ytr, *_ = _diabetes()
    xtr, ytr = xtr[:64], ytr[:64]
    build = dm.mlp_builder(10, 8, 1)
    cfg = df.train.TrainConfig(epochs=3, batch_size=16, lr=1e-2, progress=False)
    torch.manual_seed(0)
    ens = dm.create("ensemble", build, ensemble_size=3, noise_var=0.5)
    init = [copy.deepcopy(net.state_dict()) for net in ens.members]
    ens.fit((xtr, ytr), cfg)
    for k in range(3):
        moved = max(
            float((a - b).abs().max()) for a, b in zip(init[k].values(), ens.members[k].state_dict().values())
        )
        assert moved > 1e-3, f"member {k} did not train"
        alone = dm.create("vanilla", build, noise_var=0.5)
        alone.net.load_state_dict(init[k])
        alone.fit((xtr, ytr), cfg)
        for (name, a), b in zip(alone.net.state_dict().items(), ens.members[k].state_dict().values()):
            torch.testing.assert_close(b, a, msg=f"member {k}: {name}")
        torch.testing.assert_close(ens.likelihoods[k].noise_var, alone.noise_var)


def test_create_accepts_a_model():
    """A model is used by reference as the first member; what each kind of method needs of it."""
    xtr, ytr, xte, yte, _ = _diabetes()
    torch.manual_seed(0)
    bayes = dm.mlp_builder(10, 16, 1)(True)
    m = dm.create("bp", bayes, noise_var=0.5)
    assert m.net is bayes
    m.fit((xtr, ytr), df.train.TrainConfig(epochs=3, batch_size=64, progress=False))
    # a plain torch model works for point methods; ensemble members are re-initialised deep copies
    plain = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    ens = dm.create("ensemble", plain, ensemble_size=3, noise_var=0.5)
    assert ens.members[0] is plain and ens.members[1] is not plain
    w = [net[0].weight.detach() for net in ens.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    ens.fit((xtr, ytr), df.train.TrainConfig(epochs=3, batch_size=64, progress=False))
    assert ens.predict(xte).mean.shape == (len(yte), 1)
    # MC dropout with torch's own Dropout: passes differ, eval mode of the model is kept
    drop = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )
    mc = dm.create("mc-dropout", drop, noise_var=0.5, samples=2)
    mc.eval()
    assert not torch.equal(mc.predictive(xte, samples=1).mean, mc.predictive(xte, samples=1).mean)
    assert not drop[2].training
    # what would need a conversion is a clear error, never a silent one
    with pytest.raises(ValueError, match="from_torch"):
        dm.create("bp", plain)
    with pytest.raises(ValueError, match="point weights"):
        dm.create("vanilla", bayes)
    with pytest.raises(ValueError, match="dropout modules"):
        dm.create("mc-dropout", plain)
    with pytest.raises(ValueError, match="builders"):
        dm.create("vanilla", plain, dropout=0.2)
    with pytest.raises(TypeError):
        dm.create("bp", "not a model")


def test_is_fitted_travels_with_the_state_dict():
    xtr, ytr, *_ = _diabetes()
    build = dm.mlp_builder(10, 4, 1)
    m = dm.create("bp", build)
    assert not m.is_fitted
    m.fit((xtr[:32], ytr[:32]), df.train.TrainConfig(epochs=1, batch_size=32, progress=False))
    assert m.is_fitted
    fresh = dm.create("bp", build)
    fresh.load_state_dict(m.state_dict())
    assert fresh.is_fitted


@pytest.mark.parametrize("name", ["bp", "ensemble", "reparam"])
def test_predict_is_predictive_without_grad_and_noise_is_explicit(name):
    _, _, xte, _, _ = _diabetes()
    m, _ = _trained_regression(name)
    x = xte[:10].clone().requires_grad_(True)
    torch.manual_seed(3)
    p = m.predictive(x)
    (p.mean.sum() + p.var.sum()).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    torch.manual_seed(3)
    q = m.predict(xte[:10])
    torch.testing.assert_close(q.mean, p.mean.detach())
    torch.testing.assert_close(q.var, p.var.detach())
    if name == "bp":  # noise: Method.predict includes it, train.predict of the network does not
        f = df.train.predict(m.net, xte)
        torch.testing.assert_close(m.predict(xte, noise=False).var, f.var)
        torch.testing.assert_close(m.predict(xte).var, f.var + m.noise_var)
        torch.testing.assert_close(
            m.predict(xte).var, df.train.predict(m.net, xte, noise_var=m.noise_var).var
        )
    with pytest.raises(ValueError, match="noise=False"):
        dm.create("bp", dm.mlp_builder(10, 4, 3), task="classification").predict(xte, noise=False)


# ----------------------------------------------------------------------------- weight sampling


def test_sample_weights_is_the_one_draw_from_q():
    """sample_weights draws W ~ N(mu, softplus(rho)^2) (Monte Carlo moments within standard
    errors); point_state_dict(sample=True) and the reparam propagation use it."""
    from dualflow.models import point_state_dict
    from dualflow.nn.sampling import PROPAGATION_RULES, sample_weights

    layer = df.nn.Linear(5, 4, init_var_ratio=0.5).double()
    k = 4000
    g = torch.Generator().manual_seed(0)
    w = torch.stack([sample_weights(layer, g)[0].detach() for _ in range(k)])
    mu, var = layer.weight_mean.detach(), layer.weight_var.detach()
    assert float(((w.mean(0) - mu) / (var / k).sqrt()).abs().max()) < 5.0
    assert float(((w.var(0) - var) / (var * math.sqrt(2.0 / (k - 1)))).abs().max()) < 5.0
    net = df.nn.Sequential(layer, df.nn.ReLU(), df.nn.Linear(4, 2).double())
    sd = point_state_dict(net, sample=True, generator=torch.Generator().manual_seed(1))
    g1 = torch.Generator().manual_seed(1)
    w0, b0 = sample_weights(net[0], g1)
    assert torch.equal(sd["0.weight_mu"], w0) and torch.equal(sd["0.bias_mu"], b0)
    assert not any(key.endswith("_rho") for key in sd)
    assert tuple(PROPAGATION_RULES) == dm.PROPAGATIONS
    with pytest.raises(ValueError, match="unknown propagation"):
        layer.propagation = "gibbs"
