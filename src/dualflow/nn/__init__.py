"""Moment-propagating modules: each ``forward`` maps a :class:`dualflow.Gaussian` to a Gaussian.

Every rule of docs/maths.md section 1. Layers with weights hold mean-field Gaussian weights
(``bayes=True``, default) or point weights; :func:`kl` sums KL(q || p) over a model.
"""

from dualflow.nn.activations import (
    ACTIVATIONS,
    ELU,
    GELU,
    Activation,
    ReLU,
    Sigmoid,
    SiLU,
    Softplus,
    Tanh,
)
from dualflow.nn.base import (
    EMPIRICAL_PSEUDO_COUNT,
    PRIORS,
    BayesLayer,
    Module,
    empirical_prior_var,
    kl,
    kl_normal,
    set_checks,
    set_prior,
)
from dualflow.nn.convert import from_torch
from dualflow.nn.dropout import Dropout
from dualflow.nn.functional import Functional
from dualflow.nn.layers import Conv1d, Conv2d, Linear
from dualflow.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from dualflow.nn.pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d, set_max_pool
from dualflow.nn.rewrite import is_monotone, pool_before_activation
from dualflow.nn.sampling import PROPAGATION_RULES, sample_weights, sampled_parameters, weight_noise
from dualflow.nn.structure import (
    Add,
    AddNoise,
    Concat,
    Flatten,
    Identity,
    Product,
    Reshape,
    Residual,
    Sequential,
)

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "EMPIRICAL_PSEUDO_COUNT",
    "GELU",
    "PRIORS",
    "PROPAGATION_RULES",
    "Activation",
    "Add",
    "AddNoise",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BayesLayer",
    "Concat",
    "Conv1d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "Functional",
    "GlobalAvgPool2d",
    "Identity",
    "LayerNorm",
    "Linear",
    "MaxPool2d",
    "Module",
    "Product",
    "ReLU",
    "Reshape",
    "Residual",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
    "empirical_prior_var",
    "from_torch",
    "is_monotone",
    "kl",
    "kl_normal",
    "pool_before_activation",
    "sample_weights",
    "sampled_parameters",
    "set_checks",
    "set_max_pool",
    "set_prior",
    "weight_noise",
]
