"""dualflow: sampling-free Bayesian deep learning by moment propagation.

A Bayesian neural network with mean-field Gaussian weights is a Gaussian Markov random
field; propagating each activation's mean and variance forward ("filtering", the paper's
Algorithm 1) and backpropagating the loss ("smoothing") is belief propagation.

Library layout: :class:`Gaussian` (activation distributions), :mod:`dualflow.rules` (pure
moment rules), :mod:`dualflow.nn` (modules), :mod:`dualflow.losses`, :mod:`dualflow.train`,
imported with the package; :mod:`dualflow.methods`, :mod:`dualflow.optim`,
:mod:`dualflow.graphical` and :mod:`dualflow.models` are imported on first attribute access
(``import dualflow as df; df.methods``), so ``import dualflow`` stays light.
Experiments and the CLI live in :mod:`dualflow.experiments`, which this package never imports.
"""

import importlib
from typing import Any

from dualflow import losses, nn, rules, smoothing, train
from dualflow.gaussian import Gaussian, add_independent, as_gaussian, cat, check_gaussian, stack
from dualflow.smoothing import smooth

__version__ = "0.1.0"

#: submodules imported on first access as attributes of the package (PEP 562)
_LAZY_SUBMODULES = ("graphical", "methods", "models", "optim")

__all__ = [
    "Gaussian",
    "__version__",
    "add_independent",
    "as_gaussian",
    "cat",
    "check_gaussian",
    "graphical",
    "losses",
    "methods",
    "models",
    "nn",
    "optim",
    "rules",
    "smooth",
    "smoothing",
    "stack",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module  # later accesses skip this function
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
