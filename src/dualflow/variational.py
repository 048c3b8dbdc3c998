"""Training aids for mean-field Gaussian networks under the paper's objective (Eq. 2).

The objective stays ``mean_batch J + KL(q || p) / N``; what these aids change is *which
prior* (empirical Bayes) and *how the optimiser reaches the optimum* (a start with the
weight variances held, a KL warm-up). Each aid says whether the optimum it reaches is still
Eq. 2's:

* :class:`EmpiricalBayesPrior`: the prior variances are set by type-II maximum likelihood,
  alternating with the variational step (docs/maths.md section 3.2). For a group
  of weights sharing the prior ``N(0, s0)`` the KL is minimised over ``s0`` in closed form at
  ``s0 = mean(mu^2 + sigma^2)`` over the group. Granularity ``"tensor"`` (one ``s0`` per
  weight tensor, one per bias), ``"in"`` (one per input feature / input channel of every
  layer: automatic relevance determination of the inputs, MacKay 1994 / Neal 1996) or
  ``"out"`` (one per output unit). Still Eq. 2, with the prior's hyper-parameters fitted by
  maximum likelihood (coordinate ascent on the ELBO in ``(q, s0)``).
* :class:`TrainingAids` bundles the prior with two schedules of the optimisation, each a
  path to the same optimum: ``hold_steps`` (the weight variances are not trained for the
  first steps: the means are fitted first, the KL is on throughout) and ``kl_warmup_steps``
  (the KL factor rises linearly from 0 to 1: the objective is tempered *during* the warm-up
  and is Eq. 2 after it; label results accordingly).

Everything is explicit state (buffers of :class:`EmpiricalBayesPrior`, saved with
``state_dict``); nothing is process-wide.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow.nn.base import BayesLayer, kl_normal

__all__ = [
    "GRANULARITIES",
    "EmpiricalBayesPrior",
    "TrainingAids",
    "bayes_layers",
]

#: Granularities of :class:`EmpiricalBayesPrior`.
GRANULARITIES: tuple[str, ...] = ("tensor", "in", "out")


def bayes_layers(model: torch.nn.Module) -> list[BayesLayer]:
    """The :class:`~dualflow.nn.BayesLayer` modules of ``model`` with Gaussian weights, in order."""
    return [m for m in model.modules() if isinstance(m, BayesLayer) and m.bayes]


def _reduce_dims(weight: Tensor, granularity: str) -> tuple[int, ...]:
    if granularity == "tensor":
        return tuple(range(weight.dim()))
    if granularity == "in":  # weight (out, in, *kernel): one value per input feature / channel
        return (0, *range(2, weight.dim()))
    return tuple(range(1, weight.dim()))  # "out": one per output unit / channel


class EmpiricalBayesPrior(torch.nn.Module):
    """Zero-mean Gaussian prior variances of every Bayesian layer, fitted by type-II ML.

    ``update()`` sets every prior variance to its closed-form optimum given the current
    ``q``: ``s0 = mean(mu^2 + sigma^2)`` over the weights sharing it (floored at
    ``floor x`` the layer's default prior variance, so that an unused group cannot drive
    ``s0`` and ``sigma^2`` to 0 together). ``kl()`` is ``KL(q || p)`` under these priors (the
    priors treated as constants: the gradient is the variational step of the coordinate
    ascent). Before the first ``update()`` the priors are the layers' own ``prior_var``.

    Args:
        model: the network; its Bayesian layers are read at construction.
        granularity: ``"tensor"``, ``"in"`` or ``"out"`` (see the module doc); biases always
            get one prior per tensor.
        floor: lower bound of a prior variance relative to the layer's default.

    Buffers ``w{i}`` / ``b{i}`` (layer ``i`` in :func:`bayes_layers` order) hold the variances:
    weight priors broadcast against the weight ``(out, in, *kernel)``.
    """

    def __init__(self, model: torch.nn.Module, granularity: str = "tensor", floor: float = 1e-4) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must lie in (0, 1], got {floor}")
        self.granularity = granularity
        self.floor = float(floor)
        # a plain list: the layers belong to the model, not to this module's state
        self._layers: list[BayesLayer] = bayes_layers(model)
        if not self._layers:
            raise ValueError("EmpiricalBayesPrior: the model has no Bayesian layers")
        for i, mod in enumerate(self._layers):
            w = mod.weight_mu
            shape = [1 if d in _reduce_dims(w, granularity) else s for d, s in enumerate(w.shape)]
            self.register_buffer(
                f"w{i}", torch.full(shape, float(mod.prior_var), dtype=w.dtype, device=w.device)
            )
            if mod.bias_mu is not None:
                self.register_buffer(
                    f"b{i}", torch.full((), float(mod.prior_var), dtype=w.dtype, device=w.device)
                )

    def priors(self) -> list[tuple[BayesLayer, Tensor, Tensor | None]]:
        """``[(layer, weight prior variance, bias prior variance or None), ...]``."""
        return [(m, getattr(self, f"w{i}"), getattr(self, f"b{i}", None)) for i, m in enumerate(self._layers)]

    @torch.no_grad()
    def update(self) -> None:
        """Set every prior variance to ``mean(mu^2 + sigma^2)`` over its group (type-II ML)."""
        for i, mod in enumerate(self._layers):
            lo = self.floor * float(mod.prior_var)
            w = mod.weight_mu
            second = w.square() + mod.weight_var
            getattr(self, f"w{i}").copy_(
                second.mean(_reduce_dims(w, self.granularity), keepdim=True).clamp_min(lo)
            )
            if mod.bias_mu is not None:
                getattr(self, f"b{i}").copy_((mod.bias_mu.square() + mod.bias_var).mean().clamp_min(lo))

    def kl(self) -> Tensor:
        """``KL(q || p)`` summed over every Bayesian weight and bias, under these priors."""
        total: Tensor | None = None
        for mod, pw, pb in self.priors():
            k = kl_normal(mod.weight_mu, mod.weight_var, pw)
            if pb is not None:
                k = k + kl_normal(mod.bias_mu, mod.bias_var, pb)
            total = k if total is None else total + k
        assert total is not None
        return total

    def summary(self) -> list[dict[str, float]]:
        """Per layer: the default prior variance and the fitted ones (mean, min, max)."""
        out = []
        for mod, pw, _ in self.priors():
            out.append(
                {
                    "default": float(mod.prior_var),
                    "mean": float(pw.mean()),
                    "min": float(pw.min()),
                    "max": float(pw.max()),
                }
            )
        return out


class ScaleMixturePrior(torch.nn.Module):
    """The scale-mixture ("spike and slab") prior of Blundell et al. (2015) on every Bayesian
    weight and bias: ``p(w) = pi N(w; 0, slab_var) + (1 - pi) N(w; 0, spike_var)``.

    ``KL(q || p)`` has no closed form for a mixture; :meth:`kl` is the closed-form upper bound
    ``-H(q) - log sum_k pi_k exp(E_q log N(w; 0, s_k))`` (Jensen's inequality with the optimal
    per-weight responsibilities): the exact KL of the hierarchical model with a latent
    component indicator per weight and a factorised posterior ``q(w) q(z)``, so the objective is
    still an evidence lower bound (Eq. 2 with this prior), deterministic and sampling-free.
    Its ``sigma^2``-gradient gives every weight the positive prior precision
    ``sum_k r_k / s_k``: a weight the data do not need is pulled into the spike (mean 0,
    variance about ``spike_var``), where it adds almost no noise to the network, while a
    weight in the slab is barely decayed.

    Args:
        model: the network.
        pi: weight of the slab component, in (0, 1).
        slab_var, spike_var: the components' variances (``spike_var < slab_var``).
    """

    def __init__(
        self, model: torch.nn.Module, pi: float = 0.5, slab_var: float = 1.0, spike_var: float = 1e-6
    ):
        super().__init__()
        if not 0.0 < pi < 1.0:
            raise ValueError(f"pi must lie in (0, 1), got {pi}")
        if not 0.0 < spike_var < slab_var:
            raise ValueError(f"need 0 < spike_var < slab_var, got {spike_var}, {slab_var}")
        self._layers = bayes_layers(model)
        if not self._layers:
            raise ValueError("ScaleMixturePrior: the model has no Bayesian layers")
        self.pi, self.slab_var, self.spike_var = float(pi), float(slab_var), float(spike_var)

    def _tensors(self) -> list[tuple[Tensor, Tensor]]:
        out = []
        for m in self._layers:
            out.append((m.weight_mu, m.weight_var))
            if m.bias_mu is not None:
                out.append((m.bias_mu, m.bias_var))
        return out

    def cross_entropy(self) -> Tensor:
        """The upper bound of ``-E_q log p(w)`` summed over every weight and bias."""
        import math

        logs = [
            (math.log(self.pi) - 0.5 * math.log(2 * math.pi * self.slab_var), self.slab_var),
            (math.log1p(-self.pi) - 0.5 * math.log(2 * math.pi * self.spike_var), self.spike_var),
        ]
        total: Tensor | None = None
        for mu, var in self._tensors():
            m2 = mu.square() + var
            e = torch.stack([c - 0.5 * m2 / v for c, v in logs])
            t = -torch.logsumexp(e, dim=0).sum()
            total = t if total is None else total + t
        assert total is not None
        return total

    def entropy(self) -> Tensor:
        """``H(q)`` summed over every weight and bias."""
        import math

        total: Tensor | None = None
        for _, var in self._tensors():
            t = 0.5 * (torch.log(var) + math.log(2 * math.pi) + 1.0).sum()
            total = t if total is None else total + t
        assert total is not None
        return total

    def kl(self) -> Tensor:
        """The closed-form upper bound of ``KL(q || p)`` (see the class doc)."""
        return self.cross_entropy() - self.entropy()

    @torch.no_grad()
    def slab_share(self) -> float:
        """Share of the weights whose responsibility of the slab exceeds 1/2."""
        import math

        n = k = 0
        for mu, var in self._tensors():
            m2 = mu.square() + var
            a = math.log(self.pi) - 0.5 * math.log(self.slab_var) - 0.5 * m2 / self.slab_var
            b = math.log1p(-self.pi) - 0.5 * math.log(self.spike_var) - 0.5 * m2 / self.spike_var
            k += int((a > b).sum())
            n += m2.numel()
        return k / max(n, 1)


class TrainingAids(torch.nn.Module):
    """The prior and the optimisation schedule of one training run, as hooks of the loop.

    The loop calls, for global step ``t`` (0-based)::

        loss = data + aids.kl_factor(t) * kl_weight * aids.kl()
        loss.backward()
        aids.before_optimizer_step(t)   # drops the rho gradients while the variances are held
        opt.step()
        aids.after_optimizer_step(t)    # empirical-Bayes update of the priors

    With :func:`dualflow.train.fit` these are its hooks (``kl_fn``, an optimizer step pre-hook
    and a callback): ``dualflow.experiments.classify.aids`` wires them.

    Args:
        model: the network (or the method holding it).
        prior: ``"fixed"`` (the layers' ``prior_var``; the default), ``"eb"`` (empirical
            Bayes, :class:`EmpiricalBayesPrior`) or ``"mixture"`` (:class:`ScaleMixturePrior`).
        eb_granularity: ``"tensor"``, ``"in"`` or ``"out"``.
        eb_every: update the empirical-Bayes priors every this many steps.
        eb_start: first step of the empirical-Bayes updates.
        eb_floor: see :class:`EmpiricalBayesPrior`.
        hold_steps: steps at the start during which the weight variances are not trained
            (their ``rho`` gradient is dropped; the KL term is on).
        hold_sd: weight sd during the hold, relative to the initial sd (1: as initialised).
        kl_warmup_steps: the KL factor rises linearly from 0 to 1 over these steps (0: none;
            a tempered objective during the warm-up).
        mix_pi, mix_slab_var, mix_spike_var: the scale-mixture prior.
        natural_gradient: the optimizer is :class:`~dualflow.optim.NaturalGradient`, which
            handles the entropy part of the KL itself: :meth:`kl` then has the value of the KL
            and the gradient of the prior's cross-entropy only (for ``prior="mixture"``; build the
            optimizer with ``kl_weight=0`` and a negligible ``prior_precision``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        prior: str = "fixed",
        eb_granularity: str = "tensor",
        eb_every: int = 1,
        eb_start: int = 0,
        eb_floor: float = 1e-4,
        hold_steps: int = 0,
        hold_sd: float = 1.0,
        kl_warmup_steps: int = 0,
        mix_pi: float = 0.5,
        mix_slab_var: float = 1.0,
        mix_spike_var: float = 1e-6,
        natural_gradient: bool = False,
    ) -> None:
        super().__init__()
        if prior not in ("fixed", "eb", "mixture"):
            raise ValueError(f"prior must be 'fixed', 'eb' or 'mixture', got {prior!r}")
        if eb_every < 1 or eb_start < 0 or hold_steps < 0 or kl_warmup_steps < 0:
            raise ValueError("eb_every must be >= 1; eb_start, hold_steps, kl_warmup_steps >= 0")
        if not hold_sd > 0:
            raise ValueError(f"hold_sd must be > 0, got {hold_sd}")
        self._model = [model]  # not a submodule: its parameters belong to the caller
        self.prior_kind = prior
        self.eb = EmpiricalBayesPrior(model, eb_granularity, eb_floor) if prior == "eb" else None
        self.mixture = (
            ScaleMixturePrior(model, mix_pi, mix_slab_var, mix_spike_var) if prior == "mixture" else None
        )
        self.natural_gradient = bool(natural_gradient)
        self.eb_every, self.eb_start = int(eb_every), int(eb_start)
        self.hold_steps, self.hold_sd = int(hold_steps), float(hold_sd)
        self.kl_warmup_steps = int(kl_warmup_steps)
        #: index of the next optimizer step (kept by the caller's loop, e.g. a callback)
        self.step = 0
        self._rhos = [rho for m in bayes_layers(model) for _, rho in m.variational_pairs()]
        if self.hold_steps and self.hold_sd != 1.0:
            with torch.no_grad():
                for rho in self._rhos:  # sigma -> hold_sd x sigma, in the rho parameterisation
                    s = F.softplus(rho) * self.hold_sd
                    rho.copy_(s + torch.log(-torch.expm1(-s)))

    @property
    def active(self) -> bool:
        """Whether anything differs from plain Eq. 2 training with the layers' priors."""
        return self.prior_kind != "fixed" or self.hold_steps > 0 or self.kl_warmup_steps > 0

    def kl(self) -> Tensor:
        """``KL(q || p)`` under the current prior."""
        if self.eb is not None:
            return self.eb.kl()
        if self.mixture is not None:
            if self.natural_gradient:
                return self.mixture.cross_entropy() - self.mixture.entropy().detach()
            return self.mixture.kl()
        from dualflow.nn.base import kl

        return kl(self._model[0])

    def kl_factor(self, step: int) -> float:
        """The factor of Eq. 2's KL term at ``step`` (1 outside the warm-up)."""
        if self.kl_warmup_steps <= 0 or step >= self.kl_warmup_steps:
            return 1.0
        return (step + 1) / self.kl_warmup_steps

    def holding(self, step: int) -> bool:
        return step < self.hold_steps

    def before_optimizer_step(self, step: int) -> None:
        """Drop the ``rho`` gradients while the variances are held."""
        if self.holding(step):
            for rho in self._rhos:
                rho.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """The empirical-Bayes update (every ``eb_every`` steps from ``eb_start``)."""
        if self.eb is not None and step >= self.eb_start and (step - self.eb_start) % self.eb_every == 0:
            self.eb.update()

    def describe(self) -> dict[str, Any]:
        """The settings, for records."""
        return {
            "prior": self.prior_kind,
            **(
                {"eb_granularity": self.eb.granularity, "eb_every": self.eb_every, "eb_start": self.eb_start}
                if self.eb is not None
                else {}
            ),
            **(
                {
                    "mix_pi": self.mixture.pi,
                    "mix_slab_var": self.mixture.slab_var,
                    "mix_spike_var": self.mixture.spike_var,
                }
                if self.mixture is not None
                else {}
            ),
            "hold_steps": self.hold_steps,
            "hold_sd": self.hold_sd,
            "kl_warmup_steps": self.kl_warmup_steps,
        }
