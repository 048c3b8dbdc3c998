"""Architectures of ``dualflow.models``: registry, published parameter counts, one training
step per configuration, moment propagation against Monte Carlo, zero-variance limit."""

import copy
import math
import subprocess
import sys
from statistics import NormalDist

import pytest
import torch

import dualflow as df
from dualflow import models
from dualflow.nn.base import BayesLayer

# Tiny instances of each architecture family (same code paths as the full-size ones).
TINY = {
    "mlp": dict(in_channels=1, image_size=8, width=16),
    "vgg16": dict(image_size=8, blocks=(2, 2), channels=(4, 8)),
    "resnet20": dict(image_size=8, depth=8, widths=(4, 8, 8)),
    "wrn_28_10": dict(image_size=4, depth=10, widen_factor=1),
    "densenet_bc_100_12": dict(image_size=8, depth=10, growth_rate=4),
    "efficientnet_b0": dict(image_size=8, width_mult=0.1, depth_mult=0.25),
    "mixer_s": dict(image_size=8, hidden_dim=8, depth=2, tokens_mlp_dim=4, channels_mlp_dim=16),
}
RESIDUAL = {"resnet20", "wrn_28_10", "efficientnet_b0", "mixer_s"}
REQUIRED = [
    "mlp",
    "vgg16",
    "resnet20",
    "resnet56",
    "densenet_bc_100_12",
    "wrn_28_10",
    "efficientnet_b0",
    "mixer_s",
]


def tiny(name, normalization="none", bayes=True, **extra):
    return models.create(name, normalization=normalization, bayes=bayes, **{**TINY[name], **extra})


def images(model, batch=3):
    return torch.randn(batch, model.in_channels, model.image_size, model.image_size)


# ----------------------------------------------------------------------------- registry


def test_registry_has_required_names_and_no_side_effects():
    names = models.list_models()
    assert set(REQUIRED) <= set(names)
    assert names == sorted(names)
    assert isinstance(models.MODELS, dict)
    # importing and listing the registry builds no module and touches no global torch state
    code = (
        "import torch\n"
        "built = []\n"
        "init = torch.nn.Module.__init__\n"
        "def counting(self, *a, **k):\n"
        "    built.append(type(self).__name__)\n"
        "    init(self, *a, **k)\n"
        "torch.nn.Module.__init__ = counting\n"
        "rng, dtype = torch.random.get_rng_state(), torch.get_default_dtype()\n"
        "threads = torch.get_num_threads()\n"
        "import dualflow.models as models\n"
        "models.list_models(); models.builder('resnet20'); models.MODELS['mlp']\n"
        "print(built, torch.equal(rng, torch.random.get_rng_state()), torch.get_default_dtype() == dtype, "
        "torch.get_num_threads() == threads)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True", "True", "True"], out.stdout
    # creating models with overrides leaves the registry's entries as they were
    before = {k: (spec.build, copy.deepcopy(spec.defaults), spec.norms) for k, spec in models.MODELS.items()}
    tiny("resnet20", depth=8)
    models.create("resnet", depth=8, image_size=8, widths=(4, 8, 8), normalization="batch")
    after = {k: (spec.build, spec.defaults, spec.norms) for k, spec in models.MODELS.items()}
    assert after == before


def test_bad_names_and_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*did you mean"):
        models.create("resnet21")
    with pytest.raises(ValueError, match="unknown option"):
        models.create("resnet20", widht=2)
    with pytest.raises(ValueError, match="normalization"):
        models.create("resnet20", normalization="group")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create("resnet", depth=21)
    with pytest.raises(ValueError, match="divisible"):
        models.create("vgg16", image_size=28)
    with pytest.raises(ValueError, match="unknown model"):
        models.builder("nope")


def test_wrong_image_shape_and_dtype_raise():
    m = tiny("resnet20")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 8, 8\)"):
        m(torch.randn(2, 3, 9, 9))
    with pytest.raises(ValueError, match="expected images"):
        m(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((2, 3, 8, 8), float("nan")))


def test_builder_convention_and_config_round_trip():
    build = models.builder("resnet20", image_size=8, depth=8, widths=(4, 8, 8))
    bayes_net, point_net = build(True), build(bayes=False, dropout=0.1)
    assert bayes_net.bayes and not point_net.bayes
    assert any(isinstance(m, df.nn.Dropout) for m in point_net.modules())
    assert models.count_parameters(bayes_net) == models.count_parameters(point_net)
    again = models.create(**bayes_net.config)
    assert again.state_dict().keys() == bayes_net.state_dict().keys()
    with pytest.raises(ValueError, match="build function"):
        models.builder("resnet20", bayes=True)


@pytest.mark.parametrize("name", list(TINY))
def test_dropout_positions(name):
    m = tiny(name, dropout=0.2)
    assert any(isinstance(mod, df.nn.Dropout) for mod in m.modules())
    assert not any(isinstance(mod, df.nn.Dropout) for mod in tiny(name).modules())


# ----------------------------------------------------------------------------- parameter counts

# (name, create kwargs, published count in millions with its precision, exact count of the
# reference implementation). Counts of the point networks with BatchNorm: weights, biases
# and BN affine parameters (no running statistics), as published.
PUBLISHED = [
    ("resnet20", {}, 0.27, 2, 269_722),  # He et al. 2016, Table 6
    ("resnet56", {}, 0.85, 2, 853_018),
    ("resnet110", {}, 1.7, 1, 1_727_962),
    ("densenet_bc_100_12", {}, 0.8, 1, 769_162),  # Huang et al. 2017, Table 2 (C10)
    ("wrn_28_10", {}, 36.5, 1, 36_479_194),  # Zagoruyko & Komodakis 2016, Table 4
    ("efficientnet_b0", {"num_classes": 1000}, 5.3, 1, 5_288_548),  # Tan & Le 2019; Keras trainable
    ("mixer_s", {"num_classes": 1000, "image_size": 224, "patch_size": 16}, 18.0, 0, 18_528_264),  # S/16
    ("vgg16", {}, 14.7, 1, 14_724_042),  # CIFAR VGG16-BN, 13 conv + 1 linear
]


@pytest.mark.parametrize(
    ("name", "kw", "published", "digits", "exact"), PUBLISHED, ids=[p[0] for p in PUBLISHED]
)
def test_parameter_counts_match_published(name, kw, published, digits, exact):
    m = models.create(name, normalization="batch", bayes=False, **kw)
    n = models.count_parameters(m)
    # agrees with the published figure at its precision or within 3 % (Mixer-S/16: "18M")
    assert abs(n / 1e6 - published) <= max(0.5 * 10**-digits, 0.03 * published), n
    assert n == exact
    # the Bayesian network has the same means plus one rho per weight/bias
    if name in ("resnet20", "densenet_bc_100_12"):
        b = models.create(name, normalization="batch", bayes=True, **kw)
        assert models.count_parameters(b) == n
        bn_affine = sum(
            p.numel() for mod in b.modules() if isinstance(mod, df.nn.BatchNorm2d) for p in mod.parameters()
        )
        assert models.count_parameters(b, include_variances=True) == 2 * n - bn_affine


# ----------------------------------------------------------------------------- training step


@pytest.mark.parametrize("config", [("none", True), ("batch", False)], ids=["nf-bayes", "batch-point"])
@pytest.mark.parametrize("name", list(TINY))
def test_one_training_step(name, config):
    normalization, bayes = config
    torch.manual_seed(0)
    m = tiny(name, normalization, bayes)
    m.train()
    x, y = images(m, 4), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    out = m(x)
    assert isinstance(out, df.Gaussian) == bayes
    mean = out.mean if bayes else out
    assert mean.shape == (4, 10)
    loss = df.losses.categorical_nll(out, y) + df.nn.kl(m) / 1000
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters()))
    out2 = m(x)
    assert torch.isfinite(out2.mean if bayes else out2).all()


@pytest.mark.parametrize("name", list(TINY))
def test_accepts_tensors_and_gaussians(name):
    point = tiny(name, "batch", bayes=False).eval()
    x = images(point)
    assert isinstance(point(x), torch.Tensor)
    g = point(df.Gaussian(x, torch.full_like(x, 0.01)))
    assert isinstance(g, df.Gaussian) and (g.var > 0).all()
    bayes = tiny(name).eval()
    assert isinstance(bayes(x), df.Gaussian)


def test_residual_gains_default_to_inverse_sqrt_depth():
    m = models.create("resnet56")
    scales = [mod for mod in m.modules() if isinstance(mod, models.Scale)]
    assert len(scales) == 27 and all(float(s.scale.detach()) == pytest.approx(27**-0.5) for s in scales)
    assert all(
        float(s.scale.detach()) == 0.0
        for s in models.create("resnet20", skip_init=0.0).modules()
        if isinstance(s, models.Scale)
    )
    mixer = tiny("mixer_s")
    assert all(
        float(s.scale.detach()) == pytest.approx(0.5) for s in mixer.modules() if isinstance(s, models.Scale)
    )
    assert not any(
        isinstance(mod, models.Scale) for mod in models.create("resnet56", normalization="batch").modules()
    )
    # the NF residual stream stays bounded at initialisation, whatever the depth
    x = torch.randn(4, 3, 16, 16)
    for depth in (20, 56, 110):
        net = models.create("resnet", depth=depth, image_size=16, bayes=False).eval()
        with torch.no_grad():
            h = net.body[:-2](x)  # features before the classifier
        assert 0.05 < float(h.pow(2).mean().sqrt()) < 3.0, depth


# ----------------------------------------------------------------------------- zero variances


@pytest.mark.parametrize("normalization", ["none", "batch"])
@pytest.mark.parametrize("name", list(TINY))
def test_zero_variance_equals_point_network(name, normalization):
    torch.manual_seed(0)
    extra = {"skip_init": 0.7} if name in RESIDUAL else {}
    # float64: the variance floor of the moment rules (1e-24 instead of 1e-12) is negligible
    bayes = tiny(name, normalization, True, **extra).double()
    point = tiny(name, normalization, False, **extra).double()
    models.copy_means_(bayes, point)
    models.zero_variances_(bayes)
    x = images(bayes, 4).double()
    for train in (False, True):
        bayes.train(train)
        point.train(train)
        with torch.no_grad():
            out, ref = bayes(x), point(x)
        assert float(out.var.max()) < 1e-12
        torch.testing.assert_close(out.mean, ref, rtol=1e-9, atol=1e-10)


MC_SAMPLES = 2000


def _pair(name, normalization, seed=1):
    torch.manual_seed(seed)
    extra = {"skip_init": 1.0} if name in RESIDUAL else {}
    kw = dict(init_var_ratio=0.1, **extra)
    bayes = tiny(name, normalization, True, **kw).eval()
    point = tiny(name, normalization, False, **kw).eval()
    if normalization != "none":  # non-trivial eval-mode BatchNorm statistics
        with torch.no_grad():
            for mod in bayes.modules():
                if isinstance(mod, df.nn.BatchNorm2d | df.nn.BatchNorm1d):
                    mod.running_mean.normal_(0, 0.2)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.normal_(0, 0.2)
    return bayes, point


# Accuracy of moment propagation against Monte Carlo on these tiny random networks
# (init_var_ratio 0.1, SkipInit gains 1): a claim per architecture, (mean error in output sds,
# max |log var ratio|, median |log var ratio|) over the outputs. The claims sit on a fixed
# ladder (0.25, 0.5, 1, 2 sd; variance factors 1.5, 2, 3, 5, 10, 30 as |log| ratios),
# chosen per architecture by the approximations it contains (docs/maths.md, "Approximations"):
# exact first layer; element-wise independence of the activations after it (every network);
# plus Clark's tree on rectified max-pooling windows (vgg16, densenet), the correlation of the two
# inputs of a residual sum (resnet, wrn, mixer), squeeze-excite gates multiplied as independent
# (efficientnet) and LayerNorm statistics taken from the means (normalised mixer). Each claim
# covers the worst of seeds 1-5 with a margin of >= 1.2x (the comment per line: worst mean error /
# max / median over the 5 seeds, as this test prints them; efficientnet/none seed 3 only together
# with its noise allowance, see there); the test checks seeds 1-3, so it is not tuned to one draw.
# The Monte Carlo noise of the measurement comes on top, as an allowance from its standard error
# (:func:`_noise_allowance`), not as a fudge factor. (The bounds this replaces were 1.5x one
# measurement at seed 1: at seeds 2-5 nine of the 14 configurations exceeded them, e.g.
# vgg16/batch max 1.02 vs 0.6, efficientnet/none 4.06 vs 1.7.)
_L = math.log
MC_CLAIMS = {
    # name: {normalization: (mean error bound, max |log ratio| bound, median |log ratio| bound)}
    "mlp": {  # worst 0.08/0.62/0.09 (none), 0.06/0.36/0.08 (batch)
        "none": (0.25, _L(3), _L(1.5)),
        "batch": (0.25, _L(2), _L(1.5)),
    },
    "vgg16": {  # 0.35/0.60/0.29, 0.37/1.02/0.21 -- Clark max pooling of rectified windows
        "none": (0.5, _L(3), _L(1.5)),
        "batch": (0.5, _L(5), _L(1.5)),
    },
    "resnet20": {  # 0.11/0.72/0.26, 0.11/0.68/0.22 -- residual correlation: variance too small
        "none": (0.25, _L(3), _L(1.5)),
        "batch": (0.25, _L(3), _L(1.5)),
    },
    "wrn_28_10": {  # 0.08/0.38/0.12, 0.09/0.26/0.14
        "none": (0.25, _L(2), _L(1.5)),
        "batch": (0.25, _L(2), _L(1.5)),
    },
    "densenet_bc_100_12": {  # 0.29/1.62/0.73, 0.36/2.01/0.84 -- concatenated correlated maps, pooling
        "none": (0.5, _L(10), _L(3)),
        "batch": (0.5, _L(30), _L(3)),
    },
    "efficientnet_b0": {  # 0.19/4.06/3.34 (seed 3), 0.07/0.07/0.04
        # NF: two squeeze-excite gates multiplied as independent of the features they gate. The
        # outputs are heavy-tailed (kurtosis up to ~700 at seed 3), so the Monte Carlo variance is
        # itself noisy there and the kurtosis-aware allowance is large (2.7 at seed 3).
        "none": (0.25, _L(10), _L(5)),
        "batch": (0.25, _L(1.5), _L(1.5)),
    },
    "mixer_s": {  # 0.23/0.73/0.28; LayerNorm (hidden 8): 1.48/2.54/1.69, variance overestimated
        "none": (0.5, _L(3), _L(1.5)),
        "batch": (2.0, _L(30), _L(10)),
    },
}
MC_SEEDS = (1, 2, 3)


@pytest.mark.parametrize("seed", MC_SEEDS)
@pytest.mark.parametrize("normalization", ["none", "batch"])
@pytest.mark.parametrize("name", list(TINY))
def test_moments_match_monte_carlo(name, normalization, seed):
    bayes, point = _pair(name, normalization, seed)
    x = images(bayes)
    with torch.no_grad():
        out = bayes(x)
    mc = _mc_moments(bayes, point, x, seed=seed)
    z, rmax, rmed = _discrepancy(out, *mc[:2])
    noise_z, noise_r = _noise_allowance(out.mean.numel(), MC_SAMPLES, float(mc[2].max()))
    print(
        f"{name} {normalization} seed {seed}: mean err {z:.3f} sd, |log var ratio| max {rmax:.3f} "
        f"median {rmed:.3f}; MC noise allowance {noise_z:.3f} / {noise_r:.3f}"
    )
    bz, br, bmed = MC_CLAIMS[name][normalization]
    assert z < bz + noise_z and rmax < br + noise_r and rmed < bmed + noise_r, (z, rmax, rmed)


@pytest.mark.parametrize("name", list(TINY))
def test_first_layer_matches_monte_carlo_exactly(name):
    bayes, point = _pair(name, "none")
    k = next(i for i, layer in enumerate(bayes.body) if isinstance(layer, BayesLayer)) + 1
    first_b, first_p = bayes.body[:k], point.body[:k]
    x = images(bayes)
    with torch.no_grad():
        out = first_b(x)
    m, v, kurt = _mc_moments(first_b, first_p, x)
    z, rmax, _ = _discrepancy(out, m, v)
    # a Gaussian-weight linear map of a fixed input is exactly Gaussian: only MC noise is left
    noise_z, noise_r = _noise_allowance(out.mean.numel(), MC_SAMPLES, float(kurt.max()))
    assert z < noise_z
    assert rmax < noise_r


def test_noise_allowance_covers_pure_monte_carlo_noise():
    """The allowance is a (1 - alpha) bound on the maximum of the noise alone: exact Gaussians
    measured by Monte Carlo stay under it (here with the moments known in closed form)."""
    g = torch.Generator().manual_seed(0)
    n, s = 500, MC_SAMPLES
    mean, sd = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    draws = mean + sd * torch.randn(s, n, generator=g)
    est_m, est_v = draws.mean(0), draws.var(0)
    z = float(((est_m - mean).abs() / sd).max())
    r = float((est_v / sd**2).log().abs().max())
    noise_z, noise_r = _noise_allowance(n, s, 3.0)
    assert z < noise_z and r < noise_r
    # ... and is not loose: the largest of n noise terms reaches a good part of it
    assert z > 0.5 * noise_z and r > 0.5 * noise_r


# ----------------------------------------------------------------------------- Monte Carlo


def _noise_allowance(n, samples, kurtosis, alpha=1e-3):
    """Bounds on the Monte Carlo noise of :func:`_discrepancy`'s metrics for exact moments.

    Over ``n`` outputs (Bonferroni, two-sided, family-wise level ``alpha``): the mean error in
    sds is ``|N(0, 1/S)|``; ``log`` of a sample variance has standard error
    ``sqrt((kurtosis - 1) / S)`` (``sqrt(2/S)`` for a Gaussian; heavier tails, larger noise).
    Returns ``(mean bound, log-variance-ratio bound)``.
    """
    q = NormalDist().inv_cdf(1 - alpha / (2 * n))
    return q / math.sqrt(samples), q * math.sqrt(max(kurtosis - 1.0, 2.0) / samples)


def _mc_moments(bayes, point, x, samples=MC_SAMPLES, chunk=500, seed=0):
    """Mean, variance and kurtosis of the point network's output over weights drawn from q."""
    g = torch.Generator().manual_seed(seed)
    var_keys = {}
    for prefix, mod in bayes.named_modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            pre = f"{prefix}." if prefix else ""
            var_keys[pre + "weight_mu"] = (mod.weight_mu.detach(), mod.weight_var.detach().sqrt())
            if mod.bias_mu is not None:
                var_keys[pre + "bias_mu"] = (mod.bias_mu.detach(), mod.bias_var.detach().sqrt())
    fixed = {k: v for k, v in models.point_state_dict(bayes).items() if k not in var_keys}

    def run(batched):
        return torch.func.functional_call(point, {**fixed, **batched}, (x,))

    ys = []
    for start in range(0, samples, chunk):
        s = min(chunk, samples - start)
        draw = {k: mu + sd * torch.randn((s, *mu.shape), generator=g) for k, (mu, sd) in var_keys.items()}
        with torch.no_grad():
            ys.append(torch.vmap(run)(draw).double())
    y = torch.cat(ys)
    m = y.mean(0)
    c = y - m
    var = (c * c).sum(0) / (samples - 1)
    kurt = (c**4).mean(0) / (c * c).mean(0).square()
    return m, var, kurt


def _discrepancy(bp, mc_mean, mc_var):
    """(max |m_bp - m_mc| / sd_mc, max |log(v_bp / v_mc)|, median |log(v_bp / v_mc)|)."""
    z = (bp.mean.double() - mc_mean).abs() / mc_var.sqrt()
    r = (bp.var.double() / mc_var).log().abs()
    return float(z.max()), float(r.max()), float(r.median())
