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
``prior``               prior of the Gaussian weights: ``"fixed"`` (``N(0, prior_var)``),
                        ``"empirical"`` (empirical Bayes per weight tensor,
                        :func:`dualflow.nn.set_prior`) or ``"auto"`` (empirical for
                        regression, fixed for classification; :data:`PRIOR_CHOICES`)
``noise``               regression noise model, one of :data:`NOISES`
======================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from dualflow.nn.base import PRIORS, PROPAGATIONS
from dualflow.optim import NaturalGradient
from dualflow.train import TrainConfig, make_optimizer

__all__ = [
    "CURVATURES",
    "NOISES",
    "PRIOR_CHOICES",
    "ConfigOptimizer",
    "NaturalGradientOptimizer",
    "OptimizerFactory",
    "Traits",
]

#: values of :attr:`Traits.prior`: the layer priors of :data:`dualflow.nn.PRIORS`, or ``"auto"``:
#: ``"empirical"`` for regression and ``"fixed"`` for classification (measured: on a 130-example
#: classification set the empirical prior shrinks until the network collapses to it, test NLL
#: 0.60 after 20 epochs and log 3 after 60, against 0.20 and 0.18 with the fixed prior)
PRIOR_CHOICES: tuple[str, ...] = ("auto", *PRIORS)
#: observation-noise models of regression (:attr:`Traits.noise`): ``"homoscedastic"`` (one
#: learned ``tau^2``), ``"empirical"`` (one ``tau^2`` fitted in closed form to the ELBO, needs
#: ``objective="elbo"``), ``"heteroscedastic"`` (the network's second half of outputs is
#: ``log tau^2(x)``: :class:`~dualflow.losses.HeteroscedasticLikelihood`)
NOISES: tuple[str, ...] = ("homoscedastic", "empirical", "heteroscedastic")
#: curvature sources of :class:`NaturalGradientOptimizer`: ``"gradient"`` (``h = 2 g_s2`` from the
#: loss gradient, docs/maths.md section 3; not a curvature for the predictive objective) or ``"ggn"``
#: (the generalized Gauss-Newton curvature of the Gaussian likelihood, ``>= 0``, handed to
#: :meth:`dualflow.optim.NaturalGradient.set_curvature` at every training forward pass)
CURVATURES: tuple[str, ...] = ("gradient", "ggn")


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
        positivity: ``"split"``, ``"ivon"`` or ``"clip"`` (:data:`dualflow.optim.POSITIVITY`).
        max_step_sd: bound every mean step to this many posterior standard deviations
            (``None``: no bound; :func:`dualflow.optim.bounded_mean_step`).
        precision_debias: weight the new curvature by ``max(b2, 1/t)`` at step ``t``.
        curvature: ``"gradient"`` or ``"ggn"`` (:data:`CURVATURES`; ``"ggn"`` needs moment
            propagation and a regression likelihood).
    """

    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.1)
    positivity: str = "split"
    max_step_sd: float | None = None
    precision_debias: bool = False
    curvature: str = "gradient"
    natural_gradient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", float(self.lr))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.max_step_sd is not None:
            object.__setattr__(self, "max_step_sd", float(self.max_step_sd))
        object.__setattr__(self, "precision_debias", bool(self.precision_debias))
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {list(CURVATURES)}, got {self.curvature!r}")

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
            max_step_sd=self.max_step_sd,
            precision_debias=self.precision_debias,
        )


@dataclass(frozen=True)
class Traits:
    """The explicit choices one learning method is made of (see the module table).

    Invalid combinations raise ``ValueError``: point weights with a sampling propagation
    (point layers compute ``W x + b`` in every mode), ``train_samples > 1`` with moment
    propagation (every pass would be identical), an ``"elbo"`` objective outside moment
    propagation (sampling methods' data term already estimates the expected NLL), the
    closed-form ``"empirical"`` noise without the ``"elbo"`` objective (the predictive
    objective's optimal noise has no closed form), the Gauss-Newton curvature with a sampling
    propagation (it reads the propagated output variances).
    """

    weights: str = "gaussian"
    propagation: str = "moments"
    optimizer: OptimizerFactory = field(default_factory=ConfigOptimizer)
    members: int = 1
    train_samples: int = 1
    dropout: float = 0.0
    mc_dropout: bool = False
    objective: str = "predictive"
    prior: str = "fixed"
    noise: str = "homoscedastic"

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
        if self.prior not in PRIOR_CHOICES:
            raise ValueError(f"prior must be one of {list(PRIOR_CHOICES)}, got {self.prior!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {list(NOISES)}, got {self.noise!r}")
        if self.noise == "empirical" and self.objective != "elbo":
            raise ValueError("noise='empirical' (closed-form ELBO noise) needs objective='elbo'")
        if self.ggn and self.sampling:
            raise ValueError(
                "curvature='ggn' reads propagated output variances: it needs propagation 'moments'"
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

    @property
    def ggn(self) -> bool:
        """The natural gradient takes the Gauss-Newton curvature of the likelihood."""
        return self.natural_gradient and getattr(self.optimizer, "curvature", "gradient") == "ggn"

    def prior_for(self, task: str) -> str:
        """The layer prior (``"fixed"`` or ``"empirical"``) used for ``task``: ``"auto"`` is
        empirical for regression, fixed for classification."""
        if self.prior != "auto":
            return self.prior
        return "empirical" if task == "regression" else "fixed"

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
        if self.gaussian and self.prior != "fixed":
            parts.append(f"{self.prior} prior")
        if self.noise != "homoscedastic":
            parts.append(f"{self.noise} noise")
        return ", ".join(parts)
