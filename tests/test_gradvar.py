"""Gradient-variance estimator (dualflow.experiments.gradvar) and the Figure 1 commands.

* the estimator recovers the closed-form gradient variance of a linear-Gaussian model for
  every method (mini-batch noise only for bp and vanilla, plus weight noise for reparam,
  local-reparam and flipout) within its confidence interval;
* BP's gradient variance falls as 1/B (log-log slope -1) on a synthetic classification MLP;
* the ``gradvar`` and ``convergence`` commands run on a tiny fake MNIST and write valid files.
"""

import json
import math

import numpy as np
import pytest
import torch

import dualflow.methods as dm
from dualflow.experiments import gradvar as gv
from dualflow.experiments.cli import main

METHODS = list(gv.DEFAULT_METHODS)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(("df", "want"), [(1, 12.7062047), (4, 2.7764451), (9, 2.2621572), (30, 2.0422725)])
def test_t_quantile_matches_tables(df, want):
    assert gv.t_quantile(0.975, df) == pytest.approx(want, abs=2e-6)


def test_loglog_and_floor_fits_on_exact_curves():
    bs = [16, 32, 64, 128, 256]
    fit = gv.fit_loglog(bs, [3.0 / b for b in bs], [0.03 / b for b in bs])
    assert fit["slope"] == pytest.approx(-1.0, abs=1e-9)
    fl = gv.fit_floor(bs, [3.0 / b + 0.01 for b in bs], [1e-3] * 5)
    assert fl["a"] == pytest.approx(3.0, rel=1e-6) and fl["floor"] == pytest.approx(0.01, rel=1e-6)
    assert gv.fit_floor(bs, [3.0 / b for b in bs], [1e-3] * 5)["floor_share"] == pytest.approx(0, abs=1e-9)


# ----------------------------------------------------------------------------- linear-Gaussian oracle

N, P, TAU2 = 400, 3, 0.5


def _linear_setup():
    g = torch.Generator().manual_seed(1)
    # non-Gaussian, correlated inputs so that every term of the closed form matters
    z = torch.randn(N, P, generator=g)
    x = torch.stack([z[:, 0], 0.6 * z[:, 0] + 0.8 * z[:, 1], torch.rand(N, generator=g) * 3 - 1], 1)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + math.sqrt(TAU2) * torch.randn(N, generator=g)
    build = dm.mlp_builder(P, [], 1)  # one Linear layer P -> 1 with bias
    torch.manual_seed(0)
    net = build(True)
    lin = net[0]
    with torch.no_grad():  # a point away from the optimum, with sizeable weight noise
        lin.weight_mu.copy_(torch.tensor([[0.2, -1.0, 1.0]]))
        lin.bias_mu.fill_(-0.2)
        sig = torch.tensor([[0.5, 0.3, 0.7]])
        lin.weight_rho.copy_(torch.log(torch.expm1(sig)))
        lin.bias_rho.fill_(math.log(math.expm1(0.4)))
    kw = {"noise_var": TAU2, "learn_noise": False}
    methods = gv.prepare_methods(build, net.state_dict(), METHODS, task="regression", method_kw=kw)
    xa = torch.cat([x, torch.ones(N, 1)], 1)
    mu = torch.cat([lin.weight_mu.detach().reshape(-1), lin.bias_mu.detach()])
    s2 = torch.cat([lin.weight_var.detach().reshape(-1), lin.bias_var.detach()])
    tau2 = float(methods["bp"].noise_var)
    return methods, (x, y), (xa, y, mu, s2, tau2)


def test_prepare_methods_share_the_parameter_point():
    methods, _, (_, _, mu, _, _) = _linear_setup()
    for m in methods.values():
        got = torch.cat([p.detach().reshape(-1) for _, p in gv.mean_parameters(m.net)])
        torch.testing.assert_close(got, mu)


def test_estimator_recovers_closed_form_linear_gaussian():
    methods, data, (xa, y, mu, s2, tau2) = _linear_setup()
    # 99.9% intervals: 10 cases, and the t-interval over replicate groups under-covers a
    # little when the per-group estimates are skewed (few coordinates, as here)
    recs = gv.run_gradvar(methods, data, [4, 64], draws=40, groups=25, level=0.999, seed=3)
    for r in recs:
        exact = gv.linear_gaussian_variance(xa, y, mu, s2, tau2, r["batch_size"], r["method"])
        assert r["ci_low"] <= exact <= r["ci_high"], (r["method"], r["batch_size"], exact, r)
        assert r["variance"] == pytest.approx(exact, rel=0.12)
    # the paired excess over vanilla (same batches) is the weight-noise term alone
    fits = gv.summarize_fits(recs, level=0.999)
    for m in ("reparam", "local-reparam", "flipout", "bp"):
        for e in fits[m]["excess"]:
            b = e["batch_size"]
            want = gv.linear_gaussian_variance(xa, y, mu, s2, tau2, b, m) - gv.linear_gaussian_variance(
                xa, y, mu, s2, tau2, b, "vanilla"
            )
            assert e["ci_low"] <= want <= e["ci_high"], (m, b, want, e)
    # the oracle itself: weight noise adds variance; reparam's does not fall with B
    v = {
        (m, b): gv.linear_gaussian_variance(xa, y, mu, s2, tau2, b, m) for m in METHODS for b in (4, 64, 400)
    }
    for b in (4, 64):
        for m in ("reparam", "local-reparam", "flipout"):
            assert v[(m, b)] > v[("vanilla", b)]
        assert v[("local-reparam", b)] == pytest.approx(v[("flipout", b)])
    assert v[("bp", 400)] == 0.0 and v[("vanilla", 400)] == 0.0 and v[("local-reparam", 400)] > 0
    assert v[("reparam", 400)] > 0.5 * v[("reparam", 64)]


def test_closed_form_matches_brute_force_enumeration():
    """The mini-batch formulas against the exact variance over all batches of a tiny data set
    (N = 6, B = 2: 15 batches), weight noise integrated by many draws per batch."""
    import itertools

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y = torch.randn(6, generator=g, dtype=torch.float64)
    mu = torch.tensor([0.3, -0.5], dtype=torch.float64)
    s2 = torch.tensor([0.4, 0.1], dtype=torch.float64)
    tau2 = 0.7
    batches = list(itertools.combinations(range(6), 2))
    for method in ("vanilla", "bp", "reparam"):
        grads = []
        for bt in batches:
            xb, yb = x[list(bt)], y[list(bt)]
            r = yb - xb @ mu
            if method == "bp":
                gb = -(r / (xb * xb @ s2 + tau2))[:, None] * xb
                grads.append(gb.mean(0)[None])
            elif method == "vanilla":
                grads.append((-(r / tau2)[:, None] * xb).mean(0)[None])
            else:  # exact conditional variance given the batch: C_hat diag(s2) C_hat / tau^4
                c = xb.T @ xb / 2
                grads.append((-(r / tau2)[:, None] * xb).mean(0)[None])
                grads.append(torch.diag(c @ torch.diag(s2) @ c / tau2**2)[None])
        if method == "reparam":
            means = torch.cat(grads[0::2])
            extra = torch.cat(grads[1::2]).mean(0)
            want = (means.var(0, unbiased=False) + extra).mean()
        else:
            want = torch.cat(grads).var(0, unbiased=False).mean()
        got = gv.linear_gaussian_variance(x, y, mu, s2, tau2, 2, method)
        assert got == pytest.approx(float(want), rel=1e-10), method


# ----------------------------------------------------------------------------- 1/B for BP


def test_bp_gradient_variance_falls_as_one_over_batch_size():
    g = torch.Generator().manual_seed(2)
    n = 20000  # finite-population factor >= 0.987 at B = 256: slope bias < 0.003
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    build = dm.mlp_builder(5, 16, 3)
    torch.manual_seed(0)
    state = build(True).state_dict()
    methods = gv.prepare_methods(build, state, ["bp"])
    bs = [4, 16, 64, 256]
    recs = gv.run_gradvar(methods, (x, y), bs, draws=20, groups=10, seed=0)
    fit = gv.fit_loglog(bs, [r["variance"] for r in recs], [r["se"] for r in recs])
    assert abs(fit["slope"] + 1.0) < max(3 * fit["slope_se"], 0.03), fit
    assert fit["slope_se"] < 0.05


# ----------------------------------------------------------------------------- commands


def _fake_mnist(root, n=120):
    rng = np.random.default_rng(0)
    d = root / "mnist"
    d.mkdir(parents=True)
    y = rng.integers(0, 10, n)
    x = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
    for k in range(10):  # a little class signal
        x[y == k, k : k + 3, 4:20] += 150
    np.savez(d / "train.npz", x=x, y=y.astype(np.int64))
    np.savez(d / "test.npz", x=x[:20], y=y[:20].astype(np.int64))


def test_gradvar_cli_writes_valid_json(tmp_path):
    _fake_mnist(tmp_path)
    out = tmp_path / "gv" / "gradvar.json"
    argv = [
        "gradvar",
        "--dataset",
        "mnist",
        "--arch",
        "mlp",
        "--width",
        "8",
        "--methods",
        "bp,reparam,local-reparam,flipout,vanilla",
        "--batch-sizes",
        "4,16",
        "--draws",
        "3",
        "--groups",
        "3",
        "--warmup-epochs",
        "0.5",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    rows = res["results"]
    assert {(r["method"], r["batch_size"]) for r in rows} == {(m, b) for m in METHODS for b in (4, 16)}
    for r in rows:
        assert {"method", "batch_size", "variance", "ci_low", "ci_high"} <= set(r)
        assert r["variance"] > 0 and r["ci_low"] <= r["variance"] <= r["ci_high"]
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".csv").stat().st_size > 0


def test_convergence_cli_writes_curves(tmp_path):
    _fake_mnist(tmp_path)
    out_dir = tmp_path / "conv"
    argv = [
        "convergence",
        "--dataset",
        "mnist",
        "--arch",
        "mlp",
        "--width",
        "8",
        "--methods",
        "bp,flipout,vanilla",
        "--epochs",
        "2",
        "--seeds",
        "0,1",
        "--val-size",
        "20",
        "--batch-size",
        "32",
        "--kl-n",
        "1000",
        "--data-dir",
        str(tmp_path),
        "--out-dir",
        str(out_dir),
    ]
    assert main(argv) == 0
    res = json.loads((out_dir / "convergence.json").read_text())
    assert res["data"]["kl_n"] == 1000 and res["data"]["n_train"] == 100
    recs = res["records"]
    assert len(recs) == 3 * 2 * 2
    assert all(math.isfinite(r["train_data_term"]) and math.isfinite(r["val_nll"]) for r in recs)
    assert (out_dir / "convergence.png").stat().st_size > 0
    assert (out_dir / "convergence.csv").read_text().count("\n") == len(recs) + 1
    (out_dir / "convergence.png").unlink()
    assert main(["convergence", "--out-dir", str(out_dir), "--plot-only"]) == 0
    assert (out_dir / "convergence.png").stat().st_size > 0
