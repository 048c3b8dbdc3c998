"""Losses on propagated moments (docs/maths.md section 2; the paper's Eqs. 2, 4, 6).

The paper's loss is the marginal negative log-likelihood ``J = -log p(y | x)`` with the
network's randomness integrated out, evaluated on the output moments ``(m_L, v_L)``.
All losses return the **mean over the batch** of ``J`` (summed over output dimensions).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.gaussian import Gaussian, as_gaussian

__all__ = [
    "GaussianLikelihood",
    "HeteroscedasticLikelihood",
    "categorical_nll",
    "elbo_noise_var",
    "gaussian_log_density",
    "gaussian_nll",
    "heteroscedastic_moments",
    "heteroscedastic_nll",
    "predictive_mean_var",
    "predictive_probs",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def _check_pred(pred: Tensor | Gaussian, name: str = "prediction") -> Gaussian:
    g = as_gaussian(pred)
    if g.mean.shape != g.var.shape:
        raise ValueError(
            f"{name}: mean and variance shapes differ: {tuple(g.mean.shape)} vs {tuple(g.var.shape)}"
        )
    ok = torch.stack([torch.isfinite(g.mean).all(), torch.isfinite(g.var).all(), (g.var >= 0).all()]).tolist()
    if not ok[0] or not ok[1]:
        raise ValueError(f"{name} contains NaN or inf values (diverged training? lower the learning rate)")
    if not ok[2]:
        raise ValueError(f"{name} has negative variances")
    return g


def _noise(noise_var: float | Tensor, like: Tensor) -> Tensor:
    nv = torch.as_tensor(noise_var, dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(nv).all()) or not bool((nv > 0).all()):
        raise ValueError(f"noise_var must be positive and finite, got {noise_var}")
    return nv


def _match_target(g: Gaussian, target: Tensor) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.shape != g.mean.shape:
        # the one silent-broadcast trap worth accepting explicitly: (B, 1) vs (B,)
        if g.mean.dim() == 2 and g.mean.shape[1] == 1 and target.shape == g.mean.shape[:1]:
            target = target.unsqueeze(1)
        else:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match prediction shape {tuple(g.mean.shape)}"
            )
    _finite(target, "target")
    return target.to(g.mean.dtype)


def _sum_event(x: Tensor) -> Tensor:
    return x.sum(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def gaussian_nll(
    pred: Tensor | Gaussian,
    target: Tensor,
    noise_var: float | Tensor,
    objective: Literal["predictive", "elbo"] = "predictive",
) -> Tensor:
    """Gaussian regression loss, mean over the batch (summed over output dims).

    ``objective="predictive"`` (the paper's marginal / Kalman innovation form):
    ``J = 0.5 log(2 pi (v + tau^2)) + (y - m)^2 / (2 (v + tau^2))``.
    ``objective="elbo"`` (expected log-likelihood under q):
    ``E_q J = 0.5 log(2 pi tau^2) + ((y - m)^2 + v) / (2 tau^2)``.

    Args:
        pred: output moments, mean/var ``(B,)`` or ``(B, D)``; a tensor means variance 0.
        target: same shape as the mean (``(B,)`` is accepted for ``(B, 1)`` predictions).
        noise_var: observation noise variance ``tau^2 > 0`` (float or tensor broadcastable to the output).
        objective: ``"predictive"`` or ``"elbo"``.

    Returns:
        Scalar tensor.
    """
    g = _check_pred(pred)
    y = _match_target(g, target)
    nv = _noise(noise_var, g.mean)
    r2 = (y - g.mean) ** 2
    if objective == "predictive":
        s = g.var + nv
        j = 0.5 * (_LOG_2PI + torch.log(s) + r2 / s)
    elif objective == "elbo":
        j = 0.5 * (_LOG_2PI + torch.log(nv) + (r2 + g.var) / nv)
    else:
        raise ValueError(f"objective must be 'predictive' or 'elbo', got {objective!r}")
    return _sum_event(j).mean()


def gaussian_log_density(
    pred: Tensor | Gaussian, target: Tensor, noise_var: float | Tensor = 0.0, y_scale: float = 1.0
) -> Tensor:
    """Per-example predictive log density ``log N(y; m, v + tau^2)``, shape ``(B,)``.

    With targets standardised as ``(y - mu) / y_scale``, pass the *standardised* prediction
    and target and ``y_scale`` to get the density of the original ``y``: the Jacobian adds
    ``-log(y_scale)`` per output dimension.
    """
    g = _check_pred(pred)
    y = _match_target(g, target)
    s = g.var + torch.as_tensor(noise_var, dtype=g.mean.dtype, device=g.mean.device)
    if not bool((s > 0).all()):
        raise ValueError("predictive variance v + noise_var must be > 0")
    lp = -0.5 * (_LOG_2PI + torch.log(s) + (y - g.mean) ** 2 / s) - math.log(y_scale)
    return _sum_event(lp)


def predictive_mean_var(pred: Tensor | Gaussian, noise_var: float | Tensor = 0.0) -> tuple[Tensor, Tensor]:
    """Mean and variance of the predictive distribution ``N(m, v + tau^2)`` of ``y``.

    The returned variance is never negative: ``pred`` is checked (same shapes, finite,
    ``v >= 0``) and ``noise_var`` must be finite and ``>= 0``, so the sum of the two is ``>= 0``.
    A variance computed by cancellation, ``E[x^2] - E[x]^2``, can come out below zero in floating
    point; such an input is refused with a ``ValueError`` instead of being passed on (compute it
    centred, ``E[(x - E x)^2]``, or clamp it knowingly). One device synchronisation.

    Args:
        pred: output moments (a tensor means variance 0).
        noise_var: observation noise variance ``tau^2 >= 0`` (float or broadcastable tensor).

    Returns:
        ``(mean, var)``, ``var`` of the broadcast shape of ``v`` and ``noise_var``.
    """
    g = _check_pred(pred)
    nv = torch.as_tensor(noise_var, dtype=g.mean.dtype, device=g.mean.device)
    if not bool((torch.isfinite(nv) & (nv >= 0)).all()):
        raise ValueError(f"noise_var must be finite and >= 0, got {noise_var}")
    return g.mean, g.var + nv


def _check_labels(target: Tensor, num_classes: int, batch: int) -> None:
    if not isinstance(target, Tensor) or target.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
    ):
        raise TypeError("target must be an integer tensor of class indices")
    if target.shape != (batch,):
        raise ValueError(f"target shape {tuple(target.shape)} does not match batch size {batch}")
    if batch and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target labels must lie in [0, {num_classes}), got [{int(target.min())}, {int(target.max())}]"
        )


def _log_probs(
    logits: Tensor | Gaussian, method: str, samples: int, generator: torch.Generator | None
) -> Tensor:
    g = _check_pred(logits, "logits")
    if g.mean.dim() != 2:
        raise ValueError(f"logits must have shape (B, C), got {tuple(g.mean.shape)}")
    if method == "probit":
        # E softmax(z) ~ softmax(m / sqrt(1 + pi/8 v)) (mean-field / probit approximation)
        return F.log_softmax(g.mean * torch.rsqrt(1.0 + (math.pi / 8.0) * g.var), dim=-1)
    if method == "sample":
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        eps = torch.randn(
            (samples, *g.mean.shape), dtype=g.mean.dtype, device=g.mean.device, generator=generator
        )
        z = g.mean + g.var.sqrt() * eps
        return torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - math.log(samples)
    raise ValueError(f"method must be 'probit' or 'sample', got {method!r}")


def categorical_nll(
    logits: Tensor | Gaussian,
    target: Tensor,
    method: Literal["probit", "sample"] = "probit",
    samples: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Classification loss ``-log E softmax(z)_y`` for logits ``z ~ N(m, v)``, mean over the batch.

    Args:
        logits: ``(B, C)`` moments (a tensor means variance 0: ordinary cross-entropy).
        target: ``(B,)`` integer labels.
        method: ``"probit"`` (sampling-free, docs/maths.md section 2.2) or ``"sample"``: ``S`` samples of
            the logits only, log-mean-exp (a check of the approximation; biased upwards for small S).
        samples: ``S`` for ``"sample"``.
    """
    lp = _log_probs(logits, method, samples, generator)
    _check_labels(target, lp.shape[1], lp.shape[0])
    return F.nll_loss(lp, target.long())


def predictive_probs(
    logits: Tensor | Gaussian,
    method: Literal["probit", "sample"] = "probit",
    samples: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class probabilities ``E softmax(z)``, shape ``(B, C)``."""
    return _log_probs(logits, method, samples, generator).exp()


def elbo_noise_var(pred: Tensor | Gaussian, target: Tensor) -> Tensor:
    """The noise variance that maximises the expected log-likelihood (the ELBO's data term).

    ``E_q J = 0.5 log(2 pi tau^2) + ((y - m)^2 + v) / (2 tau^2)`` is minimised over ``tau^2`` at
    ``tau^2* = mean((y - m)^2 + v)`` over the batch (and over output dims: one shared
    ``tau^2``). Detached: at the optimum ``d E_q J / d tau^2 = 0``, so the gradient of
    ``E_q J(tau^2*)`` in the network's parameters is the same with ``tau^2*`` held constant
    (envelope theorem). Returns a 0-dim tensor.
    """
    g = _check_pred(pred)
    y = _match_target(g, target)
    return ((y - g.mean).square() + g.var).detach().mean()


class GaussianLikelihood(torch.nn.Module):
    """Homoscedastic Gaussian observation model with fixed, learned or empirical-Bayes noise variance.

    ``forward(pred, target)`` returns :func:`gaussian_nll`. The learned noise variance is
    ``softplus(raw) + min_noise_var``.

    Empirical Bayes (``empirical=True``, ``objective="elbo"`` only, where a closed form
    exists): in training mode the loss uses the batch's optimal noise variance
    :func:`elbo_noise_var` ``= mean((y - m)^2 + v)`` (for full batches: the exact maximiser of
    the ELBO in ``tau^2``; for mini-batches a per-batch estimate), and ``noise_var`` (used for
    prediction) is an exponential average of those estimates (weight ``ema`` of the newest;
    the first batch sets it).

    Args:
        noise_var: initial (or fixed) ``tau^2 > 0``.
        learn: learn ``tau^2`` by gradient (ignored with ``empirical``).
        objective: ``"predictive"`` or ``"elbo"``.
        min_noise_var: floor of the learned noise variance.
        empirical: fit ``tau^2`` in closed form (see above).
        ema: weight of the newest batch estimate in ``noise_var`` (``empirical`` only).
    """

    def __init__(
        self,
        noise_var: float = 1.0,
        learn: bool = True,
        objective: Literal["predictive", "elbo"] = "predictive",
        min_noise_var: float = 1e-6,
        *,
        empirical: bool = False,
        ema: float = 0.1,
    ) -> None:
        super().__init__()
        if not noise_var > 0:
            raise ValueError(f"noise_var must be > 0, got {noise_var}")
        if objective not in ("predictive", "elbo"):
            raise ValueError(f"objective must be 'predictive' or 'elbo', got {objective!r}")
        if empirical and objective != "elbo":
            raise ValueError(
                "empirical (closed-form) noise needs objective='elbo': the predictive objective's "
                "optimal noise variance has no closed form (learn it by gradient instead)"
            )
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema must lie in (0, 1], got {ema}")
        self.objective = objective
        self.min_noise_var = float(min_noise_var)
        self.empirical = bool(empirical)
        self.ema = float(ema)
        x = max(noise_var - min_noise_var, 1e-8)
        raw = torch.tensor(x + math.log(-math.expm1(-x)))  # inverse softplus
        if learn and not empirical:
            self.raw_noise = torch.nn.Parameter(raw)
        else:
            self.register_buffer("raw_noise", raw)
        if empirical:
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def noise_var(self) -> Tensor:
        return F.softplus(self.raw_noise) + self.min_noise_var

    def ggn_surrogate(self, pred: Tensor | Gaussian) -> Tensor:
        """``0.5 mean_i sum_d v_id / s_id`` with ``s = v + tau^2`` held constant: its gradient in
        the weight variances is half the Gauss-Newton curvature (Fisher ``1/s`` of the mean;
        see :func:`dualflow.optim.ggn_surrogate`)."""
        var = as_gaussian(pred).var
        dims = tuple(range(1, var.dim()))
        return (var / (var + self.noise_var.detach()).detach()).sum(dim=dims).mean() * 0.5

    def forward(self, pred: Tensor | Gaussian, target: Tensor) -> Tensor:
        if self.empirical and self.training:
            nv = elbo_noise_var(pred, target).clamp_min(self.min_noise_var)
            with torch.no_grad():  # the running estimate used for prediction
                old = self.noise_var
                new = nv if not bool(self.fitted) else (1.0 - self.ema) * old + self.ema * nv
                x = (new - self.min_noise_var).clamp_min(1e-8)
                self.raw_noise.copy_(x + torch.log(-torch.expm1(-x)))
                self.fitted.fill_(True)
            return gaussian_nll(pred, target, nv, self.objective)
        return gaussian_nll(pred, target, self.noise_var, self.objective)


def _split_hetero(pred: Tensor | Gaussian, name: str = "prediction") -> tuple[Gaussian, Gaussian]:
    g = _check_pred(pred, name)
    if g.mean.dim() != 2 or g.mean.shape[1] % 2:
        raise ValueError(
            f"{name}: a heteroscedastic model needs outputs (B, 2 D) (D means, then D log noise "
            f"variances), got shape {tuple(g.mean.shape)}"
        )
    d = g.mean.shape[1] // 2
    return Gaussian(g.mean[:, :d], g.var[:, :d]), Gaussian(g.mean[:, d:], g.var[:, d:])


#: largest exponent used in ``E exp(z)`` (float32 overflows at ~88)
_MAX_EXP = 30.0


def heteroscedastic_moments(
    pred: Tensor | Gaussian, log_noise_offset: float = 0.0, min_noise_var: float = 1e-6
) -> tuple[Gaussian, Tensor, Tensor]:
    """``(f, E[tau^2], E[1/tau^2])`` of a heteroscedastic output.

    The network's output ``(B, 2D)`` holds ``f ~ N(m_f, v_f)`` (first ``D`` columns) and
    ``z ~ N(m_z, v_z)`` (last ``D``) with ``log tau^2 = z + c`` (``c = log_noise_offset``,
    so a zero output means ``tau^2 = e^c``). Log-normal moments:
    ``E[tau^2] = exp(m_z + c + v_z / 2)``, ``E[1/tau^2] = exp(-m_z - c + v_z / 2)``; both
    exponents are capped at 30, and ``min_noise_var`` is added to ``E[tau^2]``.
    """
    f, z = _split_hetero(pred)
    e_tau2 = torch.exp((z.mean + log_noise_offset + 0.5 * z.var).clamp(max=_MAX_EXP)) + min_noise_var
    e_inv = torch.exp((-z.mean - log_noise_offset + 0.5 * z.var).clamp(max=_MAX_EXP))
    return f, e_tau2, e_inv


def heteroscedastic_nll(
    pred: Tensor | Gaussian,
    target: Tensor,
    objective: Literal["predictive", "elbo"] = "predictive",
    log_noise_offset: float = 0.0,
    min_noise_var: float = 1e-6,
) -> Tensor:
    """Heteroscedastic Gaussian regression loss, mean over the batch (summed over output dims).

    The output holds ``f ~ N(m_f, v_f)`` and the log noise variance ``z ~ N(m_z, v_z)``
    (:func:`heteroscedastic_moments`), treated as independent (as moment propagation treats
    distinct output units).

    ``objective="predictive"``: the epistemic variance ``v_f`` and the expected aleatoric
    variance combine, ``s = v_f + E[tau^2]``, ``J = 0.5 log(2 pi s) + (y - m_f)^2 / (2 s)``
    (a Gaussian moment-matched to the predictive of ``y``).
    ``objective="elbo"`` (exact expected log-likelihood under ``q``):
    ``E_q J = 0.5 log(2 pi) + 0.5 (m_z + c) + 0.5 ((y - m_f)^2 + v_f) E[1/tau^2]``.

    Args:
        pred: output moments ``(B, 2D)``.
        target: ``(B, D)`` (``(B,)`` for ``D = 1``).
        objective: ``"predictive"`` or ``"elbo"``.
        log_noise_offset: ``c`` above.
        min_noise_var: floor added to ``E[tau^2]``.
    """
    f, e_tau2, e_inv = heteroscedastic_moments(pred, log_noise_offset, min_noise_var)
    y = _match_target(f, target)
    r2 = (y - f.mean) ** 2
    if objective == "predictive":
        s = f.var + e_tau2
        j = 0.5 * (_LOG_2PI + torch.log(s) + r2 / s)
    elif objective == "elbo":
        z_mean = _split_hetero(pred)[1].mean
        j = 0.5 * (_LOG_2PI + z_mean + log_noise_offset + (r2 + f.var) * e_inv)
    else:
        raise ValueError(f"objective must be 'predictive' or 'elbo', got {objective!r}")
    return _sum_event(j).mean()


class HeteroscedasticLikelihood(torch.nn.Module):
    """Heteroscedastic Gaussian observation model: the network's second half of outputs is the
    log noise variance (:func:`heteroscedastic_nll`).

    ``forward(pred, target)`` is the loss; :meth:`predictive` maps an output ``(B, 2D)`` to the
    Gaussian over ``y`` ``N(m_f, v_f + E[tau^2])`` (epistemic plus expected aleatoric variance).
    ``noise_var`` is ``e^c`` (the noise variance at a zero output; the per-input values come
    from :meth:`predictive`).

    Args:
        noise_var: ``e^c``: the noise variance the network starts near (its log-variance
            output starts near 0).
        objective: ``"predictive"`` or ``"elbo"``.
        min_noise_var: floor added to the noise variance.
    """

    def __init__(
        self,
        noise_var: float = 1.0,
        objective: Literal["predictive", "elbo"] = "predictive",
        min_noise_var: float = 1e-6,
    ) -> None:
        super().__init__()
        if not noise_var > 0:
            raise ValueError(f"noise_var must be > 0, got {noise_var}")
        if objective not in ("predictive", "elbo"):
            raise ValueError(f"objective must be 'predictive' or 'elbo', got {objective!r}")
        self.objective = objective
        self.offset = math.log(noise_var)
        self.min_noise_var = float(min_noise_var)

    @property
    def noise_var(self) -> Tensor:
        return torch.tensor(math.exp(self.offset) + self.min_noise_var)

    def forward(self, pred: Tensor | Gaussian, target: Tensor) -> Tensor:
        return heteroscedastic_nll(pred, target, self.objective, self.offset, self.min_noise_var)

    def ggn_surrogate(self, pred: Tensor | Gaussian) -> Tensor:
        """Half the Gauss-Newton curvature in the weight variances (see
        :func:`dualflow.optim.ggn_surrogate`): ``0.5 mean_i sum_d (v_f F_f + v_z F_z)`` with the
        Fisher information of ``N(y; m_f, s)``, ``s = v_f + E[tau^2]``, in the mean, ``F_f = 1/s``,
        and in ``z``, ``F_z = (ds/dz)^2 / (2 s^2) = E[tau^2]^2 / (2 s^2)``, held constant."""
        f, e_tau2, _ = heteroscedastic_moments(pred, self.offset, self.min_noise_var)
        z = _split_hetero(pred)[1]
        s = (f.var + e_tau2).detach()
        fz = (e_tau2.detach() / s).square() * 0.5
        return 0.5 * _sum_event(f.var / s + z.var * fz).mean()

    def predictive(self, pred: Tensor | Gaussian) -> Gaussian:
        """Gaussian over ``y``: mean ``m_f``, variance ``v_f + E[tau^2]``, shapes ``(B, D)``."""
        f, e_tau2, _ = heteroscedastic_moments(pred, self.offset, self.min_noise_var)
        return Gaussian(f.mean, f.var + e_tau2)
