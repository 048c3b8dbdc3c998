"""The joint (observation, label) distribution a trained network has learned, sampled by NUTS/HMC.

The paper (Section 4, Appendix E.2-E.3, Figures 2-4) starts Hamiltonian Monte Carlo chains from
slightly perturbed training pairs, targets the model's "uncalibrated probability"
``exp(-J(x, y))`` (``J`` the loss of Eq. 2 as a function of the observation and the label),
adapts the step size, and monitors convergence with the Gelman-Rubin diagnostic.

**What is sampled here, exactly.** ``exp(-J(x, y))`` alone is not a probability density of
``(x, y)``: for the predictive loss ``J = -log p(y | x)`` its integral over ``y`` is 1 for
*every* ``x``, so its integral over ``x`` is infinite (for a linear-Gaussian model the
``x``-marginal is flat on all of ``R^D``). Chains on such a target never converge; what a
finite run shows is only how far the chains drifted from their starting points. The
Gelman-Rubin check the paper relies on presupposes a proper target, so the procedure needs
a base density ``p0(x)`` on the observations, and this module makes it explicit::

    pi(x, y)  proportional to  p0(x) exp(-J(x, y)),    U(x, y) = -log p0(x) + J(x, y).

The default ``p0`` (:meth:`GaussianBase.fit`) is the Gaussian with the mean and covariance
of the training inputs (the maximum-entropy density with the data's first two moments:
"observations like the training data", the only thing the perturbed-training-pair starts
tell us), optionally widened by ``scale``. Consequences, stated plainly:

* with ``energy="predictive"`` (``J = -log p(y | x)``, the model's predictive density: the
  loss Algorithm 1 trains, docs/maths.md section 2) the ``x``-marginal of ``pi`` is
  **exactly** ``p0`` for every model: a discriminative network carries no information about
  ``p(x)``; every difference between models is in ``y | x``;
* with ``energy="expected"`` (``J = E_q[-log p(y | x, W)]``, Eq. 2's data term read literally
  as the expected loss under the weight posterior ``q``) ``sum/integral_y exp(-J) <= 1`` with
  equality only where the weights agree, so the ``x``-marginal is ``p0`` tilted away from
  regions of epistemic uncertainty (for Gaussian regression by ``exp(-v_f(x) / (2 tau^2))``,
  ``v_f`` the variance of the network output under ``q``). This is "uncalibrated" in the
  literal sense (``exp(-E J) <= E exp(-J)``), and the only reading under which a BNN's
  picture of ``x`` can differ from a point network's (for point weights both energies agree).

Sampler: Pyro's NUTS (or HMC) with dual-averaging step-size and diagonal mass-matrix
adaptation on the whitened observation ``z = L^{-1}(x - mu)`` (and, for regression, on
``u = (y - m(x)) / sqrt(V(x))`` by default: an exact change of variables, see
``parameterization``); chains run one after another, each from a perturbed training pair
with its own seed; split R-hat and effective sample size per dimension (of ``x`` and ``y``)
from :mod:`pyro.ops.stats`.
Pyro is imported lazily (``pip install dualflow[hmc]``).

Labels: regression samples ``(x, y)`` jointly; classification samples ``x | y = k``
(``label=k``) or the ``x``-marginal (``label=None``, potential
``-log p0(x) - log sum_k exp(-J(x, k))``) and then ``y | x`` exactly from
``exp(-J(x, k)) / sum_k exp(-J(x, k))``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualflow import losses
from dualflow.gaussian import Gaussian, as_gaussian

__all__ = [
    "ENERGIES",
    "MIN_CHAINS",
    "MIN_SAMPLES",
    "RHAT_THRESHOLD",
    "ConvergenceWarning",
    "GaussianBase",
    "JointEnergy",
    "JointSamples",
    "convergence",
    "sample_joint",
]

#: energies ``J(x, y)``: the predictive loss ``-log p(y|x)`` or Eq. 2's expected loss ``E_q J``
ENERGIES = ("predictive", "expected")
#: the fewest chains :func:`sample_joint` runs (split R-hat needs several)
MIN_CHAINS = 4
#: the fewest kept samples per chain (split R-hat halves each chain)
MIN_SAMPLES = 20
#: split R-hat above this marks a dimension as not converged
RHAT_THRESHOLD = 1.05


class ConvergenceWarning(RuntimeWarning):
    """Some dimension's split R-hat exceeds :data:`RHAT_THRESHOLD`."""


def _require_pyro() -> Any:
    try:
        import pyro
        import pyro.infer.mcmc
        import pyro.ops.stats
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dualflow.joint needs Pyro for NUTS/HMC and its diagnostics: pip install 'dualflow[hmc]' "
            f"(pyro-ppl>=1.9); import failed: {err}"
        ) from err
    return pyro


# ============================================================================ base density


class GaussianBase:
    """The base density ``p0(x) = N(x; mu, L L^T)`` over flattened observations.

    Args:
        mean: ``(D,)``.
        scale_tril: ``(D, D)`` lower-triangular Cholesky factor ``L`` of the covariance.

    The sampler works on the whitened ``z = L^{-1}(x - mu)`` (``p0`` becomes ``N(0, I)``),
    which preconditions HMC for the data's correlations.
    """

    def __init__(self, mean: Tensor, scale_tril: Tensor) -> None:
        if mean.dim() != 1 or scale_tril.shape != (mean.numel(), mean.numel()):
            raise ValueError(
                f"GaussianBase: mean must be (D,) and scale_tril (D, D), got {tuple(mean.shape)} "
                f"and {tuple(scale_tril.shape)}"
            )
        diag = torch.diagonal(scale_tril)
        if not (torch.isfinite(scale_tril).all() and (diag > 0).all() and torch.isfinite(mean).all()):
            raise ValueError("GaussianBase: mean/scale_tril must be finite with a positive diagonal")
        self.mean = mean
        self.scale_tril = scale_tril
        self._log_det = torch.log(diag).sum()

    @classmethod
    def fit(cls, x: Tensor, *, scale: float = 1.0, shrinkage: float = 1e-3) -> GaussianBase:
        """The Gaussian with the mean and covariance of ``x`` (``(N, ...)``, flattened).

        Args:
            x: training inputs ``(N, ...)``.
            scale: standard-deviation multiplier (``> 1`` widens ``p0``).
            shrinkage: ``lambda`` in ``(1 - lambda) S + lambda (tr S / D) I``, which keeps the
                covariance ``S`` invertible when ``N <= D`` or a feature is constant (image borders).
        """
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        n, d = xf.shape
        if n < 2:
            raise ValueError(f"GaussianBase.fit needs at least 2 observations, got {n}")
        if not torch.isfinite(xf).all():
            raise ValueError("GaussianBase.fit: the observations contain NaN or inf")
        if not (scale > 0 and 0 <= shrinkage <= 1):
            raise ValueError(
                f"GaussianBase.fit: need scale > 0 and shrinkage in [0, 1], got {scale}, {shrinkage}"
            )
        mu = xf.mean(0)
        c = xf - mu
        cov = c.T @ c / (n - 1)
        avg = torch.diagonal(cov).mean().clamp_min(1e-12)
        cov = (1 - shrinkage) * cov + shrinkage * avg * torch.eye(d, dtype=cov.dtype, device=cov.device)
        try:
            tril = torch.linalg.cholesky(cov)
        except RuntimeError as err:
            raise ValueError(
                f"GaussianBase.fit: the covariance of the observations is singular; raise shrinkage "
                f"(now {shrinkage})"
            ) from err
        return cls(mu.float(), (scale * tril).float())

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def to(self, device: torch.device | str) -> GaussianBase:
        return GaussianBase(self.mean.to(device), self.scale_tril.to(device))

    def whiten(self, x: Tensor) -> Tensor:
        """``z = L^{-1}(x - mu)`` for ``x`` ``(B, D)``."""
        r = (x - self.mean).unsqueeze(-1)
        return torch.linalg.solve_triangular(self.scale_tril, r, upper=False).squeeze(-1)

    def unwhiten(self, z: Tensor) -> Tensor:
        """``x = mu + L z`` for ``z`` ``(B, D)``."""
        return self.mean + z @ self.scale_tril.T

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p0(x)`` for ``x`` ``(B, D)``, shape ``(B,)``."""
        z = self.whiten(x)
        return -0.5 * (z**2).sum(-1) - self._log_det - 0.5 * self.dim * math.log(2 * math.pi)

    def describe(self) -> dict[str, Any]:
        sd = self.scale_tril.pow(2).sum(1).sqrt()
        return {
            "kind": "gaussian",
            "dim": self.dim,
            "mean_of_sd": float(sd.mean()),
            "max_sd": float(sd.max()),
        }


# ============================================================================ energy


def _predictive_source(
    model: Any, task: str | None, noise_var: float | Tensor | torch.nn.Module | None
) -> tuple[str, Callable[..., Any], Tensor | None, str]:
    """``(task, predictive(x, samples=None, propagation=None), tau^2, kind)`` of ``model``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"unsupported model of type {type(model).__name__}: give a trained method of "
            "dualflow.methods.create(...) or a dualflow network (torch.nn.Module) with task= (and "
            "noise_var= for regression)"
        )
    if hasattr(model, "predictive") and hasattr(model, "is_fitted"):  # a dualflow method
        if not model.is_fitted:
            raise ValueError(
                f"the {type(model).__name__} has not been trained (is_fitted is False): call fit() first "
                "or load the state of a fitted method; an untrained network's joint distribution is noise"
            )
        m_task = getattr(model, "task", None)
        if task is not None and task != m_task:
            raise ValueError(f"task={task!r} contradicts the method's task {m_task!r}")
        tau2 = model.noise_var if m_task == "regression" else None
        return m_task, model.predictive, tau2, "method"
    if task not in ("regression", "classification"):
        raise ValueError(
            f"a network ({type(model).__name__}) needs task='regression' or 'classification' "
            f"(got {task!r}); a dualflow method knows its task"
        )
    tau2: Tensor | None = None
    if task == "regression":
        if noise_var is None:
            raise ValueError("a regression network needs noise_var= (a float, tensor or GaussianLikelihood)")
        if isinstance(noise_var, torch.nn.Module):
            if not hasattr(noise_var, "noise_var"):
                raise TypeError(f"noise_var module {type(noise_var).__name__} has no .noise_var")
            tau2 = noise_var.noise_var.detach()
        else:
            tau2 = torch.as_tensor(noise_var, dtype=torch.float32)
        if not (torch.isfinite(tau2).all() and (tau2 > 0).all()):
            raise ValueError(f"noise_var must be positive and finite, got {tau2}")

    def predictive(x: Tensor, samples: int | None = None, propagation: str | None = None) -> Any:
        out = model(x)
        if task == "classification":
            return losses.predictive_probs(out)
        g = as_gaussian(out)
        return Gaussian(g.mean, g.var + tau2.to(g.mean.device))

    return task, predictive, tau2, "network"


@contextlib.contextmanager
def _common_random_numbers(seed: int | None, device: torch.device) -> Iterator[None]:
    """Evaluate under a fixed random stream (then restore the caller's), so a sampled predictive
    (weight draws, dropout masks) is the same function of ``x`` at every HMC step."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class JointEnergy:
    """``U(x, y) = -log p0(x) + J(x, y)`` of a trained model (see the module docstring).

    Args:
        model: a fitted :class:`dualflow.methods.Method` (uses its differentiable
            ``predictive``) or a ``dualflow`` network (then pass ``task`` and, for regression,
            ``noise_var``; its training cannot be checked).
        base: the base density :class:`GaussianBase` (``None``: improper flat ``p0``).
        energy: ``"predictive"`` or ``"expected"`` (:data:`ENERGIES`).
        x_shape: shape of one observation (``(D,)``, ``(C, H, W)``).
        samples, propagation: passed to ``predictive`` (sampling predictives are evaluated
            with common random numbers: a fixed set of weight draws).
        draws: weight draws ``K`` of the expected classification loss
            ``(1/K) sum_k -log softmax_y f(x, W_k)`` of a Bayesian method (``W_k ~ q`` by local
            reparameterisation, one per batch row, under a fixed random stream). Point methods
            (``vanilla``, ``ensemble``: the ensemble's mixture) have ``E_q J = J``.
        noise_seed: seed of the common random numbers.
    """

    def __init__(
        self,
        model: Any,
        base: GaussianBase | None,
        *,
        x_shape: Sequence[int],
        energy: str = "predictive",
        task: str | None = None,
        noise_var: float | Tensor | torch.nn.Module | None = None,
        samples: int | None = None,
        propagation: str | None = None,
        draws: int = 16,
        noise_seed: int = 0,
    ) -> None:
        if energy not in ENERGIES:
            raise ValueError(f"energy must be one of {list(ENERGIES)}, got {energy!r}")
        self.task, self._predictive, self.tau2, self.kind = _predictive_source(model, task, noise_var)
        if self.task not in ("regression", "classification"):
            raise ValueError(f"unsupported task {self.task!r}")
        self.model = model
        self.base = base
        self.energy = energy
        self.x_shape = tuple(int(s) for s in x_shape)
        self.samples = samples
        self.propagation = propagation
        self.draws = int(draws)
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.noise_seed = int(noise_seed)
        #: evaluate the predictive under common random numbers (set by :meth:`detect_noise`)
        self.crn = True
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        self.evaluations = 0

    @property
    def random_weights(self) -> bool:
        """The method's weights are random under ``q`` (Gaussian weights, or MC dropout's masks),
        read from its traits; ``E_q J != J`` only then."""
        traits = getattr(self.model, "traits", None)
        return traits is None or bool(traits.gaussian or traits.mc_dropout)

    @property
    def uses_random_stream(self) -> bool:
        """The energy depends on a fixed random stream (sampled predictive or weight draws)."""
        expected_draws = self.energy == "expected" and self.task == "classification" and self.random_weights
        return self.crn or expected_draws

    @torch.no_grad()
    def detect_noise(self, xf: Tensor) -> bool:
        """Evaluate the predictive twice at ``xf`` without fixing the random stream; use common
        random numbers from now on only if the two differ (a sampled predictive). Fixing the
        stream costs a copy of the generator state per evaluation, so deterministic
        predictives (moments, point networks) skip it. Returns ``self.crn``."""
        self.crn = False
        a = self._pred(xf, self.samples, self.propagation)
        b = self._pred(xf, self.samples, self.propagation)
        ta = a if isinstance(a, Tensor) else torch.cat(list(a), -1)
        tb = b if isinstance(b, Tensor) else torch.cat(list(b), -1)
        self.crn = not torch.equal(ta, tb)
        return self.crn

    # -------------------------------------------------------------- pieces
    def _x(self, xf: Tensor) -> Tensor:
        return xf.reshape(xf.shape[0], *self.x_shape)

    def _pred(self, xf: Tensor, samples: int | None = None, propagation: str | None = None) -> Any:
        with _common_random_numbers(self.noise_seed if self.crn else None, self.device):
            return self._predictive(self._x(xf), samples=samples, propagation=propagation)

    def log_base(self, xf: Tensor) -> Tensor:
        """``log p0(x)`` ``(B,)`` (0 for the flat base)."""
        return xf.new_zeros(xf.shape[0]) if self.base is None else self.base.log_prob(xf)

    def regression_moments(self, xf: Tensor) -> Gaussian:
        """Predictive ``N(m(x), V(x))`` over ``y`` (``V`` includes ``tau^2``), ``(B, Dy)``."""
        g = self._pred(xf, self.samples, self.propagation)
        if not isinstance(g, Gaussian):
            raise TypeError(
                f"the regression predictive returned {type(g).__name__}, expected a dualflow.Gaussian"
            )
        m, v = g
        if m.dim() == 1:
            m, v = m.unsqueeze(1), v.unsqueeze(1)
        return Gaussian(m, v)

    def loss(self, xf: Tensor, y: Tensor) -> Tensor:
        """Regression ``J(x, y)`` ``(B,)`` for flattened ``x`` ``(B, D)`` and ``y`` ``(B, Dy)``."""
        m, v = self.regression_moments(xf)
        return self._loss(m, v, y)

    def _loss(self, m: Tensor, v: Tensor, y: Tensor) -> Tensor:
        if self.energy == "predictive":
            return (0.5 * torch.log(2 * math.pi * v) + 0.5 * (y - m) ** 2 / v).sum(-1)
        tau2 = self.tau2.to(m.device)
        # E_q (y - f)^2 = (y - m)^2 + v_f with v_f = V - tau^2 (the output's variance under q)
        v_f = (v - tau2).clamp_min(0.0)
        return (0.5 * torch.log(2 * math.pi * tau2) + 0.5 * ((y - m) ** 2 + v_f) / tau2).sum(-1)

    def potential_noncentered(self, xf: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Regression potential in the coordinates ``(x, u)``, ``y = m(x) + sqrt(V(x)) u``:
        ``U(x, y) - sum log sqrt(V(x))`` (the log-Jacobian of ``u -> y``). Returns ``(U, y)``.

        The same target as :meth:`potential`, but the narrow ridge ``y ~ m(x)`` (width
        ``sqrt V``, tilted by the network's slope) that slows HMC in ``(x, y)`` becomes a
        unit-scale direction."""
        self.evaluations += 1
        m, v = self.regression_moments(xf)
        y = m + v.sqrt() * u
        return self._loss(m, v, y) - 0.5 * torch.log(v).sum(-1) - self.log_base(xf), y

    def class_losses(self, xf: Tensor) -> Tensor:
        """Classification ``J(x, k)`` for every class, ``(B, C)``."""
        tiny = torch.finfo(xf.dtype).tiny
        if self.energy == "predictive":
            p = self._pred(xf, self.samples, self.propagation)
            self._check_probs(p)
            return -torch.log(p.clamp_min(tiny))
        if self.kind == "network":
            raise ValueError(
                "energy='expected' for a classification network needs weight draws: wrap it in a "
                "dualflow method (dualflow.methods.create) or use energy='predictive'"
            )
        if not self.random_weights:  # point weights (vanilla, ensemble): E_q J = J
            p = self._pred(xf, self.samples, self.propagation)
            self._check_probs(p)
            return -torch.log(p.clamp_min(tiny))
        # K draws per observation in one batch: local reparameterisation samples every example's
        # pre-activations independently, i.e. an independent weight draw per row; the fixed
        # random stream makes the K draws the same smooth function of x at every HMC step
        b, k = xf.shape[0], self.draws
        with _common_random_numbers(self.noise_seed + 7919, self.device):
            p = self._predictive(self._x(xf).repeat_interleave(k, dim=0), samples=1, propagation="local")
        self._check_probs(p)
        return -torch.log(p.clamp_min(tiny)).reshape(b, k, -1).mean(1)

    @staticmethod
    def _check_probs(p: Any) -> None:
        if not isinstance(p, Tensor) or p.dim() != 2:
            raise TypeError(
                f"the classification predictive returned {type(p).__name__}, expected probabilities (B, C)"
            )

    # -------------------------------------------------------------- potentials
    def potential(self, xf: Tensor, y: Tensor | None = None, label: int | None = None) -> Tensor:
        """``U`` ``(B,)``: regression ``U(x, y)``; classification ``U(x, k)`` for ``label=k``,
        else the ``x``-marginal ``-log p0(x) - log sum_k exp(-J(x, k))``."""
        self.evaluations += 1
        lb = self.log_base(xf)
        if self.task == "regression":
            if y is None:
                raise ValueError("regression energy needs y")
            return self.loss(xf, y) - lb
        j = self.class_losses(xf)
        if label is None:
            return -torch.logsumexp(-j, dim=1) - lb
        return j[:, label] - lb


# ============================================================================ results


@dataclass
class JointSamples:
    """Chains of a :func:`sample_joint` run.

    Attributes:
        x: observations ``(chains, samples, *x_shape)`` (model input space).
        y: regression labels ``(chains, samples, Dy)``; classification labels
            ``(chains, samples)`` (the fixed ``label``, or drawn from ``y | x``).
        energy: potential ``U`` of every sample ``(chains, samples)``.
        names: names of the monitored dimensions (``x[0]``, ..., ``y[0]``).
        rhat, ess: split R-hat and effective sample size per dimension ``(P,)``.
        chains_info: per chain: seed, start index, adapted step size, divergences,
            acceptance rate, potential evaluations, seconds.
        settings: the arguments of the run.
        warnings: messages (non-converged dimensions, ...).
        label_probs: classification: ``p(y = k | x)`` under the sampled energy ``(chains, samples, C)``.
    """

    x: Tensor
    y: Tensor | None
    energy: Tensor
    names: list[str]
    rhat: Tensor
    ess: Tensor
    chains_info: list[dict[str, Any]]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    label_probs: Tensor | None = None

    @property
    def max_rhat(self) -> float:
        return float(self.rhat.max())

    @property
    def min_ess(self) -> float:
        return float(self.ess.min())

    @property
    def converged(self) -> bool:
        return bool((self.rhat <= RHAT_THRESHOLD).all())

    def not_converged(self) -> dict[str, float]:
        """``{name: R-hat}`` of the dimensions above :data:`RHAT_THRESHOLD`."""
        bad = (self.rhat > RHAT_THRESHOLD).nonzero().flatten().tolist()
        return {self.names[i]: float(self.rhat[i]) for i in bad}

    def monitored(self) -> Tensor:
        """The monitored values ``(chains, samples, P)`` (flattened ``x``, then ``y`` for regression)."""
        c, n = self.x.shape[:2]
        parts = [self.x.reshape(c, n, -1)]
        if self.y is not None and self.y.is_floating_point():
            parts.append(self.y.reshape(c, n, -1))
        return torch.cat(parts, dim=-1)

    def summary(self, per_dim: bool = True) -> dict[str, Any]:
        """A JSON-able record: per-dimension mean, sd, R-hat, ESS; worst values; chains; settings."""
        vals = self.monitored().double()
        out: dict[str, Any] = {
            "chains": int(self.x.shape[0]),
            "samples_per_chain": int(self.x.shape[1]),
            "dimensions": len(self.names),
            "max_rhat": self.max_rhat,
            "min_ess": self.min_ess,
            "median_ess": float(self.ess.median()),
            "converged": self.converged,
            "rhat_threshold": RHAT_THRESHOLD,
            "not_converged": self.not_converged(),
            "energy_mean": float(self.energy.mean()),
            "chains_info": self.chains_info,
            "settings": self.settings,
            "warnings": list(self.warnings),
        }
        if per_dim:
            flat = vals.reshape(-1, vals.shape[-1])
            out["per_dimension"] = [
                {"name": n, "mean": float(m), "sd": float(s), "rhat": float(r), "ess": float(e)}
                for n, m, s, r, e in zip(self.names, flat.mean(0), flat.std(0), self.rhat, self.ess)
            ]
        return out


def convergence(values: Tensor, max_cells: int = 20_000_000) -> tuple[Tensor, Tensor]:
    """Split R-hat and effective sample size per dimension (:mod:`pyro.ops.stats`).

    Args:
        values: ``(chains, samples, P)``; needs ``chains >= 2`` and ``samples >= 4``.
        max_cells: memory bound: Pyro's ESS builds a ``(samples/2)^2`` table per dimension, so the
            dimensions are processed in chunks.

    Returns:
        ``(rhat, ess)``, each ``(P,)`` float64. A dimension constant across all chains gets
        R-hat 1 (nothing to disagree on) and ESS equal to the number of draws.
    """
    _require_pyro()
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    if values.dim() != 3:
        raise ValueError(f"convergence expects (chains, samples, P), got {tuple(values.shape)}")
    c, n, p = values.shape
    if c < 2 or n < 4:
        raise ValueError(f"split R-hat needs >= 2 chains and >= 4 samples per chain, got {c} x {n}")
    v = values.detach().double().cpu()
    chunk = max(1, int(max_cells // max(1, (n // 2) ** 2 * c)))
    rhat = torch.empty(p, dtype=torch.float64)
    ess = torch.empty(p, dtype=torch.float64)
    for i in range(0, p, chunk):
        part = v[..., i : i + chunk]
        rhat[i : i + chunk] = split_gelman_rubin(part, chain_dim=0, sample_dim=1)
        ess[i : i + chunk] = effective_sample_size(part, chain_dim=0, sample_dim=1)
    const = v.reshape(-1, p).std(0) == 0
    rhat[const] = 1.0
    ess[const] = float(c * n)
    return rhat, ess


# ============================================================================ sampling


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, numpy and random for Pyro (``pyro.set_rng_seed``) and restore them on exit."""
    pyro = _require_pyro()
    t_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        pyro.set_rng_seed(seed)
        yield
    finally:
        torch.random.set_rng_state(t_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _settings_key(settings: dict[str, Any], model: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sample_joint(
    model: Any,
    x_train: Tensor,
    y_train: Tensor | None = None,
    *,
    base: GaussianBase | str | None = "gaussian",
    energy: str = "predictive",
    label: int | None = None,
    task: str | None = None,
    noise_var: float | Tensor | torch.nn.Module | None = None,
    chains: int = 4,
    warmup: int = 300,
    samples: int = 500,
    kernel: str = "nuts",
    parameterization: str = "noncentered",
    max_tree_depth: int = 8,
    target_accept: float = 0.8,
    num_steps: int = 16,
    init_noise: float = 0.1,
    predictive_samples: int | None = None,
    propagation: str | None = None,
    draws: int = 16,
    seed: int = 0,
    names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> JointSamples:
    """Sample the joint (observation, label) distribution of a trained model by NUTS/HMC.

    Target ``pi(x, y) ~ p0(x) exp(-J(x, y))`` (module docstring: why ``p0`` is needed and what
    each ``energy`` means). Each chain starts from a training pair chosen at random (by
    ``seed``) and perturbed by ``init_noise`` standard deviations (of ``p0`` for ``x``, of the
    training labels for ``y``), runs ``warmup`` adaptation steps (step size by dual averaging
    to ``target_accept``, diagonal mass matrix) and keeps ``samples`` draws.

    Args:
        model: a fitted method of :func:`dualflow.methods.create` (its differentiable
            ``predictive``) or a ``dualflow`` network (``task`` / ``noise_var`` required).
        x_train: training inputs ``(N, ...)``: the chains' starting points and the data ``p0``
            is fitted to.
        y_train: training labels: regression ``(N,)`` / ``(N, Dy)``; classification ``(N,)``
            integers (chains for ``label=k`` start from examples of class ``k``).
        base: ``"gaussian"`` (:meth:`GaussianBase.fit` on ``x_train``), a :class:`GaussianBase`,
            or ``"flat"`` (improper; only for energies normalisable in ``x`` on their own: the
            chains of a flat predictive target drift and R-hat will say so).
        energy: ``"predictive"`` or ``"expected"``.
        label: classification: sample ``x | y = label``; ``None``: the ``x``-marginal and ``y | x``.
        chains: independent chains (>= :data:`MIN_CHAINS`), run one after another.
        warmup, samples: adaptation steps and kept draws per chain (``samples >= MIN_SAMPLES``).
        kernel: ``"nuts"`` or ``"hmc"`` (``num_steps`` leapfrog steps per proposal).
        parameterization: regression only: ``"noncentered"`` (default) runs the chains on
            ``(z, u)`` with ``y = m(x) + sqrt(V(x)) u`` (an exact change of variables, its
            log-Jacobian included): the ridge ``y ~ m(x)`` no longer forces tiny steps.
            Under ``energy="predictive"`` the target in these coordinates is exactly
            ``N(0, I)``: the joint is then ``p0(x) p(y | x)`` and the chains only confirm it.
            ``"centered"``: chains on ``(z, y)`` directly (slower; for checks).
        max_tree_depth, target_accept: NUTS settings.
        init_noise: perturbation of the starting pairs.
        predictive_samples, propagation: passed to ``model.predictive``.
        draws: weight draws of the expected classification loss.
        seed: chain ``c`` uses seed ``seed * 1000 + c`` (starts, momenta); the common random
            numbers of the energy use ``seed``.
        names: names of the ``x`` dimensions (default ``x[i]``).
        cache_dir: a folder where every finished chain is saved and from where a rerun with the
            same settings and model state loads it instead of sampling again (resume).
        progress: show Pyro's progress bar.
        log: called with one line per finished chain.

    Returns:
        :class:`JointSamples`. A :class:`ConvergenceWarning` is issued, and recorded in
        ``.warnings``, when some dimension's split R-hat exceeds :data:`RHAT_THRESHOLD`.

    Raises:
        ValueError: untrained model, fewer than 4 chains or 20 samples, a label out of range,
            bad data, non-finite energy at a starting point.
        TypeError: unsupported model.
    """
    pyro = _require_pyro()
    from pyro.infer.mcmc import HMC, MCMC, NUTS

    if chains < MIN_CHAINS:
        raise ValueError(f"chains must be >= {MIN_CHAINS} for split R-hat across chains, got {chains}")
    if samples < MIN_SAMPLES:
        raise ValueError(f"samples must be >= {MIN_SAMPLES} per chain for split R-hat, got {samples}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if kernel not in ("nuts", "hmc"):
        raise ValueError(f"kernel must be 'nuts' or 'hmc', got {kernel!r}")
    if parameterization not in ("noncentered", "centered"):
        raise ValueError(f"parameterization must be 'noncentered' or 'centered', got {parameterization!r}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
    if init_noise < 0:
        raise ValueError(f"init_noise must be >= 0, got {init_noise}")
    if not isinstance(x_train, Tensor) or x_train.dim() < 2 or x_train.shape[0] < 2:
        raise ValueError("x_train must be a tensor (N, ...) with N >= 2")
    if not x_train.is_floating_point() or not torch.isfinite(x_train).all():
        raise ValueError("x_train must be floating point and finite (normalise images first)")
    en = JointEnergy(
        model,
        None,
        x_shape=x_train.shape[1:],
        energy=energy,
        task=task,
        noise_var=noise_var,
        samples=predictive_samples,
        propagation=propagation,
        draws=draws,
        noise_seed=seed,
    )
    dev = en.device
    xf_train = x_train.reshape(x_train.shape[0], -1).float()
    if isinstance(base, str):
        if base == "gaussian":
            base_obj: GaussianBase | None = GaussianBase.fit(xf_train)
        elif base == "flat":
            base_obj = None
        else:
            raise ValueError(f"base must be 'gaussian', 'flat' or a GaussianBase, got {base!r}")
    elif isinstance(base, GaussianBase) or base is None:
        base_obj = base
    else:
        raise TypeError(f"base must be 'gaussian', 'flat' or a GaussianBase, got {type(base).__name__}")
    if base_obj is not None:
        if base_obj.dim != xf_train.shape[1]:
            raise ValueError(
                f"base density has {base_obj.dim} dimensions, the observations {xf_train.shape[1]}"
            )
        base_obj = base_obj.to(dev)
    en.base = base_obj
    d = xf_train.shape[1]
    with _eval_mode(model):
        en.detect_noise(xf_train[:2].to(dev))

    # labels and starting pairs -----------------------------------------------------------
    dy = 0
    y_f: Tensor | None = None
    if en.task == "regression":
        if y_train is None:
            raise ValueError("regression needs y_train (the chains start from training pairs)")
        y_f = y_train.reshape(y_train.shape[0], -1).float()
        if y_f.shape[0] != xf_train.shape[0] or not torch.isfinite(y_f).all():
            raise ValueError("y_train must be finite with one row per x_train row")
        dy = y_f.shape[1]
        if label is not None:
            raise ValueError("label= is for classification; regression samples (x, y) jointly")
        pool = torch.arange(xf_train.shape[0])
    else:
        if label is not None:
            if y_train is None:
                raise ValueError("label= needs y_train (chains start from training examples of that class)")
            yl = y_train.reshape(-1).long()
            pool = (yl == int(label)).nonzero().flatten()
            if pool.numel() == 0:
                raise ValueError(f"label {label} does not occur in y_train")
        else:
            pool = torch.arange(xf_train.shape[0])
    gen = torch.Generator().manual_seed(int(seed))
    starts = pool[torch.randperm(pool.numel(), generator=gen)[:chains]]
    if starts.numel() < chains:  # fewer candidates than chains: reuse them (different noise)
        starts = pool[torch.randint(pool.numel(), (chains,), generator=gen)]
    y_sd = y_f.std(0).clamp_min(1e-6) if y_f is not None else None

    def whiten(xf: Tensor) -> Tensor:
        return xf if base_obj is None else base_obj.whiten(xf)

    def unwhiten(z: Tensor) -> Tensor:
        return z if base_obj is None else base_obj.unwhiten(z)

    noncentered = dy > 0 and parameterization == "noncentered"

    def potential_of(q: Tensor) -> Tensor:
        q2 = q.reshape(-1, d + dy)
        xf = unwhiten(q2[:, :d])
        if noncentered:
            return en.potential_noncentered(xf, q2[:, d:])[0]
        return en.potential(xf, q2[:, d:] if dy else None, label)

    def to_y(q: Tensor) -> Tensor:  # sampler coordinates -> labels (regression)
        if not noncentered:
            return q[:, d:]
        with torch.no_grad():
            return en.potential_noncentered(unwhiten(q[:, :d]), q[:, d:])[1]

    # the settings that determine the result (for the record and the resume key) ----------
    settings = {
        "energy": energy,
        "base": base_obj.describe() if base_obj is not None else {"kind": "flat"},
        "label": label,
        "task": en.task,
        "chains": chains,
        "warmup": warmup,
        "samples": samples,
        "kernel": kernel,
        "parameterization": ("noncentered" if noncentered else "centered") if dy else None,
        "max_tree_depth": max_tree_depth,
        "target_accept": target_accept,
        "num_steps": num_steps if kernel == "hmc" else None,
        "init_noise": init_noise,
        "predictive_samples": predictive_samples,
        "propagation": propagation,
        "draws": draws if energy == "expected" and en.task == "classification" else None,
        "common_random_numbers": en.crn,
        "seed": seed,
        "mass_matrix": "diagonal, adapted",
        "step_size": "dual averaging",
        "pyro": pyro.__version__,
    }
    key = _settings_key(settings, model) if cache_dir is not None else ""

    xs, ys, info = [], [], []
    with _eval_mode(model):
        for c in range(chains):
            cseed = int(seed) * 1000 + c
            path = os.path.join(os.fspath(cache_dir), f"chain{c}_{key}.pt") if cache_dir is not None else None
            if path is not None and os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
                xs.append(saved["q"][:, :d])
                ys.append(to_y(saved["q"].to(dev)).cpu() if dy else saved["q"][:, d:])
                info.append(json.loads(saved["info"]) | {"loaded_from_cache": True})
                continue
            i0 = int(starts[c])
            cg = torch.Generator().manual_seed(cseed)
            z0 = whiten(xf_train[i0 : i0 + 1].to(dev))[0]
            z0 = z0 + init_noise * torch.randn(d, generator=cg).to(dev)
            q0 = z0
            if dy:
                y0 = (y_f[i0] + init_noise * y_sd * torch.randn(dy, generator=cg)).to(dev)
                if noncentered:
                    with torch.no_grad():
                        g0 = en.regression_moments(unwhiten(z0.unsqueeze(0)))
                    y0 = ((y0 - g0.mean[0]) / g0.var[0].sqrt()).to(dev)
                q0 = torch.cat([z0, y0])
            with torch.no_grad():
                u0 = potential_of(q0.unsqueeze(0))
            if not torch.isfinite(u0).all():
                raise ValueError(
                    f"non-finite energy {float(u0[0])} at the start of chain {c} (training example {i0}, "
                    "perturbed): the model's predictive is not finite there; check the model and the inputs"
                )
            evals0 = en.evaluations

            def potential_fn(params: dict[str, Tensor]) -> Tensor:
                return potential_of(params["q"].unsqueeze(0)).sum()

            if kernel == "nuts":
                k = NUTS(
                    potential_fn=potential_fn,
                    adapt_step_size=True,
                    adapt_mass_matrix=True,
                    full_mass=False,
                    target_accept_prob=target_accept,
                    max_tree_depth=max_tree_depth,
                )
            else:
                k = HMC(
                    potential_fn=potential_fn,
                    num_steps=num_steps,
                    adapt_step_size=True,
                    adapt_mass_matrix=True,
                    full_mass=False,
                    target_accept_prob=target_accept,
                )
            t0 = time.perf_counter()
            with _seeded(cseed):
                mc = MCMC(
                    k,
                    num_samples=samples,
                    warmup_steps=warmup,
                    initial_params={"q": q0.detach().clone()},
                    num_chains=1,
                    disable_progbar=not progress,
                    transforms={},
                )
                mc.run()
            secs = time.perf_counter() - t0
            q = mc.get_samples()["q"].detach().cpu()
            diag = mc.diagnostics()
            div = diag.get("divergences", {}).get("chain 0", [])
            acc = diag.get("acceptance rate", {}).get("chain 0", float("nan"))
            ci = {
                "chain": c,
                "seed": cseed,
                "start_index": i0,
                "start_energy": float(u0[0]),
                "step_size": float(k.step_size),
                "divergences": len(div),
                "acceptance_rate": float(acc),
                "potential_evaluations": en.evaluations - evals0,
                "seconds": secs,
            }
            info.append(ci)
            xs.append(q[:, :d])
            ys.append(to_y(q.to(dev)).cpu() if dy else q[:, d:])
            if log is not None:
                log(
                    f"chain {c}: {samples} draws after {warmup} warm-up, step {ci['step_size']:.3g}, "
                    f"accept {ci['acceptance_rate']:.2f}, {ci['divergences']} divergent, "
                    f"{ci['potential_evaluations']} gradients, {secs:.1f}s"
                )
            if path is not None:
                os.makedirs(os.fspath(cache_dir), exist_ok=True)
                tmp = path + ".tmp"
                torch.save({"q": q, "info": json.dumps(ci)}, tmp)
                os.replace(tmp, path)

        # back to the observation space; energies and labels of the draws -----------------
        zq = torch.stack(xs)  # (C, N, D) whitened
        cn = zq.shape[:2]
        with torch.no_grad():
            xflat = torch.cat([unwhiten(zq[i].to(dev)) for i in range(chains)]).cpu()
            yq = torch.stack(ys).reshape(-1, dy) if dy else None
            e_list, p_list = [], []
            # with a fixed random stream the noise of a row depends on the batch layout: evaluate
            # one observation at a time, exactly as the chains did
            bs = 1 if en.uses_random_stream else 256
            for i in range(0, xflat.shape[0], bs):
                xb = xflat[i : i + bs].to(dev)
                if en.task == "regression":
                    e_list.append(en.potential(xb, yq[i : i + bs].to(dev)).cpu())
                else:
                    j = en.class_losses(xb)
                    lb = en.log_base(xb)
                    e_list.append(
                        (j[:, label] - lb if label is not None else -torch.logsumexp(-j, 1) - lb).cpu()
                    )
                    p_list.append(torch.softmax(-j, dim=1).cpu())
        energies = torch.cat(e_list).reshape(cn)
    x_out = xflat.reshape(*cn, *en.x_shape)
    label_probs = None
    if en.task == "regression":
        y_out: Tensor | None = yq.reshape(*cn, dy)
    else:
        label_probs = torch.cat(p_list).reshape(*cn, -1)
        if label is not None:
            y_out = torch.full(cn, int(label), dtype=torch.long)
        else:  # y | x exactly: one categorical draw per sample
            g = torch.Generator().manual_seed(int(seed) + 1)
            y_out = torch.multinomial(label_probs.reshape(-1, label_probs.shape[-1]), 1, generator=g).reshape(
                cn
            )

    x_names = list(names) if names is not None else [f"x[{i}]" for i in range(d)]
    if len(x_names) != d:
        raise ValueError(f"names has {len(x_names)} entries, the observations {d} dimensions")
    all_names = x_names + [f"y[{i}]" for i in range(dy)]
    res = JointSamples(
        x=x_out,
        y=y_out,
        energy=energies,
        names=all_names,
        rhat=torch.empty(0),
        ess=torch.empty(0),
        chains_info=info,
        settings=settings,
        label_probs=label_probs,
    )
    res.rhat, res.ess = convergence(res.monitored())
    if not res.converged:
        bad = res.not_converged()
        worst = sorted(bad.items(), key=lambda kv: -kv[1])[:5]
        msg = (
            f"{len(bad)} of {len(all_names)} dimensions have split R-hat > {RHAT_THRESHOLD} "
            f"(worst: {', '.join(f'{n} {r:.3f}' for n, r in worst)}): the chains have not converged; "
            "run longer (samples/warmup) before reading the picture"
        )
        res.warnings.append(msg)
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    n_div = sum(ci["divergences"] for ci in info)
    if n_div:
        res.warnings.append(f"{n_div} divergent transitions in total (see chains_info)")
    return res
