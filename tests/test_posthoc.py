"""Post-hoc diagonal Laplace (dualflow.posthoc) against naive references and laplace-torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dualflow as df
from dualflow import posthoc

D = torch.float64


def regression_problem(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=D, generator=g)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] + 0.1 * torch.randn(n, 1, dtype=D, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(D)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    return net, x, y


def naive_diag_ggn(net, x, names, task):
    """Per-example Jacobians by a Python loop of autograd calls."""
    params = dict(net.named_parameters())
    out = {k: torch.zeros_like(params[k]) for k in names}
    for i in range(x.shape[0]):
        f = net(x[i : i + 1])[0]
        jac = []
        for d in range(f.shape[0]):
            grads = torch.autograd.grad(f[d], [params[k] for k in names], retain_graph=True)
            jac.append(grads)
        if task == "regression":
            for j, k in enumerate(names):
                out[k] += sum(jac[d][j] ** 2 for d in range(len(jac)))
        else:
            p = torch.softmax(f.detach(), 0)
            for j, k in enumerate(names):
                js = torch.stack([jac[d][j] for d in range(len(jac))])  # (C, *shape)
                pj = p.reshape(-1, *([1] * (js.dim() - 1)))
                out[k] += (pj * js * js).sum(0) - (pj * js).sum(0) ** 2
    return out


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_diag_ggn_matches_naive_jacobians(task):
    torch.manual_seed(1)
    d_out = 1 if task == "regression" else 4
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, d_out)).to(D)
    x = torch.randn(9, 3, dtype=D)
    y = torch.randn(9, 1, dtype=D) if task == "regression" else torch.randint(0, 4, (9,))
    names = [n for n, _ in net.named_parameters()]
    diag, stat, n, d = posthoc.diag_ggn(net, (x, y), names, task, batch_size=4)
    ref = naive_diag_ggn(net, x, names, task)
    for k in names:
        torch.testing.assert_close(diag[k], ref[k])
    assert n == 9 and d == d_out
    if task == "regression":
        assert stat == pytest.approx(float(((net(x) - y) ** 2).sum()))
    else:
        assert stat == pytest.approx(float(torch.log_softmax(net(x), -1).gather(1, y[:, None]).sum()))


def test_marginal_likelihood_is_maximised_and_matches_laplace_torch():
    laplace_lib = pytest.importorskip("laplace")
    net, x, y = regression_problem()
    res = posthoc.laplace(net, (x, y), noise_var="marglik")
    assert res.noise_var > 0 and res.prior_precision > 0
    # stationary in both hyperparameters: small moves lower the marginal likelihood
    for dd, ds in [(1.05, 1.0), (0.95, 1.0), (1.0, 1.05), (1.0, 0.95)]:
        r = posthoc.laplace(
            net, (x, y), prior_precision=res.prior_precision * dd, noise_var=res.noise_var * ds
        )
        assert r.log_marglik < res.log_marglik
    # the default noise is the residuals' maximum-likelihood value; only delta is fitted then
    default = posthoc.laplace(net, (x, y))
    assert default.noise_var == pytest.approx(float(((net(x) - y) ** 2).mean()))
    # the same objective as laplace-torch's diagonal Laplace (same GGN, same formula)
    la = laplace_lib.Laplace(net.float(), "regression", subset_of_weights="all", hessian_structure="diag")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.float(), y.float()), batch_size=64))
    theirs = la.log_marginal_likelihood(
        torch.tensor([res.prior_precision]), torch.tensor([math.sqrt(res.noise_var)])
    )
    net.double()
    assert float(theirs) == pytest.approx(res.log_marglik, rel=1e-4)


def test_predictive_variance_is_the_linearised_variance_for_small_weight_noise():
    """Small posterior variances: the propagated output variance equals sum_i J_i^2 s_i^2
    (the diagonal GLM predictive) to first order, and the mean tends to f(x; theta*)."""
    net, x, y = regression_problem()
    res = posthoc.laplace(net, (x, y), prior_precision=1e3, noise_var=1e-2, predictive="moments")
    lin = posthoc.laplace(net, (x, y), prior_precision=1e3, noise_var=1e-2)
    xt = torch.randn(7, 3, dtype=D)
    pred = res.predict(xt)
    names = [n for n, _ in net.named_parameters()]
    s2 = {}
    for path, mod in res.model.named_modules():
        if isinstance(mod, df.nn.BayesLayer):
            s2[f"{path}.weight"] = mod.weight_var.detach()
            s2[f"{path}.bias"] = mod.bias_var.detach()
    params = dict(net.named_parameters())
    glm = []
    for i in range(xt.shape[0]):
        grads = torch.autograd.grad(net(xt[i : i + 1]).sum(), [params[k] for k in names])
        glm.append(sum(float((gr**2 * s2[k]).sum()) for gr, k in zip(grads, names)))
    glm = torch.tensor(glm, dtype=D)
    fvar = pred.var[:, 0] - res.noise_var
    torch.testing.assert_close(fvar, glm, rtol=0.03, atol=0)
    # the mean moves at second order in the weight noise (curvature of tanh): within 0.1 sd
    shift = (pred.mean[:, 0] - net(xt).detach()[:, 0]).abs() / glm.sqrt()
    assert float(shift.max()) < 0.1, shift
    # the linearised propagation (Eq. 3): the network's mean, the GLM variance (one hidden layer:
    # up to the product of two variances)
    p_lin = lin.predict(xt)
    torch.testing.assert_close(p_lin.mean, net(xt).detach())
    torch.testing.assert_close(p_lin.var[:, 0] - lin.noise_var, glm, rtol=5e-3, atol=0)


def test_result_predicts_and_is_a_converted_model():
    net, x, y = regression_problem()
    res = posthoc.laplace(net, (x, y), layerwise=True)
    assert isinstance(res.model, df.convert_fx.ConvertedModel)
    assert set(res.prior_precision) == {"0", "2"}
    for path, mod in res.model.named_modules():
        if isinstance(mod, df.nn.BayesLayer):
            assert mod.prior_var == pytest.approx(1.0 / res.prior_precision[path])
    p = res.predict(x[:5])
    assert p.mean.shape == (5, 1) and bool((p.var > res.noise_var).all())
    assert res.n_params == sum(p.numel() for p in net.parameters())
    # the original model is untouched
    assert net.training


def test_classification():
    torch.manual_seed(0)
    x = torch.randn(60, 2, dtype=D)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3)).to(D)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    res = posthoc.laplace(net, (x, y), task="classification")
    assert res.noise_var is None
    p = res.predict(x)
    torch.testing.assert_close(p.sum(1), torch.ones(60, dtype=D))
    # the predictive is less confident than the point network's softmax
    assert float(p.max(1).values.mean()) < float(torch.softmax(net(x), 1).max(1).values.mean())


def test_bad_arguments():
    net, x, y = regression_problem(n=20)
    with pytest.raises(ValueError, match="task"):
        posthoc.laplace(net, (x, y), task="ranking")
    with pytest.raises(ValueError, match="prior_precision"):
        posthoc.laplace(net, (x, y), prior_precision=-1.0)
    with pytest.raises(ValueError, match="noise_var"):
        posthoc.laplace(net, (x, y), noise_var="mle")
    with pytest.raises(ValueError, match="differ in length"):
        posthoc.laplace(net, (x, y[:5]))


def test_linearized_result_saves_and_loads(tmp_path):
    net, x, y = regression_problem(n=40)
    res = posthoc.laplace(net, (x, y))
    assert isinstance(res.model.get_submodule("0"), posthoc.LinearizedLinear)
    df.save(res.model, tmp_path / "post.pt")
    back = df.load(tmp_path / "post.pt")
    assert isinstance(back.get_submodule("0"), posthoc.LinearizedLinear)
    a, b = res.model(x), back(x)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
