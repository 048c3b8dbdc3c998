"""Base classes: moment-propagating modules and mean-field Gaussian parameters."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.gaussian import Gaussian, check_gaussian
from dualflow.nn.sampling import PROPAGATION_RULES

__all__ = [
    "PRIORS",
    "PROPAGATIONS",
    "BayesLayer",
    "Module",
    "check_dtype",
    "empirical_prior_var",
    "kl",
    "kl_normal",
    "set_checks",
    "set_prior",
    "split_input",
]

Input = Tensor | Gaussian


def split_input(x: Any) -> tuple[Tensor, Tensor | None]:
    """``Gaussian -> (mean, var)``; a plain tensor is a point mass: ``(x, None)``."""
    if isinstance(x, Gaussian):
        return x.mean, x.var
    if isinstance(x, Tensor):
        return x, None
    raise TypeError(f"expected a torch.Tensor or dualflow.Gaussian, got {type(x).__name__}")


def pack(mean: Tensor, var: Tensor | None) -> Input:
    """Inverse of :func:`split_input`."""
    return mean if var is None else Gaussian(mean, var)


class Module(torch.nn.Module):
    """A moment-propagating module: ``forward(Gaussian | Tensor) -> Gaussian | Tensor``.

    A plain tensor input is a point mass (variance 0) and, where the module adds no
    randomness, a plain tensor comes out, so point networks cost no more than ``torch.nn``.

    ``check_inputs`` (default ``True``) makes parametrised layers and containers validate
    their inputs (dtype, see :func:`check_dtype`; shapes, NaN/inf, negative variances) with a
    clear ``ValueError``; it costs one device synchronisation per check. Turn it off with
    :func:`set_checks` (a model then validates nothing unless it checks at its own boundary,
    as :class:`dualflow.models.ImageClassifier` does).
    """

    check_inputs: bool = True

    def kl(self) -> Tensor:
        """KL(q || p) summed over every mean-field Gaussian parameter in this module tree."""
        return kl(self)


def check_dtype(x: Tensor, expected: torch.dtype | None, name: str) -> None:
    """The dtype policy of every module: inputs are never cast, a mismatch is a ``ValueError``.

    ``x`` must be floating point (an integer or boolean tensor is data that still needs
    converting, e.g. uint8 images, which a silent cast would feed in unnormalised) and, unless
    autocast is on for its device, of the parameters' dtype ``expected`` (a float64 input to a
    float32 model would otherwise be rounded silently, or fail deep inside torch). No device
    synchronisation. ``expected=None`` (no parameters) checks only the first rule.
    """
    if not x.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point input, got {x.dtype}; convert it first "
            "(x.float(); uint8 images: scale them, e.g. ImageData.normalize)"
        )
    if expected is not None and x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{name}: input dtype {x.dtype} differs from the parameters' dtype {expected}: convert the "
            f"input (x.to({expected})) or the model (model.to({x.dtype}))"
        )


def set_checks(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Switch input validation on or off for every :class:`Module` in ``model``."""
    for mod in model.modules():
        if isinstance(mod, Module):
            mod.check_inputs = enabled
    return model


def kl_normal(mean: Tensor, var: Tensor, prior_var: float | Tensor) -> Tensor:
    """``sum KL(N(mean, var) || N(0, prior_var))`` (docs/maths.md section 2.3):
    ``0.5 (var/s0 + mean^2/s0 - 1 - log(var/s0))`` summed over all elements."""
    r = var / prior_var
    return 0.5 * (r + mean * mean / prior_var - 1.0 - torch.log(r)).sum()


#: Priors of a :class:`BayesLayer` (attribute ``layer.prior``; :func:`set_prior`).
#: ``"fixed"``: ``N(0, prior_var)`` on every weight and bias;
#: ``"empirical"``: empirical Bayes (type-II maximum likelihood) per tensor, see
#: :func:`empirical_prior_var`.
PRIORS: tuple[str, ...] = ("fixed", "empirical")
#: default weight of the empirical prior's hyperprior, in pseudo-weights at the fixed prior
#: variance (:func:`empirical_prior_var`): 11, DVI's inverse-gamma hyperprior (``a = 4.4798``,
#: ``2 (a + 1) = 10.96``); it matters for small tensors (biases, the output layer)
EMPIRICAL_PSEUDO_COUNT: float = 11.0


def empirical_prior_var(mean: Tensor, var: Tensor, anchor: float = 0.0, pseudo_count: float = 0.0) -> Tensor:
    """The prior variance ``s0`` of one tensor that maximises the evidence lower bound.

    Empirical Bayes (type-II maximum likelihood; deterministic variational inference, Wu et
    al. 2019; docs/maths.md section 3.2). Only ``KL(q || p)`` depends on the prior; for ``n`` weights
    ``N(mu_i, sigma_i^2)`` sharing the prior ``N(0, s0)``,
    ``d/ds0 sum_i KL_i = sum_i (s0 - mu_i^2 - sigma_i^2) / (2 s0^2) = 0`` gives
    ``s0* = mean_i(mu_i^2 + sigma_i^2)``, the unique minimum (``sum_i KL_i`` is convex in
    ``1/s0``). At ``s0*`` the tensor's KL is ``0.5 sum_i (log s0* - log sigma_i^2)``.

    With an inverse-gamma hyperprior ``s0 ~ IG(a, b)`` (DVI's choice; MAP-II) the optimum of
    ``sum_i KL_i - log IG(s0)`` is ``s0* = (sum_i (mu_i^2 + sigma_i^2) + 2 b) / (n + 2 a + 2)``.
    Written with ``pseudo_count = 2 (a + 1)`` and the hyperprior's mode ``anchor = b / (a + 1)``:
    ``s0* = (sum_i (mu_i^2 + sigma_i^2) + pseudo_count * anchor) / (n + pseudo_count)``, the
    tensor's second moment shrunk towards ``anchor`` as if ``pseudo_count`` more weights had
    second moment ``anchor``. ``pseudo_count = 0``: plain type-II ML. (DVI: ``a = 4.4798``,
    ``b = (a + 1) x`` the He variance, i.e. ``pseudo_count = 10.96`` and ``anchor`` = He.)

    The result is detached: since the objective is stationary in ``s0`` at ``s0*``, its
    gradient with respect to ``(mu, sigma)`` is the same whether ``s0*`` is treated as a
    function of them or as a constant (envelope theorem), so the profiled objective
    ``min_s0 [J + KL/N - log p(s0)/N]`` and an alternating closed-form update of ``s0`` made
    before every gradient evaluation take identical steps.

    Args:
        mean, var: the tensor's means and variances (same shape).
        anchor: the hyperprior's mode (``> 0`` when ``pseudo_count > 0``).
        pseudo_count: the hyperprior's weight, ``>= 0``.

    Returns:
        A 0-dim tensor ``s0*`` (clamped at 1e-30).
    """
    total = (mean.detach().square() + var.detach()).sum()
    if pseudo_count:
        total = total + pseudo_count * anchor
    return (total / (mean.numel() + pseudo_count)).clamp_min(1e-30)


def set_prior(model: torch.nn.Module, prior: str, pseudo_count: float | None = None) -> torch.nn.Module:
    """Set the prior (one of :data:`PRIORS`) of every :class:`BayesLayer` in ``model``.

    Args:
        model: any module.
        prior: ``"fixed"`` or ``"empirical"``.
        pseudo_count: with ``"empirical"``: the weight of the hyperprior (see
            :func:`empirical_prior_var`; its mode is each layer's fixed ``prior_var``);
            ``None`` keeps the layers' value (default :data:`EMPIRICAL_PSEUDO_COUNT`).
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")
    if pseudo_count is not None and not pseudo_count >= 0:
        raise ValueError(f"pseudo_count must be >= 0, got {pseudo_count}")
    for mod in model.modules():
        if isinstance(mod, BayesLayer):
            mod.prior = prior
            if pseudo_count is not None:
                mod.prior_pseudo_count = float(pseudo_count)
    return model


def kl(model: torch.nn.Module) -> Tensor:
    """KL(q || p) of all :class:`BayesLayer` parameters in ``model`` (0 for a point network)."""
    total: Tensor | None = None
    for mod in model.modules():
        if isinstance(mod, BayesLayer) and mod.bayes:
            k = mod.kl_own()
            total = k if total is None else total + k
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=p.dtype if p is not None else torch.get_default_dtype())
    return total


#: Propagation modes of a :class:`BayesLayer` (attribute ``layer.propagation``), the keys of
#: :data:`dualflow.nn.sampling.PROPAGATION_RULES`, where each mode is one small function.
#: ``"moments"``: Algorithm 1 (deterministic moment propagation, the default);
#: ``"reparam"``: one weight sample per forward pass, shared by the batch (Blundell et al. 2015);
#: ``"local"``: pre-activations sampled from their exact Gaussian given the input
#: (local reparameterisation, Kingma et al. 2015);
#: ``"flipout"``: one shared perturbation decorrelated per example by random signs (Wen et al. 2018).
PROPAGATIONS: tuple[str, ...] = tuple(PROPAGATION_RULES)


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class BayesLayer(Module):
    """Mixin for layers with mean-field Gaussian weights ``W ~ N(mu, sigma^2)``.

    Parameterisation: ``weight_mu`` and ``weight_rho`` with ``sigma = softplus(rho)``
    (docs/maths.md section 2.3), likewise for the bias. ``bayes=False`` keeps only the means (a
    point network).

    Prior (attribute ``prior``, one of :data:`PRIORS`; :func:`set_prior` sets it on a model):
    ``"fixed"`` (default) puts ``N(0, prior_var)`` on every weight and bias; ``"empirical"``
    gives the weight tensor and the bias tensor each its own prior variance, the one that
    maximises the evidence lower bound for the current ``q`` (:func:`empirical_prior_var`:
    ``mean(mu^2 + sigma^2)`` over the tensor). :meth:`prior_variances` returns the values in
    effect; ``prior_var`` reads the weight tensor's (a float) and sets the fixed value.

    Initialisation ("He second-moment rule"): ``E[mu^2] + sigma^2 = gain^2 / fan_in`` with
    ``sigma^2 = init_var_ratio * gain^2 / fan_in`` and ``mu ~ N(0, (1 - init_var_ratio)
    gain^2 / fan_in)``. With ``gain^2 = 2`` the second moment ``E[m^2 + v]`` of ReLU
    activations is preserved from layer to layer (He et al. 2015 applied to the total
    weight second moment); ``init_var_ratio`` sets the share of weight noise.
    The default prior variance is the same scale, ``gain^2 / fan_in``.

    Propagation (attribute ``propagation``, one of :data:`PROPAGATIONS`; set it on a whole
    model with :func:`dualflow.methods.set_propagation`): ``"moments"`` (default) maps a
    :class:`~dualflow.Gaussian` (or tensor) to output moments by Algorithm 1. The sampling
    modes ``"reparam"``, ``"local"`` and ``"flipout"`` take and return plain tensors (one
    random draw of the output) and use the *same* parameters ``(mu, softplus(rho))``, prior
    and KL, so a model trained under one propagation can be evaluated under another. In a
    sampling mode every output element has exactly the distribution of ``W x + b`` with
    ``W ~ q``; what differs between the modes is the correlation *between* elements:
    ``"reparam"`` shares one weight draw across the batch (the exact joint of one network);
    ``"local"`` draws every output element independently (exact per element for
    :class:`Linear`, where distinct outputs use distinct weight rows; for convolutions the
    positions of one example become independent, which the true joint is not); ``"flipout"``
    gives every example its own pseudo-independent draw ``mu + delta * s_out s_in^T``,
    exact in distribution per example. Point layers (``bayes=False``) compute ``W x + b`` in
    every mode.
    """

    bayes: bool
    #: see :data:`PRIORS`; a class default, set per instance (:func:`set_prior`)
    prior: str = "fixed"
    #: hyperprior weight of the empirical prior (:func:`empirical_prior_var`)
    prior_pseudo_count: float = EMPIRICAL_PSEUDO_COUNT
    _propagation: str = "moments"  # class default; set per instance through ``propagation``

    @property
    def propagation(self) -> str:
        """How ``forward`` propagates: one of :data:`PROPAGATIONS` (validated on assignment)."""
        return self._propagation

    @propagation.setter
    def propagation(self, mode: str) -> None:
        if mode not in PROPAGATION_RULES:
            raise ValueError(
                f"{type(self).__name__}: unknown propagation {mode!r}; known: {list(PROPAGATIONS)}"
            )
        self._propagation = mode

    def _propagate(self, x: Input) -> Input:
        """``forward`` after input checks: the rule of the current propagation mode."""
        return PROPAGATION_RULES[self._propagation](self, x)

    def forward_moments(self, x: Input) -> Input:
        """Algorithm 1: output moments of the layer (defined by each layer)."""
        raise NotImplementedError

    def _setup(
        self,
        weight_shape: tuple[int, ...],
        fan_in: int,
        bias: bool,
        bayes: bool,
        prior_var: float | None,
        init_var_ratio: float,
        gain: float,
        device: Any,
        dtype: Any,
    ) -> None:
        if not 0.0 < init_var_ratio < 1.0:
            raise ValueError(f"init_var_ratio must lie in (0, 1), got {init_var_ratio}")
        if prior_var is not None and not prior_var > 0:
            raise ValueError(f"prior_var must be > 0, got {prior_var}")
        kw = {"device": device, "dtype": dtype}
        self.bayes = bool(bayes)
        self.fan_in = int(fan_in)
        self.gain = float(gain)
        self.init_var_ratio = float(init_var_ratio)
        self._prior_var = float(prior_var) if prior_var is not None else gain * gain / fan_in
        self.weight_mu = torch.nn.Parameter(torch.empty(weight_shape, **kw))
        self.weight_rho = torch.nn.Parameter(torch.empty(weight_shape, **kw)) if bayes else None
        out = weight_shape[0]
        self.bias_mu = torch.nn.Parameter(torch.empty(out, **kw)) if bias else None
        self.bias_rho = torch.nn.Parameter(torch.empty(out, **kw)) if (bias and bayes) else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scale2 = self.gain**2 / self.fan_in
        r = self.init_var_ratio if self.bayes else 0.0
        self.weight_mu.normal_(0.0, math.sqrt((1.0 - r) * scale2))
        if self.bias_mu is not None:
            self.bias_mu.zero_()
        if self.bayes:
            rho0 = _inv_softplus(math.sqrt(r * scale2))
            self.weight_rho.fill_(rho0)
            if self.bias_rho is not None:
                self.bias_rho.fill_(rho0)

    # Interface: the four tensors below are what other tools read.
    @property
    def weight_mean(self) -> Tensor:
        return self.weight_mu

    @property
    def weight_var(self) -> Tensor:
        """Weight variances ``softplus(rho)^2`` (zeros for point weights)."""
        if self.weight_rho is None:
            return torch.zeros_like(self.weight_mu)
        return F.softplus(self.weight_rho).square()

    @property
    def bias_mean(self) -> Tensor | None:
        return self.bias_mu

    @property
    def bias_var(self) -> Tensor | None:
        if self.bias_mu is None:
            return None
        if self.bias_rho is None:
            return torch.zeros_like(self.bias_mu)
        return F.softplus(self.bias_rho).square()

    def _moments(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``(w_mean, w_var or None, b_mean, b_var or None)`` with ``None`` for point weights."""
        if not self.bayes:
            return self.weight_mu, None, self.bias_mu, None
        return self.weight_mu, self.weight_var, self.bias_mu, self.bias_var

    def variational_pairs(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """``[(mu, rho), ...]`` for the weight and bias (empty for point weights)."""
        if not self.bayes:
            return []
        pairs = [(self.weight_mu, self.weight_rho)]
        if self.bias_mu is not None:
            pairs.append((self.bias_mu, self.bias_rho))
        return pairs

    # ------------------------------------------------------------------ prior and KL
    @property
    def prior_var(self) -> float:
        """Prior variance of the weight tensor: the fixed value, or with ``prior="empirical"``
        the current empirical-Bayes optimum (a float; see :meth:`prior_variances`).
        Assigning sets the fixed value."""
        if self.prior == "empirical" and self.bayes:
            return float(self.prior_variances()[0])
        return self._prior_var

    @prior_var.setter
    def prior_var(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"prior_var must be > 0, got {value}")
        self._prior_var = float(value)

    def prior_variances(self) -> tuple[Tensor, Tensor | None]:
        """``(weight prior variance, bias prior variance or None)`` in effect, 0-dim tensors.

        ``prior="fixed"``: ``prior_var`` for both. ``prior="empirical"``: each tensor's
        :func:`empirical_prior_var` (detached), with the hyperprior's mode at the fixed
        ``prior_var`` and weight ``prior_pseudo_count``. A point layer reports the fixed value.
        """
        if self.prior not in PRIORS:
            raise ValueError(
                f"{type(self).__name__}: prior must be one of {list(PRIORS)}, got {self.prior!r}"
            )
        if self.prior == "fixed" or not self.bayes:
            s0 = self.weight_mu.new_tensor(self._prior_var)
            return s0, (None if self.bias_mu is None else s0)
        a, c = self._prior_var, self.prior_pseudo_count
        w = empirical_prior_var(self.weight_mu, self.weight_var, a, c)
        b = None if self.bias_mu is None else empirical_prior_var(self.bias_mu, self.bias_var, a, c)
        return w, b

    def kl_own(self) -> Tensor:
        """KL(q || p) of this layer's own weights and bias, at the priors of :meth:`prior_variances`
        (with ``prior="empirical"``: the KL at the optimal prior, ``min_s0 KL``)."""
        if not self.bayes:
            return self.weight_mu.new_zeros(())
        if self.prior == "fixed":  # a float prior: the cheapest form (one fused expression per tensor)
            s0_w = s0_b = self._prior_var
        else:
            s0_w, s0_b = self.prior_variances()
        total = kl_normal(self.weight_mu, self.weight_var, s0_w)
        if self.bias_mu is not None:
            total = total + kl_normal(self.bias_mu, self.bias_var, s0_b)
        return total

    # ------------------------------------------------------------------ sampling propagation
    # (the rules live in dualflow.nn.sampling; a layer supplies its linear map and noise shapes)
    def _map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's linear map ``A_W(x) + b`` on a plain tensor (defined by each layer)."""
        raise NotImplementedError

    def _noise_shape(self, t: Tensor) -> tuple[int, ...]:
        """Shape of per-example random signs / bias noise for tensor ``t`` (an input or output
        of the layer): ``t.shape`` for ``Linear``, ``(B, C, 1, ...)`` for convolutions."""
        raise NotImplementedError

    def _bias_view(self, b: Tensor) -> Tensor:
        """``b`` shaped to broadcast against the layer output."""
        return b

    def _validate(self, x: Input, expect_dim: int, axis: int, min_ndim: int) -> None:
        m = x.mean if isinstance(x, Gaussian) else x
        if not isinstance(m, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor or Gaussian, got {type(x).__name__}")
        check_dtype(m, self.weight_mu.dtype, type(self).__name__)
        if m.dim() < min_ndim or m.shape[axis] != expect_dim:
            raise ValueError(
                f"{type(self).__name__}: expected input with {expect_dim} features on axis {axis} "
                f"(at least {min_ndim} dims), got shape {tuple(m.shape)}"
            )
        check_gaussian(x, f"{type(self).__name__} input")
