"""Input validation: the dtype policy, ``Gaussian`` construction, ``predictive_mean_var``, and
explicit (not hidden) process-wide modes (compiled kernels, ``ImageClassifier``'s checks).

Dtype policy (documented in :func:`dualflow.nn.base.check_dtype`): inputs are never cast; an
integer/boolean input, or a floating input of another dtype than the parameters (outside
autocast), is a ``ValueError`` that names both dtypes.
"""

import os
import subprocess
import sys

import pytest
import torch

import dualflow as df
from dualflow import models

LAYERS = {
    "Linear": (lambda: df.nn.Linear(3, 2), (4, 3)),
    "Linear-point": (lambda: df.nn.Linear(3, 2, bayes=False), (4, 3)),
    "Conv2d": (lambda: df.nn.Conv2d(2, 3, 3), (2, 2, 5, 5)),
    "Conv1d": (lambda: df.nn.Conv1d(2, 3, 3), (2, 2, 5)),
    "Sequential": (lambda: df.nn.Sequential(df.nn.Linear(3, 4), df.nn.ReLU(), df.nn.Linear(4, 1)), (4, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8, torch.bool])
def test_wrong_input_dtype_is_a_value_error_naming_it(name, dtype):
    factory, shape = LAYERS[name]
    layer = factory()
    x = torch.ones(shape, dtype=dtype)
    what = str(dtype) if dtype.is_floating_point else "expected a floating-point input"
    with pytest.raises(ValueError, match=rf"{name.split('-')[0]}.*{what}"):
        layer(x)
    with pytest.raises(ValueError, match=str(dtype)):
        layer(df.Gaussian(x, torch.zeros_like(x)))


@pytest.mark.parametrize("name", list(LAYERS))
def test_matching_dtypes_and_autocast_pass(name):
    factory, shape = LAYERS[name]
    out = factory().double()(torch.randn(shape, dtype=torch.float64))
    assert (out.mean if isinstance(out, df.Gaussian) else out).dtype == torch.float64
    # under autocast a float32 layer legitimately receives bf16 activations
    with torch.autocast("cpu", dtype=torch.bfloat16):
        factory()(torch.randn(shape).bfloat16())


def test_gaussian_with_mixed_dtypes_is_refused():
    lin = df.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="dtypes differ"):
        lin(df.Gaussian(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)))


def test_image_classifier_checks_dtype_at_its_boundary():
    m = models.create("mlp", in_channels=1, image_size=8, width=8)
    assert not m.layer_checks  # inner checks are off: the boundary must catch it
    with pytest.raises(ValueError, match=r"mlp: input dtype torch.float64 differs.*torch.float32"):
        m(torch.zeros(2, 1, 8, 8, dtype=torch.float64))


# ----------------------------------------------------------------------------- Gaussian


def test_gaussian_rejects_mismatched_shapes_at_construction():
    with pytest.raises(ValueError, match=r"shapes differ: \(3,\) vs \(2,\)"):
        df.Gaussian(torch.zeros(3), torch.ones(2))
    g = df.Gaussian(torch.zeros(3), torch.ones(3))
    assert isinstance(g, tuple) and g._fields == ("mean", "var")
    m, v = g  # still a NamedTuple and a pytree
    assert m is g.mean and v is g.var
    leaves, spec = torch.utils._pytree.tree_flatten(g)
    assert torch.utils._pytree.tree_unflatten(leaves, spec) == g
    out = torch.func.vmap(lambda x: df.Gaussian(x, x * x))(torch.randn(4, 3))
    assert isinstance(out, df.Gaussian) and out.var.shape == (4, 3)


def test_gaussian_values_are_checked_at_the_api_boundary():
    neg = (torch.zeros(2, 3), -torch.ones(2, 3))
    with pytest.raises(ValueError, match="negative"):
        df.Gaussian.checked(*neg)
    with pytest.raises(ValueError, match="NaN"):
        df.Gaussian.checked(torch.full((2,), float("nan")), torch.ones(2))
    assert df.Gaussian.checked(torch.zeros(2), torch.ones(2)).var.sum() == 2
    net = df.nn.Sequential(df.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="negative"):
        net(df.Gaussian(*neg))
    with pytest.raises(ValueError, match="negative"):
        df.nn.Linear(3, 2)(df.Gaussian(*neg))
    with pytest.raises(ValueError, match="negative"):
        df.losses.gaussian_nll(df.Gaussian(torch.zeros(2, 1), -torch.ones(2, 1)), torch.zeros(2, 1), 1.0)


def test_predictive_mean_var_never_returns_negative_variances():
    """The cancellation ``E[x^2] - E[x]^2`` of float32 samples with a large mean gives negative
    'variances'; they used to pass straight through ``predictive_mean_var``."""
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + 0.01 * torch.randn(64, 200, 3, generator=g)
    m = x.mean(1)
    v = (x * x).mean(1) - m * m
    assert bool((v < 0).any())  # the cancellation is real
    with pytest.raises(ValueError, match="negative variances"):
        df.losses.predictive_mean_var(df.Gaussian(m, v))
    with pytest.raises(ValueError, match="noise_var"):
        df.losses.predictive_mean_var(df.Gaussian(m, v.clamp_min(0)), noise_var=-0.1)
    mean, var = df.losses.predictive_mean_var(df.Gaussian(m, v.clamp_min(0)), noise_var=0.0)
    assert bool((var >= 0).all()) and torch.equal(mean, m)
    centred = ((x - m.unsqueeze(1)) ** 2).mean(1)
    _, var = df.losses.predictive_mean_var(df.Gaussian(m, centred), noise_var=torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(var, centred + torch.tensor([0.1, 0.2, 0.3]))


# ----------------------------------------------------------------------------- explicit modes


def test_compiled_kernels_are_switched_only_explicitly():
    env = {**os.environ, "DUALFLOW_COMPILE": "1"}
    code = "import dualflow; print(dualflow.rules.compile_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # no environment variable switches kernels at import
    assert not df.rules.compile_enabled()
    with df.rules.compiled_kernels():
        assert df.rules.compile_enabled()
        with df.rules.compiled_kernels(False):
            assert not df.rules.compile_enabled()
        assert df.rules.compile_enabled()
    assert not df.rules.compile_enabled()
    with pytest.raises(RuntimeError), df.rules.compiled_kernels():
        raise RuntimeError("boom")
    assert not df.rules.compile_enabled()  # restored on an exception too
    assert df.rules.enable_compile(False) is False  # the explicit setter returns the previous mode


def test_image_classifier_layer_checks_are_explicit():
    body_checks = lambda m: [x.check_inputs for x in m.body.modules() if isinstance(x, df.nn.Module)]  # noqa: E731
    m = models.create("mlp", in_channels=1, image_size=8, width=8)
    assert not m.layer_checks and not any(body_checks(m))
    assert "layer_checks=False" in repr(m)
    m.layer_checks = True
    assert all(body_checks(m)) and "layer_checks=True" in repr(m)
    body = df.nn.Sequential(df.nn.Flatten(), df.nn.Linear(64, 10))
    kw = dict(arch="custom", num_classes=10, in_channels=1, image_size=8, normalization="none", bayes=True)
    wrapped = models.ImageClassifier(body, config={}, layer_checks=True, **kw)
    assert all(body_checks(wrapped))  # asked to keep them: the body is left as it was
    with pytest.raises(ValueError, match="NaN"):
        wrapped.body(torch.full((2, 1, 8, 8), float("nan")))


def test_sequential_leaves_dtype_to_a_foreign_first_module():
    """A ``torch.nn`` module first (here an embedding of integer tokens) decides its own input dtype."""
    net = df.nn.Sequential(torch.nn.Embedding(10, 4), df.nn.Linear(4, 2))
    out = net(torch.tensor([[1, 2], [3, 4]]))
    assert isinstance(out, df.Gaussian) and out.mean.shape == (2, 2, 2)
