"""Learning methods side by side, chosen by name, on one model description.

>>> import dualflow.methods as dm
>>> build = dm.mlp_builder(d_in=10, hidden=50, d_out=1)
>>> m = dm.create("bp", build, task="regression")            # doctest: +SKIP
>>> history = m.fit((x, y), dualflow.train.TrainConfig(epochs=100))  # doctest: +SKIP
>>> pred = m.predict(x_test)   # Gaussian over y (variance includes the noise)  # doctest: +SKIP

Methods (:func:`available`):

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
(``m.predict(x, propagation="local")``).
"""

from __future__ import annotations

from typing import Any

from dualflow.methods.builders import Builder, mlp_builder
from dualflow.methods.core import (
    BPMethod,
    BPNGMethod,
    EnsembleMethod,
    FlipoutMethod,
    LocalReparamMethod,
    MCDropoutMethod,
    Method,
    ReparamMethod,
    ReparamNGEnsembleMethod,
    SamplingMethod,
    VanillaMethod,
)
from dualflow.methods.propagation import (
    PROPAGATIONS,
    get_propagation,
    mc_dropout,
    propagation,
    set_propagation,
)

__all__ = [
    "METHODS",
    "PROPAGATIONS",
    "BPMethod",
    "BPNGMethod",
    "Builder",
    "EnsembleMethod",
    "FlipoutMethod",
    "LocalReparamMethod",
    "MCDropoutMethod",
    "Method",
    "ReparamMethod",
    "ReparamNGEnsembleMethod",
    "SamplingMethod",
    "VanillaMethod",
    "available",
    "create",
    "describe",
    "get_propagation",
    "mc_dropout",
    "mlp_builder",
    "propagation",
    "set_propagation",
]

#: name -> class, in the canonical order of :func:`available`
METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        BPMethod,
        BPNGMethod,
        VanillaMethod,
        ReparamMethod,
        LocalReparamMethod,
        FlipoutMethod,
        EnsembleMethod,
        MCDropoutMethod,
        ReparamNGEnsembleMethod,
    )
}


def available() -> list[str]:
    """Names of the methods: ``bp``, ``bp-ng``, ``vanilla``, ``reparam``, ``local-reparam``,
    ``flipout``, ``ensemble``, ``mc-dropout``, ``reparam-ng-ensemble``."""
    return list(METHODS)


def _lookup(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def describe(name: str) -> str:
    """The documentation (what it is, citation, options) of method ``name``."""
    return (_lookup(name).__doc__ or "").strip()


def create(
    name: str,
    build: Builder,
    task: str = "regression",
    *,
    samples: int = 32,
    ensemble_size: int = 5,
    noise_var: float = 1.0,
    learn_noise: bool = True,
    dropout: float | None = None,
    **opts: Any,
) -> Method:
    """Create learning method ``name`` (one of :func:`available`) on the model ``build``.

    Args:
        name: method name; an unknown name raises ``ValueError`` listing the known ones.
        build: ``build(bayes: bool, dropout: float = 0.0) -> dualflow.nn`` module
            (e.g. :func:`mlp_builder`).
        task: ``"regression"`` or ``"classification"``.
        samples: forward passes ``S`` of sampled predictive distributions (sampling methods,
            ``mc-dropout``, and any method evaluated with a sampling ``propagation``).
        ensemble_size: members of ``ensemble``.
        noise_var: initial (``learn_noise=True``) or fixed observation noise variance
            (regression; in the units of the targets).
        learn_noise: learn the noise variance.
        dropout: dropout rate given to ``build`` (default 0; ``mc-dropout``: 0.1).
        opts: method-specific options (see :func:`describe`): ``objective`` (``bp``,
            ``bp-ng``), ``ng_lr``, ``ng_betas``, ``positivity`` (``bp-ng``,
            ``reparam-ng-ensemble``), ``train_samples`` (sampling methods). An option the
            method does not take raises ``TypeError``.
    """
    cls = _lookup(name)
    return cls(
        build,
        task,
        samples=samples,
        ensemble_size=ensemble_size,
        noise_var=noise_var,
        learn_noise=learn_noise,
        dropout=dropout,
        **opts,
    )
