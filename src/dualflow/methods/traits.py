"""What a learning method is made of: :class:`Traits`, a frozen record of explicit choices.

A method is not a subclass: it is one :class:`~dualflow.methods.Method` configured by its
traits. Code that needs to know something about a method reads a trait
(``method.traits.natural_gradient``, ``.gaussian``, ``.propagation``, ...), never its name.

======================  =====================================================================
trait                   meaning
======================  =====================================================================
``weights``             ``"gaussian"`` (mean-field ``q``, KL to the prior) or ``"point"``
``propagation``         how Gaussian layers propagate in training and, by default, at
                        prediction: ``"moments"`` (Algorithm 1) or a sampling mode
                        (``"reparam"``, ``"local"``, ``"flipout"``)
``optimizer``           factory of the optimizer: :class:`ConfigOptimizer` (the
                        :class:`~dualflow.train.TrainConfig`'s Adam/AdamW/SGD) or
                        :class:`NaturalGradientOptimizer`
``members``             independently initialised networks (a deep ensemble: 5); the loss
                        sums their data terms, the predictive mixes them
``train_samples``       forward passes per mini-batch, averaged in the loss (sampling only)
``dropout``             dropout rate given to a builder
``mc_dropout``          the predictive averages ``samples`` passes with dropout active
``objective``           regression data term of moment propagation: ``"predictive"``
                        (marginal NLL) or ``"elbo"`` (expected NLL)
======================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from dualflow.nn.base import PROPAGATIONS
from dualflow.optim import NaturalGradient
from dualflow.train import TrainConfig, make_optimizer

__all__ = ["ConfigOptimizer", "NaturalGradientOptimizer", "OptimizerFactory", "Traits"]


class OptimizerFactory(Protocol):
    """``factory(params, method, data_size, config) -> Optimizer``."""

    natural_gradient: ClassVar[bool]

    def __call__(
        self, params: list[Any], method: torch.nn.Module, data_size: int, config: TrainConfig
    ) -> torch.optim.Optimizer: ...


@dataclass(frozen=True)
class ConfigOptimizer:
    """The optimizer the :class:`~dualflow.train.TrainConfig` names (Adam, AdamW or SGD with
    ``config.lr``, ...; :func:`dualflow.train.make_optimizer`, weight decay on point
    parameters only)."""

    natural_gradient: ClassVar[bool] = False

    def __call__(
        self, params: list[Any], method: torch.nn.Module, data_size: int, config: TrainConfig
    ) -> torch.optim.Optimizer:
        return make_optimizer(params, config, model=method)


@dataclass(frozen=True)
class NaturalGradientOptimizer:
    """:class:`dualflow.optim.NaturalGradient` for the Gaussian weights (data size ``N``,
    ``config.kl_weight``), Adam with ``config.lr`` and ``config.weight_decay`` for the point
    parameters (noise variance, normalisation weights).

    Attributes:
        lr: natural-gradient step size of the means.
        betas: momentum of the mean gradient, weight of the new curvature.
        positivity: ``"split"`` or ``"ivon"``.
    """

    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.1)
    positivity: str = "split"
    natural_gradient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def __call__(
        self, params: list[Any], method: torch.nn.Module, data_size: int, config: TrainConfig
    ) -> torch.optim.Optimizer:
        return NaturalGradient(
            params,
            data_size,
            lr=self.lr,
            betas=self.betas,  # type: ignore[arg-type]
            model=method,
            kl_weight=config.kl_weight,
            point_lr=config.lr,
            weight_decay=config.weight_decay,
            positivity=self.positivity,
        )


@dataclass(frozen=True)
class Traits:
    """The explicit choices one learning method is made of (see the module table).

    Invalid combinations raise ``ValueError``: point weights with a sampling propagation
    (point layers compute ``W x + b`` in every mode), ``train_samples > 1`` with moment
    propagation (every pass would be identical), an ``"elbo"`` objective outside moment
    propagation (sampling methods' data term already estimates the expected NLL).
    """

    weights: str = "gaussian"
    propagation: str = "moments"
    optimizer: OptimizerFactory = field(default_factory=ConfigOptimizer)
    members: int = 1
    train_samples: int = 1
    dropout: float = 0.0
    mc_dropout: bool = False
    objective: str = "predictive"

    def __post_init__(self) -> None:
        if self.weights not in ("gaussian", "point"):
            raise ValueError(f"weights must be 'gaussian' or 'point', got {self.weights!r}")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(f"unknown propagation {self.propagation!r}; known: {list(PROPAGATIONS)}")
        if self.weights == "point" and self.propagation != "moments":
            raise ValueError("point weights propagate deterministically: propagation must be 'moments'")
        if self.members < 1:
            raise ValueError(f"members must be >= 1, got {self.members}")
        if self.train_samples < 1:
            raise ValueError(f"train_samples must be >= 1, got {self.train_samples}")
        if self.train_samples > 1 and not self.sampling:
            raise ValueError("train_samples > 1 needs a sampling propagation (moment passes are identical)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.objective not in ("predictive", "elbo"):
            raise ValueError(f"objective must be 'predictive' or 'elbo', got {self.objective!r}")
        if self.objective != "predictive" and (self.sampling or not self.gaussian):
            raise ValueError("objective applies to Gaussian weights under moment propagation")
        if self.optimizer.natural_gradient and not self.gaussian:
            raise ValueError(
                "the natural-gradient optimizer updates Gaussian weights: weights must be 'gaussian'"
            )

    @property
    def gaussian(self) -> bool:
        """Mean-field Gaussian weights (a KL term, a posterior ``q``)."""
        return self.weights == "gaussian"

    @property
    def sampling(self) -> bool:
        """Training passes draw weights (a sampling propagation)."""
        return self.propagation != "moments"

    @property
    def natural_gradient(self) -> bool:
        """The Gaussian weights are updated by natural gradient."""
        return bool(self.optimizer.natural_gradient)

    def summary(self) -> str:
        """One line: ``gaussian weights, moments, natural gradient, 1 member, ...``."""
        parts = [f"{self.weights} weights", f"{self.propagation} propagation"]
        parts.append("natural-gradient optimizer" if self.natural_gradient else "TrainConfig optimizer")
        parts.append(f"{self.members} member{'s' if self.members > 1 else ''}")
        if self.train_samples > 1:
            parts.append(f"{self.train_samples} training passes per batch")
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        if self.mc_dropout:
            parts.append("MC dropout at prediction")
        return ", ".join(parts)
