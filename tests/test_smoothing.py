"""Smoothing by backprop on networks (docs/maths.md section 4)."""

from __future__ import annotations

import pytest
import torch

from dualflow import nn as dnn
from dualflow.nn.structure import AddNoise
from dualflow.smoothing import importance_smoothing, smooth

D = torch.float64


def test_gaussian_linear_network_equals_exact_conditioning():
    """x -> W1 x + b1 + e1 (independent units) -> w2^T h + b2 -> y = z + e: exact Gaussian
    conditioning of h and z given y, per example, to float64 precision."""
    torch.manual_seed(0)
    n, d, q1, r = 6, 4, 0.7, 0.3
    net = dnn.Sequential(dnn.Linear(d, n, bayes=False), AddNoise(q1), dnn.Linear(n, 1, bayes=False)).to(D)
    x = torch.randn(5, d, dtype=D)
    y = torch.randn(5, 1, dtype=D)
    rec = smooth(net, x, y, noise_var=r)
    assert [r_.name for r_ in rec] == ["0", "1", "2"]
    W1, b1 = net[0].weight_mu.detach(), net[0].bias_mu.detach()
    w2, b2 = net[2].weight_mu.detach()[0], net[2].bias_mu.detach()
    mu = x @ W1.T + b1  # (B, n)
    P = q1 * torch.eye(n, dtype=D)
    s = w2 @ P @ w2 + r
    innov = y[:, 0] - (mu @ w2 + b2)
    post_m = mu + (P @ w2)[None] * (innov / s)[:, None]
    post_P = P - torch.outer(P @ w2, P @ w2) / s
    h = rec[1]
    torch.testing.assert_close(h.filtered.mean, mu)
    torch.testing.assert_close(h.smoothed.mean, post_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.smoothed.var, torch.diagonal(post_P).expand(5, n), rtol=1e-12, atol=1e-12)
    z = rec[2]
    vz = w2 @ P @ w2
    torch.testing.assert_close(z.smoothed.mean[:, 0], (mu @ w2 + b2) + vz * innov / s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.smoothed.var[:, 0], (vz - vz**2 / s).expand(5), rtol=1e-12, atol=1e-12)


def test_bnn_smoothing_vs_importance_sampling():
    """Nonlinear BNN: backprop smoothing approximates the importance-sampling posterior.

    Measured discrepancy is printed; the assertion is that smoothing moves the hidden
    means towards the Monte Carlo posterior (error smaller than the filtering error).
    """
    torch.manual_seed(1)
    net = dnn.Sequential(
        dnn.Linear(3, 8, init_var_ratio=0.3), dnn.ReLU(), dnn.Linear(8, 1, gain=1.0, init_var_ratio=0.3)
    ).to(D)
    x = torch.randn(4, 3, dtype=D)
    y = torch.randn(4, 1, dtype=D) * 2
    bp = smooth(net, x, y, noise_var=0.2)
    gen = torch.Generator().manual_seed(0)
    mc = importance_smoothing(net, x, y, noise_var=0.2, samples=4000, generator=gen)
    for a, b in zip(bp, mc):
        # filtering: moment propagation vs MC marginal
        sd = b.filtered.var.sqrt() + 1e-9
        err_f = ((a.filtered.mean - b.filtered.mean).abs() / sd).mean()
        err_s = ((a.smoothed.mean - b.smoothed.mean).abs() / sd).mean()
        prior_gap = ((a.filtered.mean - b.smoothed.mean).abs() / sd).mean()
        print(f"layer {a.name}: filter err {err_f:.3f}, smooth err {err_s:.3f}, prior gap {prior_gap:.3f} sd")
        assert float(err_f) < 0.1
        assert float(err_s) < float(prior_gap)


def test_smooth_classification_and_errors():
    net = dnn.Sequential(dnn.Linear(3, 5), dnn.ReLU(), dnn.Linear(5, 4))
    rec = smooth(net, torch.randn(6, 3), torch.randint(0, 4, (6,)), task="classification")
    assert len(rec) == 3 and rec[-1].smoothed.mean.shape == (6, 4)
    assert all(bool((r.smoothed.var >= 0).all()) for r in rec)
    with pytest.raises(ValueError, match="noise_var"):
        smooth(net, torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="task"):
        smooth(net, torch.randn(2, 3), torch.randn(2, 4), task="ranking")
