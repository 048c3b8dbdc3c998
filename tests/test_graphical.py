"""Tests of dualflow.graphical: smoothing by backprop equals explicit smoothing (float64).

docs/maths.md sections 4-5 / the paper's Appendix C: the Rauch-Tung-Striebel smoother and the HMM
forward-backward smoother are exactly the gradients of the filter's log-likelihood with
respect to the filter's own outputs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dualflow import graphical as gm
from dualflow.graphical import (
    hmm_filter,
    hmm_forward_backward,
    hmm_smoother_by_backprop,
    kalman_filter,
    kalman_smoother_by_backprop,
    rts_smoother,
)

DT = torch.float64
TOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the recursions are long chains of tiny ops: one thread is faster and immune to
    # oversubscription when other jobs share the machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- models
def _spd(g: torch.Generator, n: int, batch: tuple[int, ...], lo: float = -1.0, hi: float = 1.0):
    """Random SPD matrices with eigenvalues log-uniformly spaced in [10^lo, 10^hi]."""
    u, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=DT))
    ev = torch.logspace(lo, hi, n, dtype=DT)
    return (u * ev) @ u.mT


def _lgssm(seed: int, n: int, m: int, T: int, B: int | None = None, ill: bool = False):
    g = torch.Generator().manual_seed(seed)
    bs = () if B is None else (B,)
    F = torch.randn(*bs, n, n, generator=g, dtype=DT)
    F = 0.97 * F / torch.linalg.eigvals(F).abs().amax(-1)[..., None, None]
    H = torch.randn(*bs, m, n, generator=g, dtype=DT)
    if ill:
        Q, R, P0 = _spd(g, n, bs, -4, 2), _spd(g, m, bs, -3, 2), _spd(g, n, bs, -4, 4)
    else:
        Q, R, P0 = _spd(g, n, bs, -1, 0), _spd(g, m, bs, -1, 0), _spd(g, n, bs, -1, 1)
    x0 = torch.randn(*bs, n, generator=g, dtype=DT)
    z = 3.0 * torch.randn(*bs, T, m, generator=g, dtype=DT)
    return z, F, H, Q, R, x0, P0


def _hmm(seed: int, S: int, T: int, B: int | None = None, sparse: bool = False):
    g = torch.Generator().manual_seed(seed)
    bs = () if B is None else (B,)
    A = torch.rand(*bs, S, S, generator=g, dtype=DT) + 0.05
    if sparse:  # zero transitions (keep the diagonal so rows stay valid)
        mask = torch.rand(*bs, S, S, generator=g, dtype=DT) < 0.4
        mask = mask & ~torch.eye(S, dtype=torch.bool)
        A = A.masked_fill(mask, 0.0)
    A = A / A.sum(-1, keepdim=True)
    pi = torch.rand(*bs, S, generator=g, dtype=DT) + 0.1
    pi = pi / pi.sum(-1, keepdim=True)
    log_obs = 2.0 * torch.randn(*bs, T, S, generator=g, dtype=DT)
    return log_obs, A, pi


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    """Max |a - b| relative to max(1, max |b|); asserts <= tol and returns it."""
    err = ((a - b).abs().amax() / b.abs().amax().clamp(min=1.0)).item()
    assert err <= tol, f"discrepancy {err:.3g} > {tol:.1g}"
    return err


# --------------------------------------------------------------------------- brute force
def _joint_gaussian(z, F, H, Q, R, x0, P0):
    """Unbatched reference: exact joint Gaussian of all states and observations."""
    T, m = z.shape
    n = F.shape[0]
    mus = [x0]
    blocks = [[None] * T for _ in range(T)]
    blocks[0][0] = P0
    for t in range(1, T):
        mus.append(F @ mus[-1])
        blocks[t][t] = F @ blocks[t - 1][t - 1] @ F.T + Q
    for t in range(T):
        for s in range(t - 1, -1, -1):
            blocks[t][s] = F @ blocks[t - 1][s]  # Cov(x_t, x_s) = F Cov(x_{t-1}, x_s)
            blocks[s][t] = blocks[t][s].T
    Cx = torch.cat([torch.cat(row, 1) for row in blocks], 0)
    mux = torch.cat(mus)
    Hb = torch.block_diag(*[H] * T)
    Rb = torch.block_diag(*[R] * T)
    muz = Hb @ mux
    Cz = Hb @ Cx @ Hb.T + Rb
    Cxz = Cx @ Hb.T
    return mux, Cx, muz, Cz, Cxz, n, m


def _condition(mux, Cx, muz, Cz, Cxz, zflat, k):
    """Moments of all states given the first k observation entries."""
    Czk = Cz[:k, :k]
    gain = torch.linalg.solve(Czk, Cxz[:, :k].T).T
    return mux + gain @ (zflat[:k] - muz[:k]), Cx - gain @ Cxz[:, :k].T


# =========================================================================== Kalman
KALMAN_CASES = [
    # (n, m, T, B)
    (1, 1, 1, None),
    (1, 1, 50, None),
    (2, 1, 30, None),
    (3, 2, 40, 4),
    (4, 4, 25, None),
    (5, 3, 50, 3),
    (6, 1, 20, 2),
    (8, 4, 50, None),
    (8, 2, 35, 5),
]


@pytest.mark.parametrize("vjp", ["closed_form", "autograd"])
@pytest.mark.parametrize(("n", "m", "T", "B"), KALMAN_CASES)
def test_kalman_backprop_smoother_equals_rts(n, m, T, B, vjp):
    args = _lgssm(100 * n + 10 * m + T, n, m, T, B)
    xs, Ps = rts_smoother(*args)
    xb, Pb = kalman_smoother_by_backprop(*args, vjp=vjp)
    lead = () if B is None else (B,)
    assert xs.shape == xb.shape == (*lead, T, n)
    assert Ps.shape == Pb.shape == (*lead, T, n, n)
    _close(xb, xs)
    _close(Pb, Ps)
    # the last smoothed moments are the filtered ones
    xf, Pf, _ = kalman_filter(*args)
    _close(xb[..., -1, :], xf[..., -1, :], 1e-14)
    _close(Pb[..., -1, :, :], Pf[..., -1, :, :], 1e-14)


@pytest.mark.parametrize("vjp", ["closed_form", "autograd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kalman_identity_ill_conditioned(seed, vjp):
    # Q, R, P0 with condition numbers 1e6, 1e5, 1e8; smoothed covariances ~1e5-1e6
    args = _lgssm(seed, 6, 3, 50, ill=True)
    xs, Ps = rts_smoother(*args)
    xb, Pb = kalman_smoother_by_backprop(*args, vjp=vjp)
    assert torch.linalg.cond(Ps).amax() > 1e4
    _close(xb, xs)
    _close(Pb, Ps)


def _perturbation_grads(args, vjp, dx=None, dP=None):
    """d loglik / d (dx_t, dP_t) through the chosen route (the smoother's raw gradients)."""
    mdl = gm._prepare_lgssm(*args, validate=False)
    B, T, _ = mdl.z.shape
    n = mdl.F.shape[-1]
    dx = torch.zeros(B, T, n, dtype=DT) if dx is None else dx
    dP = torch.zeros(B, T, n, n, dtype=DT) if dP is None else dP
    dx, dP = dx.clone().requires_grad_(), dP.clone().requires_grad_()
    if vjp == "closed_form":
        ll = gm._FilterLogLik.apply(dx, dP, mdl)[0]
    else:
        ll = gm._kf_forward(mdl, dx.unbind(1), dP.unbind(1)).loglik
    weights = torch.linspace(0.5, 1.5, B, dtype=DT)
    g, G = torch.autograd.grad((ll * weights).sum(), (dx, dP), allow_unused=True)
    return g, (torch.zeros_like(dP) if G is None else G)


@pytest.mark.parametrize(
    ("n", "m", "T", "B", "shared"), [(3, 2, 30, 4, False), (5, 1, 25, 2, True), (2, 2, 2, 1, False)]
)
def test_closed_form_vjp_equals_autograd(n, m, T, B, shared):
    """The hand-written VJP of the filter (the Bryson-Frazier recursion) is the gradient
    torch.autograd computes op by op, also away from zero perturbations and with shared
    (unbatched) model matrices; weighted batch elements check the incoming-gradient scaling."""
    args = list(_lgssm(31 * n + T, n, m, T, B))
    if shared:
        args[1:5] = [a[0] for a in args[1:5]]  # F, H, Q, R shared by the batch
    g = torch.Generator().manual_seed(1)
    dx = 0.1 * torch.randn(B, T, n, generator=g, dtype=DT)
    dP = 0.01 * torch.randn(B, T, n, n, generator=g, dtype=DT)
    for pert in ((None, None), (dx, _sym_t(dP))):
        ga, Ga = _perturbation_grads(args, "autograd", *pert)
        gc, Gc = _perturbation_grads(args, "closed_form", *pert)
        _close(gc, ga, 1e-12)
        _close(Gc, 0.5 * (Ga + Ga.mT), 1e-12)


def _sym_t(a):
    return 0.5 * (a + a.mT)


def test_closed_form_vjp_gradcheck():
    """gradcheck of the closed-form backward at a random (non-symmetric) perturbation."""
    args = _lgssm(17, 2, 1, 4, B=2)
    mdl = gm._prepare_lgssm(*args, validate=False)
    g = torch.Generator().manual_seed(3)
    dx = (0.1 * torch.randn(2, 4, 2, generator=g, dtype=DT)).requires_grad_()
    dP = (0.01 * torch.randn(2, 4, 2, 2, generator=g, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gm._FilterLogLik.apply(a, b, mdl)[0], (dx, dP))


def test_vjp_argument_checked():
    args = _lgssm(2, 2, 1, 6)
    with pytest.raises(ValueError, match="vjp must be"):
        kalman_smoother_by_backprop(*args, vjp="numeric")
    with pytest.raises(ValueError, match="create_graph=True needs vjp='autograd'"):
        kalman_smoother_by_backprop(*args, vjp="closed_form", create_graph=True)


def test_kalman_mixed_batching_matches_per_element():
    # z batched, F/H/R shared, Q and x0 batched
    z, F, H, Q, R, x0, P0 = _lgssm(7, 3, 2, 20, B=3)
    F, H, R, P0 = F[0], H[0], R[0], P0[0]
    xb, Pb = kalman_smoother_by_backprop(z, F, H, Q, R, x0, P0)
    xf, Pf, ll = kalman_filter(z, F, H, Q, R, x0, P0)
    assert ll.shape == (3,) and xf.shape == (3, 20, 3) and Pf.shape == (3, 20, 3, 3)
    for b in range(3):
        xs1, Ps1 = rts_smoother(z[b], F, H, Q[b], R, x0[b], P0)
        _, _, ll1 = kalman_filter(z[b], F, H, Q[b], R, x0[b], P0)
        _close(xb[b], xs1)
        _close(Pb[b], Ps1)
        _close(ll[b], ll1, 1e-12)
    # unbatched z with batched parameters broadcasts z
    xs2, _ = rts_smoother(z[0], F, H, Q, R, x0, P0)
    assert xs2.shape == (3, 20, 3)


@pytest.mark.parametrize(("n", "m", "T", "B"), [(1, 1, 6, None), (2, 1, 5, None), (3, 2, 4, 2)])
def test_kalman_vs_joint_gaussian(n, m, T, B):
    args = _lgssm(3 + n, n, m, T, B)
    xf, Pf, ll = kalman_filter(*args)
    xs, Ps = rts_smoother(*args)
    xb, Pb = kalman_smoother_by_backprop(*args)
    for b in range(1 if B is None else B):
        sel = (lambda a: a) if B is None else (lambda a, b=b: a[b])
        z, F, H, Q, R, x0, P0 = (sel(a) for a in args)
        mux, Cx, muz, Cz, Cxz, _, _ = _joint_gaussian(z, F, H, Q, R, x0, P0)
        zflat = z.reshape(-1)
        ref_ll = torch.distributions.MultivariateNormal(muz, Cz).log_prob(zflat)
        _close(sel(ll), ref_ll, 1e-11)
        ms, Cs = _condition(mux, Cx, muz, Cz, Cxz, zflat, T * m)
        for t in range(T):
            blk = slice(t * n, (t + 1) * n)
            _close(sel(xs)[t], ms[blk], 1e-10)
            _close(sel(Ps)[t], Cs[blk, blk], 1e-10)
            _close(sel(xb)[t], ms[blk], 1e-10)
            _close(sel(Pb)[t], Cs[blk, blk], 1e-10)
            mf, Cf = _condition(mux, Cx, muz, Cz, Cxz, zflat, (t + 1) * m)
            _close(sel(xf)[t], mf[blk], 1e-10)
            _close(sel(Pf)[t], Cf[blk, blk], 1e-10)


def test_kalman_filter_loglik_gradcheck():
    z, F, H, Q, R, x0, P0 = _lgssm(11, 2, 1, 4)
    lq = torch.linalg.cholesky(Q)

    def f(z_, F_, lq_, r_, x0_):
        Q_ = lq_ @ lq_.mT + 1e-3 * torch.eye(2, dtype=DT)
        R_ = r_ @ r_.mT + 1e-3
        return kalman_filter(z_, F_, H, Q_, R_, x0_, P0, validate=False)[2]

    inputs = [a.clone().requires_grad_() for a in (z, F, lq, R.sqrt(), x0)]
    assert torch.autograd.gradcheck(f, inputs)


def test_backprop_smoother_is_differentiable():
    """The backprop smoother sits inside objectives: its derivatives equal RTS's."""
    z, F, H, Q, R, x0, P0 = _lgssm(5, 3, 2, 12)
    outs = []
    for route in (rts_smoother, kalman_smoother_by_backprop):
        Fr = F.clone().requires_grad_()
        Qr = Q.clone().requires_grad_()
        zr = z.clone().requires_grad_()
        xs, Ps = route(zr, Fr, H, Qr, R, x0, P0)
        assert xs.requires_grad and Ps.requires_grad
        obj = (xs.sin()).sum() + (Ps * torch.linspace(0, 1, 9, dtype=DT).view(3, 3)).sum()
        outs.append(torch.autograd.grad(obj, (Fr, Qr, zr)))
    for a, b in zip(*outs):
        _close(b, a, 1e-9)


def test_backprop_smoother_gradcheck_tiny():
    z, F, H, Q, R, x0, P0 = _lgssm(9, 2, 1, 3)

    def f(z_, F_):
        xs, Ps = kalman_smoother_by_backprop(z_, F_, H, Q, R, x0, P0, validate=False)
        return xs, Ps

    assert torch.autograd.gradcheck(f, [z.clone().requires_grad_(), F.clone().requires_grad_()])


def test_create_graph_default_and_no_grad():
    args = _lgssm(2, 2, 1, 6)
    xb, Pb = kalman_smoother_by_backprop(*args)
    assert not xb.requires_grad and not Pb.requires_grad
    F = args[1].clone().requires_grad_()
    with torch.no_grad():
        xn, _ = kalman_smoother_by_backprop(args[0], F, *args[2:])
    assert not xn.requires_grad
    xg, _ = kalman_smoother_by_backprop(args[0], F, *args[2:])
    assert xg.requires_grad
    _close(xn, xb, 0.0)


def test_singular_process_noise_allowed():
    # deterministic dynamics (Q = 0) is a valid model; F invertible keeps P_{t+1|t} PD
    z, F, H, Q, R, x0, P0 = _lgssm(4, 3, 1, 15)
    Q0 = torch.zeros_like(Q)
    xs, Ps = rts_smoother(z, F, H, Q0, R, x0, P0)
    xb, Pb = kalman_smoother_by_backprop(z, F, H, Q0, R, x0, P0)
    _close(xb, xs, 1e-8)
    _close(Pb, Ps, 1e-8)


def test_float32_agrees_roughly():
    args64 = _lgssm(21, 4, 2, 30, B=2)
    args = [a.float() for a in args64]
    xs, Ps = rts_smoother(*args)
    xb, Pb = kalman_smoother_by_backprop(*args)
    assert xs.dtype == xb.dtype == torch.float32
    _close(xb, xs, 1e-4)
    _close(Pb, Ps, 1e-4)
    xs64, _ = rts_smoother(*args64)
    _close(xb.double(), xs64, 1e-4)


def test_fit_linear_gaussian_by_filter_loglik():
    """Maximum likelihood through the differentiable filter recovers (a, q, r)."""
    a_true, q_true, r_true = 0.8, 0.5, 1.0
    B, T = 8, 250  # 2000 observations in 8 independent sequences
    g = torch.Generator().manual_seed(0)
    p_stat = q_true / (1 - a_true**2)
    x = torch.randn(B, generator=g, dtype=DT) * math.sqrt(p_stat)
    zs = []
    for t in range(T):
        if t > 0:
            x = a_true * x + math.sqrt(q_true) * torch.randn(B, generator=g, dtype=DT)
        zs.append(x + math.sqrt(r_true) * torch.randn(B, generator=g, dtype=DT))
    z = torch.stack(zs, 1).unsqueeze(-1)
    one = torch.ones(1, 1, dtype=DT)
    theta = torch.tensor([0.2, 0.0, 0.0], dtype=DT, requires_grad=True)  # a, log q, log r
    opt = torch.optim.LBFGS([theta], max_iter=60, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        a, lq, lr = theta
        _, _, ll = kalman_filter(
            z,
            a.reshape(1, 1),
            one,
            lq.exp().reshape(1, 1),
            lr.exp().reshape(1, 1),
            torch.zeros(1, dtype=DT),
            one * p_stat,
            validate=False,
        )
        loss = -ll.sum() / (B * T)
        loss.backward()
        return loss

    opt.step(closure)
    a, q, r = theta[0].item(), theta[1].exp().item(), theta[2].exp().item()
    assert abs(a - a_true) < 0.05, a
    assert abs(q / q_true - 1) < 0.3, q
    assert abs(r / r_true - 1) < 0.2, r
    assert theta.grad is not None and theta.grad.abs().max() < 1e-4


# --------------------------------------------------------------------------- bad inputs
def _bad_kalman_cases():
    z, F, H, Q, R, x0, P0 = _lgssm(0, 2, 1, 5)
    good = {"z": z, "F": F, "H": H, "Q": Q, "R": R, "x0": x0, "P0": P0}
    nonsym = P0.clone()
    nonsym[0, 1] += 0.5
    indef = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)
    znan = z.clone()
    znan[2, 0] = float("nan")
    Finf = F.clone()
    Finf[0, 0] = float("inf")
    return good, [
        ("F", torch.randn(2, 3, dtype=DT), r"F must have shape \(n, n\)"),
        ("H", torch.randn(1, 3, dtype=DT), r"H must have shape \(m, n\)"),
        ("z", torch.randn(5, dtype=DT), r"z must have shape \(T, m\)"),
        ("z", torch.randn(0, 1, dtype=DT), "at least one time step"),
        ("x0", torch.randn(3, dtype=DT), r"x0 must have shape \(n,\)"),
        ("R", torch.eye(2, dtype=DT), r"R must have shape \(m, m\)"),
        ("P0", nonsym, "P0 is not symmetric"),
        ("P0", indef, "P0 is not positive definite"),
        ("R", -torch.ones(1, 1, dtype=DT), "R is not positive definite"),
        ("Q", indef, "Q is not positive semi-definite"),
        ("Q", nonsym, "Q is not symmetric"),
        ("z", znan, "z contains NaN or inf"),
        ("F", Finf, "F contains NaN or inf"),
        ("Q", Q.float(), "same dtype"),
        ("Q", torch.stack([Q] * 3), "batch size"),
    ]


_GOOD_KALMAN, _BAD_KALMAN = _bad_kalman_cases()


@pytest.mark.parametrize(("name", "value", "match"), _BAD_KALMAN, ids=[c[2] for c in _BAD_KALMAN])
@pytest.mark.parametrize("fn", [kalman_filter, rts_smoother, kalman_smoother_by_backprop])
def test_kalman_bad_inputs(fn, name, value, match):
    kw = dict(_GOOD_KALMAN)
    kw[name] = value
    if name == "Q" and value.dim() == 3:
        kw["z"] = torch.stack([kw["z"]] * 2)  # batch 2 vs Q's batch 3
    with pytest.raises(ValueError, match=match):
        fn(**kw)


# =========================================================================== HMM
HMM_CASES = [(2, 1, None), (2, 30, None), (3, 50, 4), (5, 40, None), (6, 25, 3), (8, 50, 2)]


@pytest.mark.parametrize(("S", "T", "B"), HMM_CASES)
@pytest.mark.parametrize("sparse", [False, True])
def test_hmm_backprop_smoother_equals_forward_backward(S, T, B, sparse):
    log_obs, A, pi = _hmm(10 * S + T, S, T, B, sparse)
    gf = hmm_forward_backward(log_obs, A, pi)
    gb = hmm_smoother_by_backprop(log_obs, A, pi)
    alpha, logz = hmm_filter(log_obs, A, pi)
    lead = () if B is None else (B,)
    assert gf.shape == gb.shape == alpha.shape == (*lead, T, S)
    assert logz.shape == lead
    _close(gb, gf)
    _close(gb[..., -1, :], alpha[..., -1, :], 1e-14)
    _close(gb.sum(-1), torch.ones_like(gb.sum(-1)), 1e-12)


def _enumerate_hmm(log_obs, A, pi):
    T, S = log_obs.shape
    logp, paths = [], list(itertools.product(range(S), repeat=T))
    for path in paths:
        lp = torch.log(pi[path[0]]) + log_obs[0, path[0]]
        for t in range(1, T):
            lp = lp + torch.log(A[path[t - 1], path[t]]) + log_obs[t, path[t]]
        logp.append(lp)
    logp = torch.stack(logp)
    logz = torch.logsumexp(logp, 0)
    w = torch.exp(logp - logz)
    idx = torch.tensor(paths)
    gamma = torch.zeros(T, S, dtype=DT)
    for t in range(T):
        gamma[t].index_add_(0, idx[:, t], w)
    # filtered marginals: enumerate prefixes
    alpha = torch.zeros(T, S, dtype=DT)
    for t in range(T):
        pre = list(itertools.product(range(S), repeat=t + 1))
        lps = []
        for path in pre:
            lp = torch.log(pi[path[0]]) + log_obs[0, path[0]]
            for k in range(1, t + 1):
                lp = lp + torch.log(A[path[k - 1], path[k]]) + log_obs[k, path[k]]
            lps.append(lp)
        wp = torch.softmax(torch.stack(lps), 0)
        alpha[t].index_add_(0, torch.tensor([p[-1] for p in pre]), wp)
    return alpha, gamma, logz


@pytest.mark.parametrize(("S", "T", "sparse"), [(2, 5, False), (3, 5, False), (3, 4, True)])
def test_hmm_vs_enumeration(S, T, sparse):
    log_obs, A, pi = _hmm(S * T, S, T, sparse=sparse)
    if sparse:
        log_obs[1, 0] = -math.inf  # an impossible observation in state 0
    alpha_ref, gamma_ref, logz_ref = _enumerate_hmm(log_obs, A, pi)
    alpha, logz = hmm_filter(log_obs, A, pi)
    _close(alpha, alpha_ref, 1e-12)
    _close(logz, logz_ref, 1e-12)
    _close(hmm_forward_backward(log_obs, A, pi), gamma_ref, 1e-12)
    _close(hmm_smoother_by_backprop(log_obs, A, pi), gamma_ref, 1e-12)


def test_hmm_long_sequence_extreme_likelihoods():
    """T = 3000 with log-likelihoods of order -1e3: no underflow, matches log-space."""
    S, T = 4, 3000
    log_obs, A, pi = _hmm(1, S, T)
    log_obs = 300.0 * log_obs - 500.0
    alpha, logz = hmm_filter(log_obs, A, pi)
    # reference: plain log-space forward recursion
    la = torch.log(pi) + log_obs[0]
    ref = [la - torch.logsumexp(la, 0)]
    lz = torch.logsumexp(la, 0)
    logA = torch.log(A)
    for t in range(1, T):
        la = torch.logsumexp(ref[-1][:, None] + logA, 0) + log_obs[t]
        c = torch.logsumexp(la, 0)
        lz = lz + c
        ref.append(la - c)
    assert torch.isfinite(logz)
    _close(logz, lz, 1e-12)
    _close(alpha, torch.stack(ref).exp(), 1e-10)
    gb = hmm_smoother_by_backprop(log_obs, A, pi)
    gf = hmm_forward_backward(log_obs, A, pi)
    assert torch.isfinite(gb).all() and torch.isfinite(gf).all()
    _close(gb, gf)


def test_hmm_smoother_by_backprop_is_differentiable():
    log_obs, A, pi = _hmm(3, 3, 10)
    outs = []
    for route in (hmm_forward_backward, hmm_smoother_by_backprop):
        lo = log_obs.clone().requires_grad_()
        logits = torch.log(A).clone().requires_grad_()
        gamma = route(lo, torch.softmax(logits, -1), pi)
        obj = (gamma * torch.arange(30, dtype=DT).view(10, 3).cos()).sum()
        outs.append(torch.autograd.grad(obj, (lo, logits)))
    for a, b in zip(*outs):
        _close(b, a, 1e-10)


def _bad_hmm_cases():
    log_obs, A, pi = _hmm(0, 3, 6)
    good = {"log_obs": log_obs, "transition": A, "initial": pi}
    neg = A.clone()
    neg[0, 0], neg[0, 1] = -0.1, neg[0, 1] + neg[0, 0] + 0.1
    unnorm = A.clone()
    unnorm[1] *= 1.1
    lnan = log_obs.clone()
    lnan[1, 1] = float("nan")
    lpinf = log_obs.clone()
    lpinf[0, 0] = math.inf
    lall = log_obs.clone()
    lall[3] = -math.inf
    ainf = A.clone()
    ainf[2, 2] = math.inf
    return good, [
        ("transition", torch.full((3, 4), 0.25, dtype=DT), r"transition must have shape \(S, S\)"),
        ("log_obs", torch.randn(6, 4, dtype=DT), r"log_obs must have shape \(T, S\)"),
        ("log_obs", torch.randn(0, 3, dtype=DT), "at least one time step"),
        ("initial", torch.full((4,), 0.25, dtype=DT), r"initial must have shape \(S,\)"),
        ("transition", neg, "transition has negative entries"),
        ("transition", unnorm, "transition is not row-stochastic"),
        ("transition", ainf, "transition contains NaN or inf"),
        ("initial", pi * 2, "initial is not a distribution"),
        ("initial", torch.tensor([1.2, -0.1, -0.1], dtype=DT), "initial has negative entries"),
        ("log_obs", lnan, "log_obs contains NaN"),
        ("log_obs", lpinf, r"log_obs contains NaN or \+inf"),
        ("log_obs", lall, "every state has log-likelihood -inf"),
        ("initial", pi.float(), "same dtype"),
    ]


_GOOD_HMM, _BAD_HMM = _bad_hmm_cases()


@pytest.mark.parametrize(("name", "value", "match"), _BAD_HMM, ids=[c[2] for c in _BAD_HMM])
@pytest.mark.parametrize("fn", [hmm_filter, hmm_forward_backward, hmm_smoother_by_backprop])
def test_hmm_bad_inputs(fn, name, value, match):
    kw = dict(_GOOD_HMM)
    kw[name] = value
    with pytest.raises(ValueError, match=match):
        fn(**kw)


def test_hmm_impossible_sequence_raises():
    log_obs, A, pi = _hmm(0, 2, 4)
    A = torch.eye(2, dtype=DT)  # stays in its initial state
    pi = torch.tensor([1.0, 0.0], dtype=DT)
    log_obs[2, 0] = -math.inf  # but y_2 is impossible in state 0
    with pytest.raises(ValueError, match="probability 0"):
        hmm_filter(log_obs, A, pi)


# =========================================================================== device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    args = [a.to(dtype) for a in _lgssm(1, 4, 2, 30, B=3)]
    cuda = [a.cuda() for a in args]
    xb, Pb = kalman_smoother_by_backprop(*cuda)
    xs, Ps = rts_smoother(*cuda)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert xb.is_cuda
    _close(xb.cpu(), xs.cpu(), tol)
    _close(Pb.cpu(), Ps.cpu(), tol)
    _close(xs.cpu(), rts_smoother(*args)[0], tol)
    hargs = [a.to(dtype) for a in _hmm(2, 5, 40, B=2)]
    gb = hmm_smoother_by_backprop(*[a.cuda() for a in hargs])
    gf = hmm_forward_backward(*hargs)
    _close(gb.cpu(), gf, 1e-9 if dtype == torch.float64 else 1e-5)
