"""Dropout on plain tensors and on Gaussian activations (MC dropout, Gal & Ghahramani 2016)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dualflow.gaussian import Gaussian
from dualflow.nn.base import Input, Module

__all__ = ["Dropout"]


class Dropout(Module):
    """Inverted dropout ``y = x z / (1 - p)``, ``z ~ Bernoulli(1 - p)`` element-wise.

    Active in training mode, and also in eval mode when ``mc=True`` (Monte Carlo dropout:
    each forward pass at test time is one sample of the approximate posterior, Gal &
    Ghahramani 2016). Inactive it is the identity.

    On a plain tensor it draws a mask (``torch.nn.functional.dropout``). On a
    :class:`~dualflow.Gaussian` it propagates the moments of the product of independent
    ``x`` and mask exactly: mean ``m``, variance ``(v + p m^2) / (1 - p)``.

    Args:
        p: drop probability in ``[0, 1)``.
        mc: keep dropout active in eval mode.
    """

    def __init__(self, p: float = 0.5, mc: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p}")
        self.p = float(p)
        self.mc = bool(mc)

    def forward(self, x: Input) -> Input:
        if self.p == 0.0 or not (self.training or self.mc):
            return x
        if isinstance(x, Tensor):
            return F.dropout(x, self.p, training=True)
        if isinstance(x, Gaussian):
            m, v = x
            return Gaussian(m, (v + self.p * m * m) / (1.0 - self.p))
        raise TypeError(f"Dropout: expected a Tensor or Gaussian, got {type(x).__name__}")

    def extra_repr(self) -> str:
        return f"p={self.p}, mc={self.mc}"
