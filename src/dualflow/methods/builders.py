"""Model descriptions shared by every learning method.

A *builder* is a callable ``build(bayes: bool, dropout: float = 0.0) -> torch.nn.Module``
returning a fresh ``dualflow.nn`` network: with mean-field Gaussian weights
(``bayes=True``) or point weights, and with :class:`~dualflow.nn.Dropout` of rate
``dropout`` where the architecture places it (``0``: none). Every method in
:mod:`dualflow.methods` calls the same builder, so only the method differs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch

from dualflow import nn as dnn

__all__ = ["Builder", "mlp_builder"]


class Builder(Protocol):
    def __call__(self, bayes: bool, dropout: float = 0.0) -> torch.nn.Module: ...


def mlp_builder(
    d_in: int,
    hidden: int | Sequence[int],
    d_out: int,
    *,
    activation: str = "relu",
    prior_var: float | None = None,
    init_var_ratio: float = 0.01,
) -> Builder:
    """Builder of a multilayer perceptron ``d_in -> hidden... -> d_out``.

    Hidden layers use He-scaled initialisation (gain ``sqrt 2``) and ``activation`` (any
    element-wise op of :data:`dualflow.ops.OPS`: closed-form moments where the op has them,
    as ``"relu"``, else Gauss-Hermite); the output layer is linear with gain 1. With
    ``dropout > 0`` a :class:`~dualflow.nn.Dropout` follows every hidden activation (Gal &
    Ghahramani 2016).

    Args:
        d_in, d_out: input and output sizes.
        hidden: one hidden size or a sequence of them (``[]``: a linear model).
        activation: name of the hidden non-linearity.
        prior_var, init_var_ratio: passed to every :class:`~dualflow.nn.Linear`.

    Returns:
        ``build(bayes, dropout=0.0) -> dualflow.nn.Sequential``.
    """
    sizes = [int(d_in), *([hidden] if isinstance(hidden, int) else list(hidden))]
    if activation not in dnn.ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(dnn.ACTIVATIONS)}")

    def build(bayes: bool, dropout: float = 0.0) -> dnn.Sequential:
        mods: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            mods.append(dnn.Linear(a, b, bayes=bayes, prior_var=prior_var, init_var_ratio=init_var_ratio))
            mods.append(dnn.Activation(activation))
            if dropout > 0:
                mods.append(dnn.Dropout(dropout))
        mods.append(
            dnn.Linear(
                sizes[-1], d_out, bayes=bayes, prior_var=prior_var, init_var_ratio=init_var_ratio, gain=1.0
            )
        )
        return dnn.Sequential(*mods)

    build.__doc__ = f"MLP {' -> '.join(map(str, [*sizes, d_out]))} ({activation})"
    return build
