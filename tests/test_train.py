"""The training loop: objective, exact resume after interruption, bad input."""

from __future__ import annotations

import pytest
import torch

import dualflow as df
from dualflow import nn as dnn
from dualflow.train import TrainConfig, fit


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=g)).squeeze(1)
    return x, y.unsqueeze(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return dnn.Sequential(dnn.Linear(3, 16), dnn.ReLU(), dnn.Linear(16, 1, gain=1.0))


def _flat(model, lik):
    return torch.cat([p.detach().flatten() for p in list(model.parameters()) + list(lik.parameters())])


def test_fit_reduces_loss_and_records_history():
    x, y = _data()
    model, lik = _model(), df.losses.GaussianLikelihood(1.0)
    hist = fit(
        model,
        lik,
        (x, y),
        TrainConfig(epochs=30, batch_size=16, lr=1e-2, progress=False),
        eval_fn=lambda m: {"val": 1.0},
    )
    assert len(hist) == 30
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["val"] == [1.0] * 30
    assert all(k in hist.epochs[0] for k in ("epoch", "loss", "nll", "kl", "lr", "seconds"))
    # objective = mean J + KL / N
    rec = hist.epochs[-1]
    assert abs(rec["loss"] - (rec["nll"] + rec["kl"] / 96)) < 1e-4


@pytest.mark.parametrize("stop_after", [6, 13])  # at an epoch boundary / mid-epoch
def test_resume_after_interruption_is_exact(tmp_path, stop_after):
    x, y = _data()
    cfg = dict(epochs=4, batch_size=16, lr=5e-3, progress=False, seed=3)
    m1, l1 = _model(), df.losses.GaussianLikelihood(1.0)
    h1 = fit(m1, l1, (x, y), TrainConfig(**cfg))

    ck = str(tmp_path / "ck.pt")
    m2, l2 = _model(), df.losses.GaussianLikelihood(1.0)
    with pytest.raises(KeyboardInterrupt):
        fit(m2, l2, (x, y), TrainConfig(checkpoint=ck, **cfg), step_fn=_interrupt_after(stop_after, l2))
    # a new process builds fresh objects (another init) and points at the same checkpoint
    m3, l3 = _model(seed=99), df.losses.GaussianLikelihood(1.0)
    h3 = fit(m3, l3, (x, y), TrainConfig(checkpoint=ck, **cfg))
    torch.testing.assert_close(_flat(m3, l3), _flat(m1, l1), rtol=0, atol=0)
    assert len(h3) == 4
    assert h3["nll"][-1] == pytest.approx(h1["nll"][-1], rel=1e-6)


def _interrupt_after(k, lik):
    calls = {"n": 0}

    def step(model, xb, yb):
        calls["n"] += 1
        if calls["n"] > k:
            raise KeyboardInterrupt
        return lik(model(xb), yb)

    return step


def test_resume_mid_epoch_with_sampling_randomness_is_exact(tmp_path):
    """Randomness inside the step (here: noise added to inputs) is restored too."""
    x, y = _data()
    cfg = dict(batch_size=10, lr=5e-3, progress=False, seed=1, epochs=3)

    def noisy_step(lik):
        def step(model, xb, yb):
            return lik(model(xb + 0.1 * torch.randn_like(xb)), yb)

        return step

    m1, l1 = _model(), df.losses.GaussianLikelihood(1.0)
    fit(m1, l1, (x, y), TrainConfig(**cfg), step_fn=noisy_step(l1))

    ck = str(tmp_path / "ck.pt")
    m2, l2 = _model(), df.losses.GaussianLikelihood(1.0)
    inner = noisy_step(l2)
    calls = {"n": 0}

    def interrupting(model, xb, yb):
        calls["n"] += 1
        if calls["n"] == 17:  # in the middle of epoch 2
            raise KeyboardInterrupt
        return inner(model, xb, yb)

    with pytest.raises(KeyboardInterrupt):
        fit(m2, l2, (x, y), TrainConfig(checkpoint=ck, **cfg), step_fn=interrupting)
    m3, l3 = _model(seed=5), df.losses.GaussianLikelihood(1.0)
    fit(m3, l3, (x, y), TrainConfig(checkpoint=ck, **cfg), step_fn=noisy_step(l3))
    torch.testing.assert_close(_flat(m3, l3), _flat(m1, l1), rtol=0, atol=0)


def test_dataset_input_and_predict():
    x, y = _data(40)
    ds = torch.utils.data.TensorDataset(x, y)
    model, lik = _model(), df.losses.GaussianLikelihood(1.0)
    hist = fit(model, lik, ds, TrainConfig(epochs=2, batch_size=8, progress=False))
    assert len(hist) == 2
    p = df.train.predict(model, x, batch_size=7)
    assert p.mean.shape == (40, 1) and bool((p.var > 0).all())


def test_bad_training_input():
    x, y = _data(20)
    model, lik = _model(), df.losses.GaussianLikelihood(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        fit(model, lik, (x, y[:10]), TrainConfig(epochs=1, progress=False))
    xn = x.clone()
    xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit(model, lik, (xn, y), TrainConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        fit(
            model,
            lambda out, t: torch.tensor(float("nan"), requires_grad=True),
            (x, y),
            TrainConfig(epochs=1, progress=False),
        )


class _NoisyDataset(torch.utils.data.Dataset):
    """A dataset with a random transform (draws from the global RNG on every fetch)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


def test_resume_mid_epoch_with_random_transform_in_dataset(tmp_path):
    x, y = _data()
    cfg = dict(batch_size=10, lr=5e-3, progress=False, seed=2, epochs=2)
    m1, l1 = _model(), df.losses.GaussianLikelihood(1.0)
    fit(m1, l1, _NoisyDataset(x, y), TrainConfig(**cfg))
    ck = str(tmp_path / "ck.pt")
    m2, l2 = _model(), df.losses.GaussianLikelihood(1.0)
    with pytest.raises(KeyboardInterrupt):
        fit(m2, l2, _NoisyDataset(x, y), TrainConfig(checkpoint=ck, **cfg), step_fn=_interrupt_after(14, l2))
    m3, l3 = _model(seed=7), df.losses.GaussianLikelihood(1.0)
    fit(m3, l3, _NoisyDataset(x, y), TrainConfig(checkpoint=ck, **cfg))
    torch.testing.assert_close(_flat(m3, l3), _flat(m1, l1), rtol=0, atol=0)
