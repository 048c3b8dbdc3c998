"""dualflow: sampling-free Bayesian deep learning by moment propagation.

A Bayesian neural network with mean-field Gaussian weights is a Gaussian Markov random
field; propagating each activation's mean and variance forward ("filtering", the paper's
Algorithm 1) and backpropagating the loss ("smoothing") is belief propagation.

Library layout: :class:`Gaussian` (activation distributions), :mod:`dualflow.rules` (pure
moment rules), :mod:`dualflow.nn` (modules), :mod:`dualflow.losses`, :mod:`dualflow.train`.
Experiments and the CLI live in :mod:`dualflow.experiments`, which this package never imports.
"""

from dualflow import losses, nn, rules, smoothing, train
from dualflow.gaussian import Gaussian, add_independent, as_gaussian, cat, check_gaussian, stack
from dualflow.smoothing import smooth

__version__ = "0.1.0"

__all__ = [
    "Gaussian",
    "__version__",
    "add_independent",
    "as_gaussian",
    "cat",
    "check_gaussian",
    "losses",
    "nn",
    "rules",
    "smooth",
    "smoothing",
    "stack",
    "train",
]
