"""dualflow: sampling-free Bayesian deep learning by moment propagation.

A Bayesian neural network with mean-field Gaussian weights is a Gaussian Markov random
field; propagating each activation's mean and variance forward ("filtering", the paper's
Algorithm 1) and backpropagating the loss ("smoothing") is belief propagation.

Library layout: :class:`Gaussian` (activation distributions), :mod:`dualflow.rules` (pure
moment rules), :mod:`dualflow.ops` (the op table), :mod:`dualflow.nn` (modules),
:mod:`dualflow.losses`, :mod:`dualflow.train`; :func:`convert` (any ``torch.nn`` model),
:mod:`dualflow.posthoc` (Laplace moments of a trained network), :func:`save` / :func:`load`.
Experiments and the CLI live in :mod:`dualflow.experiments`, which this package never imports.
"""

from dualflow import losses, nn, ops, rules, smoothing, train
from dualflow.convert_fx import convert
from dualflow.gaussian import Gaussian, add_independent, as_gaussian, cat, check_gaussian, stack
from dualflow.io import load, save
from dualflow.smoothing import smooth

__version__ = "0.1.0"

__all__ = [
    "Gaussian",
    "__version__",
    "add_independent",
    "as_gaussian",
    "cat",
    "check_gaussian",
    "convert",
    "load",
    "losses",
    "nn",
    "ops",
    "rules",
    "save",
    "smooth",
    "smoothing",
    "stack",
    "train",
]
