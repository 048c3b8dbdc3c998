"""Learning methods side by side, chosen by name, as compositions of explicit traits.

>>> import dualflow as df
>>> import dualflow.methods as dm
>>> build = dm.mlp_builder(d_in=10, hidden=50, d_out=1)
>>> m = dm.create("bp", build, task="regression")            # doctest: +SKIP
>>> history = m.fit((x, y), df.train.TrainConfig(epochs=100))  # doctest: +SKIP
>>> pred = m.predict(x_test)   # Gaussian over y (variance includes the noise)  # doctest: +SKIP
>>> m.traits                   # what the method is made of  # doctest: +SKIP

Every method is one :class:`Method` configured by a :class:`Traits` record (see
:mod:`dualflow.methods.traits`); the registry :data:`METHODS` is data, one
:class:`MethodSpec` per name (:func:`available`):

============================ ============================================================
``bp``                       belief propagation, Algorithm 1 of the paper (moments, Adam)
``bp-ng``                    BP + natural gradient (:class:`dualflow.optim.NaturalGradient`)
``vanilla``                  point network (ML + optional weight decay)
``reparam``                  Bayes-by-backprop (Blundell et al. 2015)
``local-reparam``            local reparameterisation (Kingma et al. 2015)
``flipout``                  flipout (Wen et al. 2018)
``ensemble``                 deep ensemble (Lakshminarayanan et al. 2017)
``mc-dropout``               Monte Carlo dropout (Gal & Ghahramani 2016)
``reparam-ng-ensemble``      Bayes-by-backprop, several networks per batch, natural gradient
============================ ============================================================

All Bayesian methods use the same layers (:class:`dualflow.nn.Linear`, ``Conv*d``) with the
same parameters ``(mu, softplus(rho))``, prior and KL; only the *propagation* differs
(:func:`set_propagation`), so a model trained by one method can be evaluated by another
(``m.predict(x, propagation="local")``). Your own composition:
``Method(Traits(weights="gaussian", propagation="flipout", members=3,
optimizer=NaturalGradientOptimizer()), build, task="classification")``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from dualflow.methods.builders import Builder, mlp_builder
from dualflow.methods.core import TASKS, Method
from dualflow.methods.propagation import (
    PROPAGATIONS,
    get_propagation,
    mc_dropout,
    propagation,
    set_propagation,
)
from dualflow.methods.traits import (
    CURVATURES,
    NOISES,
    PRIOR_CHOICES,
    ConfigOptimizer,
    NaturalGradientOptimizer,
    OptimizerFactory,
    Traits,
)

__all__ = [
    "CURVATURES",
    "METHODS",
    "NOISES",
    "PRIOR_CHOICES",
    "PROPAGATIONS",
    "TASKS",
    "Builder",
    "ConfigOptimizer",
    "Method",
    "MethodSpec",
    "NaturalGradientOptimizer",
    "OptimizerFactory",
    "Traits",
    "available",
    "create",
    "describe",
    "get_propagation",
    "mc_dropout",
    "mlp_builder",
    "propagation",
    "set_propagation",
    "traits_of",
]


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the method's traits and its documentation (:func:`describe`)."""

    traits: Traits
    doc: str


_SAMPLING_DOC = (
    "The loss is the ELBO: the expected NLL under q, estimated from ``train_samples`` forward "
    "passes with sampled weights, plus the closed-form KL/N (Blundell et al. used a sampled KL; "
    "the closed form has less variance). The predictive averages S sampled passes.\n\n"
    "Options: ``train_samples`` (forward passes per mini-batch)."
)

#: name -> :class:`MethodSpec`, in the canonical order of :func:`available`
METHODS: dict[str, MethodSpec] = {
    "bp": MethodSpec(
        Traits(weights="gaussian", prior="auto"),
        """``bp``: deterministic belief propagation (the paper's Algorithm 1).

One forward pass propagates every activation's mean and variance through the mean-field
Gaussian network; the loss is the marginal NLL of the output moments
(:func:`~dualflow.losses.gaussian_nll` with ``objective="predictive"`` by default, or
``"elbo"``; :func:`~dualflow.losses.categorical_nll` with the probit approximation for
classification) plus KL/N; gradients by autodiff (backprop = smoothing, Theorems 1-2). The
optimizer of the TrainConfig (Adam by default).

Options: ``objective="predictive"|"elbo"`` (regression); ``prior`` (default ``"auto"``:
``"empirical"`` for regression, each weight tensor's prior variance fitted to the ELBO in closed
form, :func:`dualflow.nn.empirical_prior_var`; ``"fixed"`` for classification); ``noise``
(regression, :data:`NOISES`; ``"heteroscedastic"``: the builder must give ``2 D`` outputs).""",
    ),
    "bp-ng": MethodSpec(
        Traits(weights="gaussian", optimizer=NaturalGradientOptimizer(), prior="auto"),
        """``bp-ng``: BP with the natural-gradient optimizer (the paper's "BP/NF + NG").

Same model and loss as ``bp``; the Gaussian weights are updated by
:class:`dualflow.optim.NaturalGradient` (Appendix D), point parameters (the noise variance,
normalisation weights) by Adam with ``TrainConfig.lr``.

Options: ``objective``, ``prior``, ``noise`` (as ``bp``); ``ng_lr`` (default 0.1), ``ng_betas``
(default ``(0.9, 0.1)``), ``positivity`` (``"split"``; ``"clip"``: negative curvature clipped),
``max_step_sd`` (``None``: mean steps unbounded), ``precision_debias`` (``False``), passed to
:class:`~dualflow.optim.NaturalGradient`; ``curvature`` (``"gradient"``: ``h = 2 g_s2``;
``"ggn"``: the likelihood's Gauss-Newton curvature, regression only). The safeguarded setting
(``curvature="ggn", positivity="clip", precision_debias=True, max_step_sd=1.0``) is what
``dualflow uci`` runs; the defaults here keep the optimizer of the paper.""",
    ),
    "vanilla": MethodSpec(
        Traits(weights="point"),
        """``vanilla``: a point network (maximum likelihood, plus optional weight decay).

The same architecture with point weights (``build(bayes=False)``); loss: Gaussian NLL with a
learned homoscedastic noise variance, or cross-entropy; weight decay from
``TrainConfig.weight_decay``. Predictive: ``N(f(x), tau^2)`` or ``softmax f(x)``.""",
    ),
    "reparam": MethodSpec(
        Traits(weights="gaussian", propagation="reparam"),
        """``reparam``: Bayes-by-backprop (Blundell et al., ICML 2015).

One weight sample ``W = mu + softplus(rho) eps`` per forward pass, shared by the mini-batch
(propagation ``"reparam"``). """
        + _SAMPLING_DOC,
    ),
    "local-reparam": MethodSpec(
        Traits(weights="gaussian", propagation="local"),
        """``local-reparam``: the local reparameterisation trick (Kingma, Salimans & Welling, 2015).

Pre-activations are drawn from their exact Gaussian given the layer input, independently per
example and unit (propagation ``"local"``): lower-variance gradients at the cost of two
matmuls per layer. """
        + _SAMPLING_DOC,
    ),
    "flipout": MethodSpec(
        Traits(weights="gaussian", propagation="flipout"),
        """``flipout``: pseudo-independent weight perturbations (Wen et al., ICLR 2018).

One shared perturbation ``delta = softplus(rho) eps`` decorrelated per example by random sign
vectors, ``W_n = mu + delta * s_out,n s_in,n^T`` (propagation ``"flipout"``). """
        + _SAMPLING_DOC,
    ),
    "ensemble": MethodSpec(
        Traits(weights="point", members=5),
        """``ensemble``: deep ensembles (Lakshminarayanan, Pritzel & Blundell, NeurIPS 2017).

``ensemble_size`` (default 5) point networks from independent random initialisations, each
with its own learned noise variance (regression), trained on the same mini-batches in one
loop: the mini-batch loss is the *sum* of the members' losses, so each member gets exactly
its own gradient. The predictive is the members' mixture, moment-matched to a Gaussian for
regression. Not included: the paper's adversarial training and two-output heads.""",
    ),
    "mc-dropout": MethodSpec(
        Traits(weights="point", dropout=0.1, mc_dropout=True),
        """``mc-dropout``: Monte Carlo dropout (Gal & Ghahramani, ICML 2016).

A point network built with dropout (``build(bayes=False, dropout=p)``, default ``p = 0.1``)
trained like ``vanilla`` (use ``TrainConfig.weight_decay`` for the prior); the predictive
averages S forward passes with dropout kept active.""",
    ),
    "reparam-ng-ensemble": MethodSpec(
        Traits(
            weights="gaussian", propagation="reparam", optimizer=NaturalGradientOptimizer(), train_samples=4
        ),
        """``reparam-ng-ensemble``: Bayes-by-backprop with several networks per mini-batch and the
natural-gradient optimizer (the paper's "reparam./NF+NG+ensemble", Table 1).

Each mini-batch runs ``train_samples`` (default 4) forward passes, each with its own weight
sample (one "network" of the ensemble q describes), and averages their NLL; the Gaussian
weights are updated by :class:`dualflow.optim.NaturalGradient`, whose curvature then comes
from the sampled (reparameterisation) estimate of ``g_{sigma^2}`` (IVON-like, Shen et al.
2024). The predictive averages S sampled networks.

Options: ``train_samples``, ``ng_lr`` (0.1), ``ng_betas`` ((0.9, 0.1)), ``positivity``.""",
    ),
}


def available() -> list[str]:
    """Names of the methods: ``bp``, ``bp-ng``, ``vanilla``, ``reparam``, ``local-reparam``,
    ``flipout``, ``ensemble``, ``mc-dropout``, ``reparam-ng-ensemble``."""
    return list(METHODS)


def _lookup(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def traits_of(name: str) -> Traits:
    """The :class:`Traits` of registry method ``name`` (without building anything)."""
    return _lookup(name).traits


def describe(name: str) -> str:
    """The documentation (what it is, citation, options) and the traits of method ``name``."""
    spec = _lookup(name)
    return f"{spec.doc.strip()}\n\nTraits: {spec.traits.summary()}."


#: ``create`` options of natural-gradient methods -> the :class:`NaturalGradientOptimizer` field
_NG_OPTIONS = {
    "ng_lr": "lr",
    "ng_betas": "betas",
    "positivity": "positivity",
    "max_step_sd": "max_step_sd",
    "precision_debias": "precision_debias",
    "curvature": "curvature",
}


def _options(traits: Traits) -> dict[str, str]:
    """Method-specific options of ``create`` that apply to ``traits`` -> the trait each sets."""
    out: dict[str, str] = {}
    out["noise"] = "noise"
    if traits.gaussian:
        out["prior"] = "prior"
    if traits.gaussian and not traits.sampling:
        out["objective"] = "objective"
    if traits.natural_gradient:
        out.update(_NG_OPTIONS)
    if traits.sampling:
        out["train_samples"] = "train_samples"
    return out


def _with_options(
    name: str, traits: Traits, ensemble_size: int, dropout: float | None, opts: dict[str, Any]
) -> Traits:
    allowed = _options(traits)
    bad = sorted(set(opts) - set(allowed))
    if bad:
        known = ", ".join(sorted(allowed)) or "none"
        raise TypeError(f"method {name!r} takes no option {bad[0]!r} (its options: {known})")
    changes: dict[str, Any] = {}
    ng: dict[str, Any] = {}
    for k, v in opts.items():
        if k in _NG_OPTIONS:
            ng[allowed[k]] = v
        else:
            changes[allowed[k]] = v
    if ng:
        changes["optimizer"] = dataclasses.replace(traits.optimizer, **ng)  # type: ignore[type-var]
    if traits.members > 1:
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        changes["members"] = int(ensemble_size)
    if dropout is not None:
        changes["dropout"] = float(dropout)
    return dataclasses.replace(traits, **changes)


def create(
    name: str,
    model: Builder | torch.nn.Module,
    task: str = "regression",
    *,
    samples: int = 32,
    ensemble_size: int = 5,
    noise_var: float = 1.0,
    learn_noise: bool = True,
    dropout: float | None = None,
    **opts: Any,
) -> Method:
    """Create learning method ``name`` (one of :func:`available`) on a model description.

    Args:
        name: method name; an unknown name raises ``ValueError`` listing the known ones.
        model: a builder ``build(bayes: bool, dropout: float = 0.0) -> module`` (e.g.
            :func:`mlp_builder`, :func:`dualflow.models.builder`), called once per member; or
            a ``torch.nn.Module``, used by reference as the first member. What happens to a
            module: Gaussian methods (``bp``, ``bp-ng``, ``reparam``, ``local-reparam``,
            ``flipout``, ``reparam-ng-ensemble``) need dualflow layers with ``bayes=True``
            and point methods (``vanilla``, ``ensemble``, ``mc-dropout``) a model without
            them -- otherwise ``ValueError`` naming the conversion (e.g.
            :func:`dualflow.nn.from_torch`); nothing is converted silently. ``ensemble``'s
            other members are deep copies re-initialised by their modules'
            ``reset_parameters()``. ``mc-dropout`` needs dropout modules in the model;
            ``dropout=`` applies to builders only. A sampling method sets its propagation
            on the model's layers.
        task: ``"regression"`` or ``"classification"``.
        samples: forward passes ``S`` of sampled predictive distributions (sampling methods,
            ``mc-dropout``, and any method evaluated with a sampling ``propagation``).
        ensemble_size: members of ``ensemble`` (methods with several members).
        noise_var: initial (``learn_noise=True``) or fixed observation noise variance
            (regression; in the units of the targets).
        learn_noise: learn the noise variance.
        dropout: dropout rate given to the builder (default 0; ``mc-dropout``: 0.1).
        opts: method-specific options (see :func:`describe`): ``noise`` (every method,
            regression: :data:`NOISES`), ``prior`` (Gaussian weights: :data:`PRIOR_CHOICES`),
            ``objective`` (``bp``, ``bp-ng``), ``ng_lr``, ``ng_betas``, ``positivity``,
            ``max_step_sd``, ``precision_debias``, ``curvature`` (``bp-ng``,
            ``reparam-ng-ensemble``), ``train_samples`` (sampling methods). An option the
            method does not take raises ``TypeError``.
    """
    spec = _lookup(name)
    if isinstance(model, torch.nn.Module) and dropout is not None:
        raise ValueError("dropout= applies to builders; a model's own dropout modules are used as they are")
    traits = _with_options(name, spec.traits, ensemble_size, dropout, opts)
    return Method(
        traits, model, task, samples=samples, noise_var=noise_var, learn_noise=learn_noise, name=name
    )
