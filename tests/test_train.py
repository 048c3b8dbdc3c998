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


# ----------------------------------------------------------------------------- no hidden global state


def _global_state():
    import random

    import numpy as np

    return (
        torch.get_rng_state().clone(),
        np.random.get_state()[1].copy(),
        random.getstate(),
        df.train.denormals_flushed(),
        torch.get_num_threads(),
    )


def _assert_same_state(a, b):
    assert torch.equal(a[0], b[0]), "torch's global RNG changed"
    assert (a[1] == b[1]).all(), "NumPy's global RNG changed"
    assert a[2] == b[2], "Python's random changed"
    assert a[3:] == b[3:], "flush-denormal mode or thread count changed"


@pytest.mark.parametrize("flushed", [False, True])
def test_fit_leaves_rng_flush_denormal_and_threads_as_they_were(flushed):
    import dualflow.methods as dm

    x, y = _data(40)
    model = _model()  # (seeds the global RNG: before the state is taken)
    m = dm.create("reparam", dm.mlp_builder(3, 8, 1))  # draws weight noise from the global RNG
    with df.train.flush_denormal(flushed):
        before = _global_state()
        fit(
            model,
            df.losses.GaussianLikelihood(1.0),
            (x, y),
            TrainConfig(epochs=2, batch_size=8, progress=False),
        )
        _assert_same_state(before, _global_state())
        m.fit((x, y), TrainConfig(epochs=2, batch_size=8, progress=False, threads=2))
        _assert_same_state(before, _global_state())
    assert df.train.denormals_flushed() is False


def test_context_managers_restore_on_exit_and_on_error():
    before = _global_state()
    with pytest.raises(RuntimeError), df.train.seeded(5), df.train.num_threads(3), df.train.flush_denormal():
        assert torch.get_num_threads() == 3 and df.train.denormals_flushed()
        a = torch.rand(3)
        raise RuntimeError
    _assert_same_state(before, _global_state())
    with df.train.seeded(5):
        assert torch.equal(torch.rand(3), a)  # seeded: reproducible inside
    m0 = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    p0 = torch.get_float32_matmul_precision()
    with df.train.tf32(not m0[0], cudnn_benchmark=not m0[2]):
        assert torch.backends.cuda.matmul.allow_tf32 is not m0[0]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == m0[:2]
    assert torch.backends.cudnn.benchmark == m0[2] and torch.get_float32_matmul_precision() == p0


def test_thread_policy_warns_when_threads_exceed_idle_cores(monkeypatch):
    """Policy: fit never changes the thread count on its own; with TrainConfig(threads=None) it
    warns when torch's threads exceed the idle cores; threads=n is applied and restored."""
    from dualflow.train import numerics

    x, y = _data(16)
    cfg = dict(epochs=1, batch_size=8, progress=False)
    monkeypatch.setattr(numerics, "_idle_cores", lambda: (2, 1.9))  # 2 cores, load 1.9
    torch.set_num_threads(2)
    with pytest.warns(RuntimeWarning, match="CPU threads"):
        fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**cfg))
    assert torch.get_num_threads() == 2  # warned, not changed
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(threads=1, **cfg))
        monkeypatch.setattr(numerics, "_idle_cores", lambda: (8, 0.5))  # an idle machine: no warning
        fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**cfg))
    assert torch.get_num_threads() == 2
    assert numerics.check_threads("cuda") is None


# ----------------------------------------------------------------------------- history, predict


def test_history_indexing():
    x, y = _data(32)
    hist = fit(
        _model(),
        df.losses.GaussianLikelihood(1.0),
        (x, y),
        TrainConfig(epochs=3, batch_size=16, progress=False),
    )
    assert hist[-1] == hist.epochs[-1] and hist[-1]["epoch"] == 3 and hist[0]["epoch"] == 1
    assert hist["epoch"] == [1, 2, 3] and len(hist["loss"]) == 3
    assert [e["epoch"] for e in hist] == [1, 2, 3]
    with pytest.raises(KeyError, match="no epoch record has 'val_loss'"):
        hist["val_loss"]
    with pytest.raises(IndexError):
        hist[3]
    assert hist.steps == 6 and not hist.stopped and hist.resumed_from is None


def test_predict_says_whether_the_noise_is_included():
    x, _ = _data(20)
    model = _model()
    f = df.train.predict(model, x, batch_size=7)  # the network output: no observation noise
    p = df.train.predict(model, x, noise_var=torch.tensor(0.25))
    torch.testing.assert_close(p.mean, f.mean)
    torch.testing.assert_close(p.var, f.var + 0.25)


# ----------------------------------------------------------------------------- checkpoints, stops


def test_bad_checkpoint_is_one_clear_error_naming_the_file(tmp_path):
    x, y = _data(32)
    ck = tmp_path / "ck.pt"
    cfg = dict(epochs=1, batch_size=16, progress=False, checkpoint=str(ck))
    fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**cfg))
    good = ck.read_bytes()
    for content, message in (
        (good[: len(good) // 2], "not a readable checkpoint"),  # truncated
        (b"garbage" * 10, "not a readable checkpoint"),
        (None, "format"),  # a torch file that is not a training checkpoint
    ):
        if content is None:
            torch.save({"model": 1}, ck)
        else:
            ck.write_bytes(content)
        with pytest.raises(df.train.CheckpointError, match=message) as e:
            fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**{**cfg, "epochs": 2}))
        assert str(ck) in str(e.value) and isinstance(e.value, ValueError)
    # resume=False starts over and overwrites
    fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**cfg, resume=False))
    assert df.train.Checkpoint.load(ck).epoch == 1
    # another run description (meta) is refused
    with pytest.raises(df.train.CheckpointError, match="different configuration"):
        fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**cfg), meta={"lr": 1})
    with pytest.raises(df.train.CheckpointError, match="does not fit"):
        other = dnn.Sequential(dnn.Linear(3, 4), dnn.ReLU(), dnn.Linear(4, 1, gain=1.0))
        fit(other, df.losses.GaussianLikelihood(1.0), (x, y), TrainConfig(**{**cfg, "epochs": 2}))


def test_stop_callback_and_mixed_targets_resume_exactly(tmp_path):
    """A callback's stop leaves a checkpoint at the position; the resumed run equals an
    uninterrupted one, with a random batch transform returning mixed targets and metrics."""
    x, y = _data()
    lab = (y.squeeze(1) > 0).long()
    net = lambda s: dnn.Sequential(dnn.Linear(3, 8), dnn.ReLU(), dnn.Linear(8, 2, gain=1.0))  # noqa: E731

    def transform(xb, yb):  # a random mix, drawn from the global RNG that fit seeds
        perm = torch.randperm(yb.shape[0])
        lam = float(torch.rand(()))
        return lam * xb + (1 - lam) * xb[perm], df.train.MixedTargets(yb, yb[perm], lam)

    def errors(out, t):
        return {"error": (out.mean.argmax(1) != t.y_a).sum()}

    kw = dict(transform=transform, metrics=errors)
    cfg = dict(epochs=3, batch_size=16, lr=5e-3, progress=False, seed=4)
    torch.manual_seed(0)
    m1 = net(0)
    h1 = fit(m1, df.losses.categorical_nll, (x, lab), TrainConfig(**cfg), **kw)
    ck = str(tmp_path / "ck.pt")
    torch.manual_seed(0)
    m2 = net(0)
    h2 = fit(
        m2,
        df.losses.categorical_nll,
        (x, lab),
        TrainConfig(checkpoint=ck, **cfg),
        callbacks=[df.train.StopAfter(8)],
        **kw,
    )
    assert h2.stopped and h2.steps == 8 and len(h2) == 1
    m3 = net(0)
    h3 = fit(m3, df.losses.categorical_nll, (x, lab), TrainConfig(checkpoint=ck, **cfg), **kw)
    assert h3.resumed_from == (1, 2) and not h3.stopped and h3.steps == 18
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in m3.parameters()]),
        torch.cat([p.flatten() for p in m1.parameters()]),
        rtol=0,
        atol=0,
    )
    for a, b in zip(h1, h3):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
    assert 0 <= h1[-1]["error"] <= 1


def test_nonfinite_loss_names_the_step():
    x, y = _data(40)
    calls = {"n": 0}

    def step(model, xb, yb):
        calls["n"] += 1
        j = df.losses.gaussian_nll(model(xb), yb, 1.0)
        return j * float("nan") if calls["n"] == 4 else j

    with pytest.raises(FloatingPointError, match="epoch 1, step 3"):
        fit(_model(), None, (x, y), TrainConfig(epochs=2, batch_size=8, progress=False), step_fn=step)


def test_amp_training_restores_the_model():
    """bf16 autocast inside fit only: the moment-rule hooks are gone afterwards."""
    x, y = _data(32)
    model = _model()
    hist = fit(
        model,
        df.losses.GaussianLikelihood(1.0),
        (x, y),
        TrainConfig(epochs=2, batch_size=16, progress=False, amp=True),
    )
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert all(torch.isfinite(torch.tensor(hist["loss"])))
    assert df.train.predict(model, x).mean.dtype == torch.float32


def test_device_side_sums_give_the_same_records_and_check_at_intervals(monkeypatch):
    """On an accelerator the running sums stay on the device and NaN is checked every
    ``check_every`` steps (no host sync per step); forced here on the CPU: the same records."""
    from dualflow.train import loop

    x, y = _data(48)
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, check_every=4)
    h_host = fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), cfg)
    monkeypatch.setattr(loop, "_host_sums", lambda device: False)
    h_dev = fit(_model(), df.losses.GaussianLikelihood(1.0), (x, y), cfg)
    for a, b in zip(h_host, h_dev):
        for k in ("loss", "nll", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-12), k
    calls = {"n": 0}

    def step(model, xb, yb):  # a loss without its own NaN checks
        calls["n"] += 1
        j = ((model(xb).mean - yb) ** 2).mean()
        return j * float("nan") if calls["n"] == 2 else j

    model = dnn.set_checks(_model(), False)  # (else the next step's input check fires first)
    with pytest.raises(FloatingPointError, match="epoch 1, between steps 0 and 4"):
        fit(model, None, (x, y), cfg, step_fn=step)
