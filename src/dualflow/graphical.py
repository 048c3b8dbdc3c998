"""Exact inference in linear-Gaussian state-space models and hidden Markov models.

This module is the "graphical models" half of the duality (docs/maths.md sections 4-5, the
paper's Appendix C): in a chain where exact inference is possible, the *smoother*
(backward message passing) is the *gradient* of the filter's log-likelihood with
respect to the filter's own outputs. Each smoother is implemented twice:

* explicitly: :func:`rts_smoother` (Rauch-Tung-Striebel) and
  :func:`hmm_forward_backward` (scaled alpha-beta recursion);
* by one reverse-mode autodiff pass over the filter:
  :func:`kalman_smoother_by_backprop` and :func:`hmm_smoother_by_backprop`. The Kalman
  route differentiates the filter either op by op with ``torch.autograd``
  (``vjp="autograd"``) or, by default, as one autograd function whose backward is the VJP
  of a filter step written out in closed form (``vjp="closed_form"``, the Bryson-Frazier
  recursion; as cheap as RTS, and tested equal to the op-by-op gradient).

The two routes agree to rounding error (about 1e-12 in float64 on well-conditioned
models); ``tests/test_graphical.py`` and ``dualflow duality`` check this.

Conventions (all functions):

* Optional leading batch dimension ``B`` on every argument. Unbatched arguments are shared
  by every batch element; batched ones must all have the same ``B``. The outputs carry the
  batch dimension iff at least one input does.
* Every function is differentiable with respect to every floating-point input, works in
  float32 and float64 and on any device. All inputs must share one dtype and device.
* ``validate=True`` (the default) checks shapes, finiteness, symmetry and definiteness of
  covariances and stochasticity of HMM parameters and raises ``ValueError`` naming the
  problem. It costs a few device synchronisations; pass ``validate=False`` in hot loops
  once the inputs are known to be valid (shapes are always checked).

Linear-Gaussian state-space model (time-invariant)::

    x_0 ~ N(x0, P0)
    x_t = F x_{t-1} + w_t,   w_t ~ N(0, Q)      (t >= 1)
    z_t = H x_t + e_t,       e_t ~ N(0, R)      (t >= 0)

``z[0]`` observes the first state, whose prior is ``N(x0, P0)``: at ``t = 0`` there is no
prediction step.

Hidden Markov model::

    p(x_0 = s) = initial[s]
    p(x_t = j | x_{t-1} = i) = transition[i, j]
    log p(y_t | x_t = s) = log_obs[t, s]

``y_0`` observes ``x_0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "hmm_filter",
    "hmm_forward_backward",
    "hmm_smoother_by_backprop",
    "kalman_filter",
    "kalman_smoother_by_backprop",
    "rts_smoother",
]

_LOG_2PI = math.log(2.0 * math.pi)


# ============================================================================ helpers
def _sym(a: Tensor) -> Tensor:
    """Symmetric part ``(A + A^T) / 2`` over the last two dims."""
    return 0.5 * (a + a.mT)


def _mv(a: Tensor, x: Tensor) -> Tensor:
    """Batched matrix-vector product ``A x`` with broadcasting of the batch dims."""
    return (a @ x.unsqueeze(-1)).squeeze(-1)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensors(named: Sequence[tuple[str, Tensor]]) -> None:
    """All arguments are floating tensors of one dtype on one device."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    name0, t0 = named[0]
    for name, t in named[1:]:
        if t.dtype != t0.dtype:
            raise ValueError(
                f"all inputs must have the same dtype: {name0} is {t0.dtype} but {name} is {t.dtype}"
            )
        if t.device != t0.device:
            raise ValueError(
                f"all inputs must be on the same device: {name0} is on {t0.device} but "
                f"{name} is on {t.device}"
            )


def _common_batch(batches: Sequence[tuple[str, int | None]]) -> int | None:
    found: tuple[str, int] | None = None
    for name, b in batches:
        if b is None:
            continue
        if found is None:
            found = (name, b)
        elif b != found[1]:
            raise ValueError(
                f"inconsistent batch sizes: {found[0]} has batch size {found[1]} but {name} "
                f"has batch size {b}"
            )
    return None if found is None else found[1]


def _sym_tol(dtype: torch.dtype) -> float:
    # relative tolerance for "symmetric" and "sums to one": sqrt(machine epsilon)
    return math.sqrt(torch.finfo(dtype).eps)


def _raise_first(checks: Sequence[tuple[Tensor, str]]) -> None:
    """Evaluate boolean 0-d tensors with one synchronisation; raise the first failure."""
    if not checks:
        return
    flags = torch.stack([c.reshape(()).to(torch.bool) for c, _ in checks]).tolist()
    for ok, (_, msg) in zip(flags, checks):
        if not ok:
            raise ValueError(msg)


def _finite_check(name: str, t: Tensor) -> tuple[Tensor, str]:
    return torch.isfinite(t).all(), f"{name} contains NaN or inf values"


def _check_covariance(name: str, a: Tensor, *, semidefinite: bool = False) -> None:
    """Symmetric (to sqrt(eps) relative) and positive (semi-)definite, per batch element."""
    a = a.detach()
    _raise_first([_finite_check(name, a)])
    tiny = torch.finfo(a.dtype).tiny
    tol = _sym_tol(a.dtype)
    asym = (a - a.mT).abs().amax()
    sym_ok = asym <= tol * torch.clamp(a.abs().amax(), min=tiny)
    if semidefinite:
        ev = torch.linalg.eigvalsh(_sym(a))
        definite = ev[..., 0].amin() >= -tol * torch.clamp(ev[..., -1].amax().abs(), min=tiny)
    else:
        definite = (torch.linalg.cholesky_ex(_sym(a)).info == 0).all()
    flags = torch.stack([sym_ok, definite]).tolist()
    if not flags[0]:
        raise ValueError(
            f"{name} is not symmetric: max |{name} - {name}^T| = {float(asym):.3g} "
            f"(relative tolerance {tol:.1e}); a covariance must be symmetric"
        )
    if not flags[1]:
        kind = "semi-definite" if semidefinite else "definite"
        lam_min = float(torch.linalg.eigvalsh(_sym(a))[..., 0].amin())
        raise ValueError(
            f"{name} is not positive {kind} (smallest eigenvalue {lam_min:.3g}); a covariance matrix must be"
        )


# ============================================================================ LGSSM
class _LGSSM(NamedTuple):
    z: Tensor  # (B, T, m)
    F: Tensor  # (n, n) or (B, n, n)
    H: Tensor  # (m, n) or (B, m, n)
    Q: Tensor  # (n, n) or (B, n, n)
    R: Tensor  # (m, m) or (B, m, m)
    x0: Tensor  # (B, n)
    P0: Tensor  # (n, n) or (B, n, n)
    batched: bool


def _prepare_lgssm(
    z: Tensor, F: Tensor, H: Tensor, Q: Tensor, R: Tensor, x0: Tensor, P0: Tensor, validate: bool
) -> _LGSSM:
    named = [("z", z), ("F", F), ("H", H), ("Q", Q), ("R", R), ("x0", x0), ("P0", P0)]
    _check_tensors(named)
    if F.dim() not in (2, 3) or F.shape[-1] != F.shape[-2]:
        raise ValueError(f"F must have shape (n, n) or (B, n, n); got {_shape(F)}")
    n = F.shape[-1]
    if z.dim() not in (2, 3):
        raise ValueError(f"z must have shape (T, m) or (B, T, m); got {_shape(z)}")
    T, m = z.shape[-2], z.shape[-1]
    if T < 1:
        raise ValueError(f"z must contain at least one time step; got shape {_shape(z)}")
    if m < 1 or n < 1:
        raise ValueError(f"state and observation dimensions must be >= 1; got n={n}, m={m}")

    def batch(name: str, t: Tensor, core: tuple[int, ...], desc: str) -> int | None:
        shape = _shape(t)
        if shape == core:
            return None
        if len(shape) == len(core) + 1 and shape[1:] == core:
            return shape[0]
        raise ValueError(
            f"{name} must have shape {desc} or (B, {desc[1:]} with n={n} (from F) and m={m} "
            f"(from z); got {shape}"
        )

    bz = z.shape[0] if z.dim() == 3 else None
    B = _common_batch(
        [
            ("z", bz),
            ("F", batch("F", F, (n, n), "(n, n)")),
            ("H", batch("H", H, (m, n), "(m, n)")),
            ("Q", batch("Q", Q, (n, n), "(n, n)")),
            ("R", batch("R", R, (m, m), "(m, m)")),
            ("x0", batch("x0", x0, (n,), "(n,)")),
            ("P0", batch("P0", P0, (n, n), "(n, n)")),
        ]
    )
    batched = B is not None
    Bv = 1 if B is None else B
    if validate:
        _raise_first([_finite_check(nm, t) for nm, t in named])
        _check_covariance("Q", Q, semidefinite=True)
        _check_covariance("R", R)
        _check_covariance("P0", P0)
    zb = z.expand(Bv, T, m) if z.dim() == 2 else z
    x0b = x0.expand(Bv, n) if x0.dim() == 1 else x0
    # remove rounding-level asymmetry so both routes see exactly symmetric covariances
    return _LGSSM(zb, F, H, _sym(Q), _sym(R), x0b, _sym(P0), batched)


class _FilterPass(NamedTuple):
    means: list[Tensor]  # x_{t|t}, each (B, n)
    covs: list[Tensor]  # P_{t|t}, each (n, n) or (B, n, n)
    pred_means: list[Tensor]  # x_{t|t-1} (x0 at t = 0)
    pred_covs: list[Tensor]  # P_{t|t-1} (P0 at t = 0)
    loglik: Tensor  # (B,)
    # recorded only with ``record=True`` (for the closed-form VJP): per step A_t = I - K_t H
    # (.., n, n), the Cholesky factor L_t of S_t (.., m, m) and the whitened innovation
    # w_t = L_t^-1 e_t (B, m)
    contractions: list[Tensor] | None = None
    chols: list[Tensor] | None = None
    whitened: list[Tensor] | None = None


def _kf_forward(
    mdl: _LGSSM,
    dxs: Sequence[Tensor] | None = None,
    dPs: Sequence[Tensor] | None = None,
    record: bool = False,
) -> _FilterPass:
    """The Kalman filter recursion. ``dxs``/``dPs`` (if given) are added to the filtered
    moments of each step before the next step consumes them (the "free inputs" of the
    backprop smoother; they are zeros, so values are unchanged). ``record`` keeps the
    per-step ``I - K_t H``, innovation Cholesky factors and whitened innovations."""
    z, F, H, Q, R, x, P, _ = mdl
    B, _, m = z.shape
    n = F.shape[-1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    Ft, Ht = F.mT, H.mT
    const = m * _LOG_2PI
    means: list[Tensor] = []
    covs: list[Tensor] = []
    pmeans: list[Tensor] = []
    pcovs: list[Tensor] = []
    loglik = z.new_zeros(B)
    contractions: list[Tensor] | None = [] if record else None
    chols: list[Tensor] | None = [] if record else None
    whitened: list[Tensor] | None = [] if record else None
    for t, zt in enumerate(z.unbind(1)):
        if t > 0:
            x = _mv(F, x)
            P = _sym(F @ P @ Ft + Q)
        pmeans.append(x)
        pcovs.append(P)
        HP = H @ P  # (.., m, n)
        S = _sym(HP @ Ht + R)
        L = torch.linalg.cholesky(S)
        K = torch.cholesky_solve(HP, L).mT  # P H^T S^-1, (.., n, m)
        e = zt - _mv(H, x)
        x = x + _mv(K, e)
        A = eye - K @ H
        P = _sym(A @ P @ A.mT + K @ R @ K.mT)  # Joseph form
        w = torch.linalg.solve_triangular(L, e.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        loglik = loglik - 0.5 * (w.square().sum(-1) + logdet + const)
        if contractions is not None and chols is not None and whitened is not None:
            contractions.append(A)
            chols.append(L)
            whitened.append(w)
        if dxs is not None and dPs is not None:
            if torch.is_grad_enabled():
                x = x + dxs[t]
                P = P + dPs[t]
            else:  # x and P are fresh here; no graph to keep intact
                x = x.add_(dxs[t])
                P = P.add_(dPs[t]) if P.shape == dPs[t].shape else P + dPs[t]
        means.append(x)
        covs.append(P)
    return _FilterPass(means, covs, pmeans, pcovs, loglik, contractions, chols, whitened)


def _stack_covs(covs: Sequence[Tensor], B: int) -> Tensor:
    n = covs[0].shape[-1]
    return torch.stack([c.expand(B, n, n) for c in covs], dim=1)


def _unbatch(batched: bool, *ts: Tensor) -> tuple[Tensor, ...]:
    return ts if batched else tuple(t.squeeze(0) for t in ts)


def kalman_filter(
    z: Tensor,
    F: Tensor,
    H: Tensor,
    Q: Tensor,
    R: Tensor,
    x0: Tensor,
    P0: Tensor,
    *,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kalman filter: filtered moments and the exact log-likelihood.

    Covariance update in Joseph form, symmetrised; innovation covariances are handled by
    Cholesky factors (no explicit inverses).

    Args:
        z: observations, shape ``(T, m)`` or ``(B, T, m)``.
        F: transition matrix, ``(n, n)`` or ``(B, n, n)``.
        H: observation matrix, ``(m, n)`` or ``(B, m, n)``.
        Q: process-noise covariance, ``(n, n)`` or ``(B, n, n)``; symmetric positive
            semi-definite (singular ``Q``, e.g. deterministic dynamics, is allowed).
        R: observation-noise covariance, ``(m, m)`` or ``(B, m, m)``; symmetric positive
            definite.
        x0: prior mean of the first state (the one ``z[0]`` observes), ``(n,)`` or ``(B, n)``.
        P0: prior covariance of the first state, ``(n, n)`` or ``(B, n, n)``; symmetric
            positive definite.
        validate: check the inputs (see module docstring).

    Returns:
        ``(means, covs, loglik)``: filtered means ``x_{t|t}`` of shape ``(T, n)``, filtered
        covariances ``P_{t|t}`` of shape ``(T, n, n)`` and
        ``log p(z_0..z_{T-1}) = sum_t log N(z_t; H x_{t|t-1}, S_t)`` of shape ``()``; with a
        batch dimension ``(B, T, n)``, ``(B, T, n, n)``, ``(B,)``.

    Raises:
        ValueError: on bad shapes, dtypes, NaN/inf, non-symmetric or non-definite
            covariances.
    """
    mdl = _prepare_lgssm(z, F, H, Q, R, x0, P0, validate)
    fp = _kf_forward(mdl)
    B = mdl.z.shape[0]
    means = torch.stack(fp.means, dim=1)
    covs = _stack_covs(fp.covs, B)
    return _unbatch(mdl.batched, means, covs, fp.loglik)  # type: ignore[return-value]


def _rts_backward(mdl: _LGSSM, fp: _FilterPass) -> tuple[list[Tensor], list[Tensor]]:
    F = mdl.F
    T = len(fp.means)
    xs, Ps = fp.means[-1], fp.covs[-1]
    out_x = [xs]
    out_P = [Ps]
    for t in range(T - 2, -1, -1):
        Pp, xp, Pt = fp.pred_covs[t + 1], fp.pred_means[t + 1], fp.covs[t]
        Lp = torch.linalg.cholesky(Pp)
        Gt = torch.cholesky_solve(F @ Pt, Lp)  # P_{t+1|t}^-1 F P_{t|t} = G_t^T
        G = Gt.mT
        xs = fp.means[t] + _mv(G, xs - xp)
        Ps = _sym(Pt + G @ (Ps - Pp) @ Gt)
        out_x.append(xs)
        out_P.append(Ps)
    return out_x[::-1], out_P[::-1]


def rts_smoother(
    z: Tensor,
    F: Tensor,
    H: Tensor,
    Q: Tensor,
    R: Tensor,
    x0: Tensor,
    P0: Tensor,
    *,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Rauch-Tung-Striebel smoother (explicit backward pass after :func:`kalman_filter`).

    ``G_t = P_{t|t} F^T P_{t+1|t}^{-1}`` (the gain uses the *predicted* covariance; the
    paper's Eq. 6 prints ``P_{t+1|L}``, a slip, see docs/maths.md section 7.3),
    ``x_{t|T} = x_{t|t} + G_t (x_{t+1|T} - x_{t+1|t})``,
    ``P_{t|T} = P_{t|t} + G_t (P_{t+1|T} - P_{t+1|t}) G_t^T``.
    Requires ``P_{t+1|t}`` to be positive definite (true when ``Q`` is, or ``F`` is
    invertible).

    Args:
        z, F, H, Q, R, x0, P0, validate: as in :func:`kalman_filter`.

    Returns:
        ``(means, covs)``: smoothed means ``x_{t|T}`` ``(T, n)`` and covariances ``P_{t|T}``
        ``(T, n, n)``; ``(B, T, n)``, ``(B, T, n, n)`` with a batch dimension.

    Raises:
        ValueError: as :func:`kalman_filter`.
    """
    mdl = _prepare_lgssm(z, F, H, Q, R, x0, P0, validate)
    fp = _kf_forward(mdl)
    xs, Ps = _rts_backward(mdl, fp)
    B = mdl.z.shape[0]
    return _unbatch(mdl.batched, torch.stack(xs, dim=1), _stack_covs(Ps, B))  # type: ignore[return-value]


def _filter_adjoint(mdl: _LGSSM, fp: _FilterPass) -> tuple[Tensor, Tensor]:
    """Reverse sweep: the gradient of ``loglik.sum()`` w.r.t. the filtered moments.

    The VJP of one filter step, written out. Step ``t`` maps ``(x_{t-1|t-1}, P_{t-1|t-1})``
    through the prediction ``(F x, F P F^T + Q)`` and the update to ``(x_{t|t}, P_{t|t})``
    and ``ll_t``. With ``A_t = I - K_t H``, ``V_t = L_t^-1 H`` (``S_t = L_t L_t^T``),
    ``r_t = H^T S_t^-1 e_t = V_t^T w_t`` and ``M_t = H^T S_t^-1 H = V_t^T V_t``, the
    differentials of the update are ``dx_{t|t} = A_t dx_p + A_t dP_p r_t``,
    ``dP_{t|t} = A_t dP_p A_t^T`` (the Joseph form is stationary in ``K``) and
    ``d ll_t = r_t^T dx_p + tr((r_t r_t^T - M_t) dP_p) / 2``. Pulling the adjoints
    ``(g_t, G_t)`` of ``(x_{t|t}, P_{t|t})`` back through them and through the prediction
    gives, with ``Phi_t = A_t F`` and ``Lam_t = G_t - g_t g_t^T / 2``::

        g_{t-1}   = Phi_t^T g_t + F^T r_t
        Lam_{t-1} = Phi_t^T Lam_t Phi_t - F^T M_t F / 2

    from ``g_{T-1} = 0``, ``Lam_{T-1} = 0`` (the last filtered moments feed nothing). Two
    matrix products per step, against RTS's Cholesky solve and three products: this is the
    Bryson-Frazier recursion, which is what reverse mode of the Kalman filter is.

    Returns:
        ``(g, Lam)``: ``g`` ``(B, T, n)``; ``Lam`` ``(T, n, n)`` or ``(B, T, n, n)``
        (unbatched when every covariance input is: ``Lam`` does not depend on ``z``).
    """
    assert fp.contractions is not None and fp.chols is not None and fp.whitened is not None
    F, H = mdl.F, mdl.H
    T = len(fp.means)
    B, n = fp.means[0].shape
    g = fp.means[0].new_zeros(B, n)
    lam = torch.zeros_like(fp.covs[-1])
    gs, lams = [g], [lam]  # from t = T-1 down to 0
    chunk = _chunk_len(fp.covs[-1], B)
    hi = T
    while hi > 1:
        # the per-step factors of steps lo..hi-1 have no recursion in them: a few batched
        # products per chunk of steps (chunks sized to stay in cache; few ops per step)
        lo = max(1, hi - chunk)
        Ls = torch.stack(fp.chols[lo:hi], dim=-3)  # (.., C, m, m)
        V = torch.linalg.solve_triangular(Ls, H.unsqueeze(-3).expand(*Ls.shape[:-1], n), upper=False)
        r = (torch.stack(fp.whitened[lo:hi], dim=1).unsqueeze(-2) @ V).squeeze(-2)  # H^T S^-1 e, (B, C, n)
        rho = r @ F  # (F^T r_t)^T
        W = _right_mul(V, F)  # L^-1 H F, (.., C, m, n)
        half_n = (W.mT @ W).mul_(0.5)  # F^T M F / 2, exactly symmetric
        phi = _right_mul(torch.stack(fp.contractions[lo:hi], dim=-3), F)  # Phi = A F
        rho_t, n_t, p_t = rho.unbind(-2), half_n.unbind(-3), phi.unbind(-3)
        for k in range(hi - lo - 1, -1, -1):
            pt = p_t[k]
            g = (g.unsqueeze(-2) @ pt).squeeze(-2) + rho_t[k]
            lam = pt.mT @ lam @ pt - n_t[k]
            gs.append(g)
            lams.append(lam)
        hi = lo
    g_all = torch.stack(gs[::-1], dim=1)
    lam_all = torch.stack(lams[::-1], dim=-3)
    return g_all, lam_all


def _chunk_len(cov: Tensor, B: int) -> int:
    """Time steps per chunk of batched per-step work: about 1 MiB per (B, n, n) array."""
    n = cov.shape[-1]
    return max(1, (1 << 20) // (B * n * n * cov.element_size()))


def _right_mul(x: Tensor, f: Tensor) -> Tensor:
    """``x @ f`` for ``x`` ``(.., T, k, n)`` and ``f`` ``(n, n)`` or ``(B, n, n)``, as one
    large product per batch element (broadcasting ``f`` over ``T`` would copy it T times)."""
    n = f.shape[-1]
    if f.dim() == 2:
        return (x.reshape(-1, n) @ f).reshape(x.shape)
    if x.dim() == 4 and x.shape[0] == f.shape[0]:
        return (x.reshape(x.shape[0], -1, n) @ f).reshape(x.shape)
    return x @ f.unsqueeze(-3)


class _FilterLogLik(torch.autograd.Function):
    """``loglik(dx, dP)``: the filter's log-likelihood when ``(dx_t, dP_t)`` are added to its
    filtered moments, with the closed-form VJP of :func:`_filter_adjoint` as its backward.

    Outputs ``(loglik (B,), x_{t|t} (B, T, n), P_{t|t} (B, T, n, n))``; only ``loglik`` is
    differentiable, and only w.r.t. ``dx`` and ``dP`` (the model is a constant here: use the
    autograd route to differentiate through the smoother).
    """

    @staticmethod
    def forward(ctx, dx: Tensor, dP: Tensor, mdl: _LGSSM) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        fp = _kf_forward(mdl, dx.unbind(1), dP.unbind(1), record=True)
        ctx.mdl, ctx.fp = mdl, fp
        x = torch.stack(fp.means, dim=1)
        P = _stack_covs(fp.covs, x.shape[0])
        ctx.mark_non_differentiable(x, P)
        return fp.loglik, x, P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ll: Tensor, _gx: Tensor, _gP: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        g, lam = _filter_adjoint(ctx.mdl, ctx.fp)
        B, T, n = g.shape
        # G_t = Lam_t + g_t g_t^T / 2, in place (one pass over the largest array)
        G = lam if lam.dim() == 4 else lam.expand(B, T, n, n).contiguous()
        G.view(B * T, n, n).baddbmm_(g.reshape(B * T, n, 1), g.reshape(B * T, 1, n), alpha=0.5)
        if not bool((g_ll == 1.0).all()):  # loglik.sum() (the smoother) needs no scaling
            c = g_ll.reshape(B, 1, 1)
            g, G = g * c, G.mul_(c.unsqueeze(-1))
        return g, G, None


def _any_requires_grad(ts: Sequence[Tensor]) -> bool:
    return any(t.requires_grad for t in ts)


def kalman_smoother_by_backprop(
    z: Tensor,
    F: Tensor,
    H: Tensor,
    Q: Tensor,
    R: Tensor,
    x0: Tensor,
    P0: Tensor,
    *,
    create_graph: bool | None = None,
    vjp: str | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Kalman smoother computed as the gradient of the filter's log-likelihood.

    Zero perturbations ``dx_t`` ``(n,)`` and ``dP_t`` ``(n, n)`` are added to the filtered
    moments ``(x_{t|t}, P_{t|t})`` before the rest of the recursion consumes them. One
    reverse-mode pass gives ``g_t = d loglik / d dx_t`` and ``G_t = d loglik / d dP_t``;
    then (docs/maths.md section 4, the paper's Eq. 7 / Theorem 3)::

        G_t <- (G_t + G_t^T) / 2       # autodiff treats the entries of P as independent
        d_t = P_{t|t} g_t
        x_{t|T} = x_{t|t} + d_t
        P_{t|T} = P_{t|t} + 2 P_{t|t} G_t P_{t|t} - d_t d_t^T

    This equals the Rauch-Tung-Striebel smoother exactly (the model after step ``t`` is
    linear-Gaussian); the last step has zero gradient, so ``x_{T-1|T-1}`` is returned there.

    Args:
        z, F, H, Q, R, x0, P0, validate: as in :func:`kalman_filter`.
        create_graph: build a graph of the gradient pass so the result can be
            differentiated further (e.g. inside a learning objective). Default: ``True``
            iff grad mode is enabled and some input requires grad. With ``False`` the
            outputs are detached.
        vjp: how reverse mode differentiates one filter step. ``"autograd"``: torch
            records every operation of the filter and replays their derivatives (any order
            of derivatives; needed for ``create_graph=True``). ``"closed_form"``: the filter
            is one :class:`torch.autograd.Function` whose backward is the step's VJP written
            out (:func:`_filter_adjoint`, the Bryson-Frazier recursion); the same gradient
            to rounding (tested against ``"autograd"`` and by ``gradcheck``), 3-6x cheaper,
            first order only. Default: ``"autograd"`` if ``create_graph`` else
            ``"closed_form"``.

    Returns:
        ``(means, covs)`` as :func:`rts_smoother`.

    Raises:
        ValueError: as :func:`kalman_filter`.
    """
    inputs = (z, F, H, Q, R, x0, P0)
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and _any_requires_grad(inputs)
    if vjp is None:
        vjp = "autograd" if create_graph else "closed_form"
    if vjp not in ("closed_form", "autograd"):
        raise ValueError(f"vjp must be 'closed_form' or 'autograd', got {vjp!r}")
    if vjp == "closed_form" and create_graph:
        raise ValueError(
            "vjp='closed_form' gives no graph through the model (create_graph=True needs vjp='autograd')"
        )
    mdl = _prepare_lgssm(z, F, H, Q, R, x0, P0, validate)
    B, T, _ = mdl.z.shape
    n = mdl.F.shape[-1]
    kw = {"dtype": mdl.z.dtype, "device": mdl.z.device}
    with torch.enable_grad():
        dx = torch.zeros(B, T, n, **kw, requires_grad=True)
        dP = torch.zeros(B, T, n, n, **kw, requires_grad=True)
        if vjp == "closed_form":
            with torch.no_grad():  # the model is a constant of this route
                mdl = _LGSSM(*(t.detach() for t in mdl[:-1]), mdl.batched)
            loglik, x, P = _FilterLogLik.apply(dx, dP, mdl)
        else:
            fp = _kf_forward(mdl, dx.unbind(1), dP.unbind(1))
            loglik = fp.loglik
            x = torch.stack(fp.means, dim=1)
            P = _stack_covs(fp.covs, B)
        if T > 1:
            g, G = torch.autograd.grad(loglik.sum(), (dx, dP), create_graph=create_graph, allow_unused=True)
        else:
            g = G = None
        g = torch.zeros_like(dx) if g is None else g
        G = torch.zeros_like(dP) if G is None else G
        d = _mv(P, g)
        means = x + d
        # P + 2 P G P - d d^T in chunks of time steps (cache-sized; the products are the
        # cost for large n)
        chunk = _chunk_len(P, B)
        covs = torch.cat(
            [
                _sym(Pc + 2.0 * Pc @ _sym(Gc) @ Pc - dc.unsqueeze(-1) * dc.unsqueeze(-2))
                for Pc, Gc, dc in zip(P.split(chunk, 1), G.split(chunk, 1), d.split(chunk, 1))
            ],
            dim=1,
        )
    if not create_graph:
        means, covs = means.detach(), covs.detach()
    return _unbatch(mdl.batched, means, covs)  # type: ignore[return-value]


# ============================================================================ HMM
class _HMM(NamedTuple):
    log_obs: Tensor  # (B, T, S)
    A: Tensor  # (S, S) or (B, S, S)
    pi: Tensor  # (S,) or (B, S)
    batched: bool


def _prepare_hmm(log_obs: Tensor, transition: Tensor, initial: Tensor, validate: bool) -> _HMM:
    named = [("log_obs", log_obs), ("transition", transition), ("initial", initial)]
    _check_tensors(named)
    if transition.dim() not in (2, 3) or transition.shape[-1] != transition.shape[-2]:
        raise ValueError(f"transition must have shape (S, S) or (B, S, S); got {_shape(transition)}")
    S = transition.shape[-1]
    if log_obs.dim() not in (2, 3) or log_obs.shape[-1] != S:
        raise ValueError(
            f"log_obs must have shape (T, S) or (B, T, S) with S={S} (from transition); got {_shape(log_obs)}"
        )
    T = log_obs.shape[-2]
    if T < 1:
        raise ValueError(f"log_obs must contain at least one time step; got {_shape(log_obs)}")
    if S < 1:
        raise ValueError("the number of states S must be >= 1")
    if initial.dim() not in (1, 2) or initial.shape[-1] != S:
        raise ValueError(
            f"initial must have shape (S,) or (B, S) with S={S} (from transition); got {_shape(initial)}"
        )
    B = _common_batch(
        [
            ("log_obs", log_obs.shape[0] if log_obs.dim() == 3 else None),
            ("transition", transition.shape[0] if transition.dim() == 3 else None),
            ("initial", initial.shape[0] if initial.dim() == 2 else None),
        ]
    )
    if validate:
        lo, A, pi = log_obs.detach(), transition.detach(), initial.detach()
        tol = _sym_tol(A.dtype) * max(S, 1)
        _raise_first(
            [
                (
                    ~(torch.isnan(lo) | (lo == math.inf)).any(),
                    "log_obs contains NaN or +inf values (log-likelihoods must be < +inf; "
                    "-inf marks an impossible observation)",
                ),
                (
                    (lo > -math.inf).any(-1).all(),
                    "log_obs has a time step at which every state has log-likelihood -inf "
                    "(the observation is impossible under every state)",
                ),
                _finite_check("transition", A),
                _finite_check("initial", pi),
                ((A >= 0).all(), "transition has negative entries (must be probabilities)"),
                (
                    ((A.sum(-1) - 1).abs() <= tol).all(),
                    f"transition is not row-stochastic: each row transition[i, :] must sum to "
                    f"1 (tolerance {tol:.1e})",
                ),
                ((pi >= 0).all(), "initial has negative entries (must be a distribution)"),
                (
                    ((pi.sum(-1) - 1).abs() <= tol).all(),
                    f"initial is not a distribution: it must sum to 1 (tolerance {tol:.1e})",
                ),
            ]
        )
    Bv = 1 if B is None else B
    lob = log_obs.expand(Bv, T, S) if log_obs.dim() == 2 else log_obs
    return _HMM(lob, transition, initial, B is not None)


def _scaled_likelihood(prior: Tensor, ll: Tensor) -> tuple[Tensor, Tensor]:
    """``u = prior * exp(ll - c)`` with a per-row shift ``c`` chosen so that ``max u ~ 1``.

    The shift is a constant of differentiation (any ``c`` gives the same ``u * exp(c)``),
    so it is computed without gradient. It is kept within ``log(finfo.max) / 2`` of
    ``max(ll)`` so that ``exp(ll - c)`` cannot overflow where ``prior`` is 0.
    """
    with torch.no_grad():
        lim = 0.5 * math.log(torch.finfo(ll.dtype).max)
        ll_max = ll.amax(-1, keepdim=True)
        c = (ll + torch.log(prior)).amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, ll_max)
        c = torch.maximum(c, ll_max - lim)
    return prior * torch.exp(ll - c), c


def _hmm_forward(
    mdl: _HMM, deltas: Sequence[Tensor] | None = None
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Scaled forward recursion. Returns filtered ``alpha_t`` (each ``(B, S)``), the
    scaled observation factors used (for reuse) and ``log p(y_0..y_{T-1})`` ``(B,)``.

    ``deltas`` (zeros) re-parameterise each filtered distribution as
    ``softmax(log alpha_t + delta_t)`` (computed as ``alpha e^delta / sum(alpha e^delta)``,
    which is the same function but has no ``log 0``)."""
    log_obs, A, prior, _ = mdl
    alphas: list[Tensor] = []
    preds: list[Tensor] = []
    logz = log_obs.new_zeros(log_obs.shape[0])
    alpha = prior
    for t, ll in enumerate(log_obs.unbind(1)):
        if t > 0:
            prior = (alpha.unsqueeze(-2) @ A).squeeze(-2)  # sum_i alpha(i) A[i, j]
        preds.append(prior)
        u, c = _scaled_likelihood(prior, ll)
        norm = u.sum(-1, keepdim=True)
        alpha = u / norm
        logz = logz + (torch.log(norm) + c).squeeze(-1)
        if deltas is not None:
            a = alpha * torch.exp(deltas[t])
            alpha = a / a.sum(-1, keepdim=True)
        alphas.append(alpha)
    return alphas, preds, logz


def _check_logz(logz: Tensor) -> None:
    _raise_first(
        [
            (
                torch.isfinite(logz.detach()).all(),
                "the observation sequence has probability 0 under the model "
                "(log p(y) = -inf): some y_t is impossible given y_0..y_{t-1}",
            )
        ]
    )


def hmm_filter(
    log_obs: Tensor, transition: Tensor, initial: Tensor, *, validate: bool = True
) -> tuple[Tensor, Tensor]:
    """HMM forward filter with per-step rescaling.

    Log-likelihoods are exponentiated after subtracting a per-step shift and the
    normalisers are accumulated in log space, so long sequences and very small
    likelihoods neither underflow nor overflow; zero transition probabilities are fine
    (and differentiable, as the transition enters linearly).

    Args:
        log_obs: ``log p(y_t | x_t = s)``, shape ``(T, S)`` or ``(B, T, S)``; may contain
            ``-inf`` (impossible observation in that state), not NaN or ``+inf``.
        transition: ``transition[i, j] = p(x_t = j | x_{t-1} = i)``, ``(S, S)`` or
            ``(B, S, S)``; rows must sum to 1.
        initial: ``p(x_0 = s)``, ``(S,)`` or ``(B, S)`` (``y_0`` observes ``x_0``).
        validate: check the inputs (see module docstring), and that ``log p(y) > -inf``.

    Returns:
        ``(alpha, loglik)``: filtered marginals ``alpha[t, s] = p(x_t = s | y_0..y_t)``
        ``(T, S)`` and ``log p(y_0..y_{T-1})`` ``()``; ``(B, T, S)`` and ``(B,)`` batched.

    Raises:
        ValueError: on bad shapes, dtypes, NaN/inf, a non-stochastic transition matrix,
            an initial vector that is not a distribution, or an impossible sequence.
    """
    mdl = _prepare_hmm(log_obs, transition, initial, validate)
    alphas, _, logz = _hmm_forward(mdl)
    if validate:
        _check_logz(logz)
    return _unbatch(mdl.batched, torch.stack(alphas, dim=1), logz)  # type: ignore[return-value]


def hmm_forward_backward(
    log_obs: Tensor, transition: Tensor, initial: Tensor, *, validate: bool = True
) -> Tensor:
    """Explicit forward-backward smoother (scaled alpha-beta recursion).

    ``beta_t(i) ∝ sum_j transition[i, j] p(y_{t+1} | j) beta_{t+1}(j)`` (rescaled each
    step), ``gamma_t ∝ alpha_t * beta_t``.

    Args:
        log_obs, transition, initial, validate: as in :func:`hmm_filter`.

    Returns:
        Smoothed marginals ``gamma[t, s] = p(x_t = s | y_0..y_{T-1})``, ``(T, S)`` or
        ``(B, T, S)``.

    Raises:
        ValueError: as :func:`hmm_filter`.
    """
    mdl = _prepare_hmm(log_obs, transition, initial, validate)
    alphas, _, logz = _hmm_forward(mdl)
    if validate:
        _check_logz(logz)
    A = mdl.A
    lls = mdl.log_obs.unbind(1)
    T = len(alphas)
    beta = torch.ones_like(alphas[-1])
    gammas = [alphas[-1]]
    for t in range(T - 2, -1, -1):
        v, _ = _scaled_likelihood(beta, lls[t + 1])
        beta = _mv(A, v)  # sum_j A[i, j] v_j
        beta = beta / beta.sum(-1, keepdim=True)
        g = alphas[t] * beta
        gammas.append(g / g.sum(-1, keepdim=True))
    gamma = torch.stack(gammas[::-1], dim=1)
    return gamma if mdl.batched else gamma.squeeze(0)


def hmm_smoother_by_backprop(
    log_obs: Tensor,
    transition: Tensor,
    initial: Tensor,
    *,
    create_graph: bool | None = None,
    validate: bool = True,
) -> Tensor:
    """HMM smoother computed as the gradient of ``log p(y)`` (Theorem 4, docs/maths.md section 5.2).

    The filtered distribution at each ``t`` is re-parameterised as
    ``softmax(log alpha_t + delta_t)`` and consumed by the rest of the recursion; at
    ``delta = 0``, ``d log p(y_0..y_{T-1}) / d delta_t = gamma_t - alpha_t`` exactly, so
    ``gamma_t = alpha_t + grad``.

    Args:
        log_obs, transition, initial, validate: as in :func:`hmm_filter`.
        create_graph: build a graph of the gradient pass so the result can be
            differentiated further. Default: ``True`` iff grad mode is enabled and some
            input requires grad. With ``False`` the output is detached.

    Returns:
        Smoothed marginals, ``(T, S)`` or ``(B, T, S)``.

    Raises:
        ValueError: as :func:`hmm_filter`.
    """
    if create_graph is None:
        create_graph = torch.is_grad_enabled() and _any_requires_grad((log_obs, transition, initial))
    mdl = _prepare_hmm(log_obs, transition, initial, validate)
    B, T, S = mdl.log_obs.shape
    with torch.enable_grad():
        delta = torch.zeros(B, T, S, dtype=mdl.log_obs.dtype, device=mdl.log_obs.device, requires_grad=True)
        alphas, _, logz = _hmm_forward(mdl, delta.unbind(1))
        if validate:
            _check_logz(logz)
        alpha = torch.stack(alphas, dim=1)
        grad = None
        if T > 1:  # with T = 1, log p(y) does not depend on delta (gamma = alpha)
            (grad,) = torch.autograd.grad(logz.sum(), (delta,), create_graph=create_graph, allow_unused=True)
        gamma = alpha if grad is None else alpha + grad
    if not create_graph:
        gamma = gamma.detach()
    return gamma if mdl.batched else gamma.squeeze(0)
