"""dualflow.save / dualflow.load: architecture as plain data plus state, identical predictions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dualflow as df
from dualflow import methods, models


class Net(nn.Module):
    """A model with its own forward: residual add, functional calls, a free parameter, slicing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU(), nn.Dropout(0.1))
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(4 * 2, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.max_pool2d(h + self.scale * self.block(h), 2)
        h = torch.cat([h.mean(dim=(2, 3)), h[:, :, 0, 0]], 1)
        return self.head(h)


def _same(a, b):
    if isinstance(a, df.Gaussian):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    else:
        assert torch.equal(a, b)


def test_converted_graph_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Net().double().eval()
    conv = df.convert(model, init_var_ratio=0.05).eval()
    path = tmp_path / "conv.pt"
    df.save(conv, path)
    back = df.load(path)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    _same(conv(x), back(x))
    assert type(back) is type(conv) and not back.training
    assert back.constants.scale.dtype == torch.float64
    assert back.get_submodule("block.1").op.name == "gelu"
    # the file is plain data: torch's safe loader reads it
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "dualflow" and isinstance(payload["spec"], str)


def test_registry_model_round_trip(tmp_path):
    torch.manual_seed(0)
    m = models.create("resnet8", num_classes=4, normalization="batch", bayes=True, image_size=16).eval()
    df.save(m, tmp_path / "r.pt")
    back = df.load(tmp_path / "r.pt")
    x = torch.randn(3, 3, 16, 16)
    _same(m(x), back(x))
    assert back.config == m.config


def test_module_tree_and_methods_round_trip(tmp_path):
    torch.manual_seed(0)
    seq = df.nn.from_torch(nn.Sequential(nn.Linear(3, 6), nn.LeakyReLU(0.2), nn.Linear(6, 2)))
    df.save(seq, tmp_path / "s.pt")
    x = torch.randn(4, 3)
    _same(seq(x), df.load(tmp_path / "s.pt")(x))

    xr, yr = torch.randn(32, 3), torch.randn(32)
    for name in ("bp", "ensemble"):
        m = methods.create(name, methods.mlp_builder(3, 8, 1), "regression", ensemble_size=2)
        m.fit((xr, yr), df.train.TrainConfig(epochs=2, batch_size=16, progress=False))
        df.save(m, tmp_path / f"{name}.pt")
        back = df.load(tmp_path / f"{name}.pt")
        _same(m.predict(x), back.predict(x))
        assert back.noise_var == pytest.approx(float(m.noise_var))

    # a composition of traits outside the registry, fixed noise: rebuilt from the saved traits
    traits = methods.Traits(
        propagation="flipout", members=3, train_samples=2, optimizer=methods.NaturalGradientOptimizer(lr=0.05)
    )
    m = methods.Method(traits, methods.mlp_builder(3, 8, 1), "regression", samples=7, learn_noise=False)
    m.fit((xr, yr), df.train.TrainConfig(epochs=1, batch_size=16, progress=False))
    df.save(m, tmp_path / "custom.pt")
    back = df.load(tmp_path / "custom.pt")
    assert back.traits == traits and back.name == "custom" and back.samples == 7 and back.is_fitted
    assert not isinstance(back.likelihood.raw_noise, nn.Parameter)
    torch.manual_seed(2)
    want = m.predict(x)
    torch.manual_seed(2)
    _same(want, back.predict(x))

    torch.manual_seed(1)
    user = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    m = methods.create("bp", lambda bayes, dropout=0.0: df.convert(user, bayes=bayes), "classification")
    df.save(m, tmp_path / "c.pt")
    xi = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(m.predict(xi), df.load(tmp_path / "c.pt").predict(xi), rtol=0, atol=0)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved model"):
        df.load(tmp_path / "missing.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"not a file written by dualflow\.save"):
        df.load(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"not a file written by dualflow\.save"):
        df.load(tmp_path / "junk.pt")

    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="Custom"):
        df.save(Custom(), tmp_path / "custom.pt")
    assert not (tmp_path / "custom.pt").exists()

    old = {"kind": "method", "name": "bp", "task": "regression", "options": {}, "net": {}}
    torch.save(
        {"format": "dualflow", "version": 1, "spec": json.dumps(old), "state_dict": {}}, tmp_path / "v1.pt"
    )
    with pytest.raises(ValueError, match="older dualflow"):
        df.load(tmp_path / "v1.pt")

    class MyOptimizer(methods.ConfigOptimizer):
        pass

    m = methods.Method(methods.Traits(optimizer=MyOptimizer()), methods.mlp_builder(2, 4, 1))
    with pytest.raises(TypeError, match="MyOptimizer"):
        df.save(m, tmp_path / "opt.pt")
    assert not (tmp_path / "opt.pt").exists()
