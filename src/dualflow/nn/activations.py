"""Element-wise non-linearities on Gaussian activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dualflow import rules
from dualflow.gaussian import Gaussian
from dualflow.nn.base import Input, Module

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "GELU",
    "Activation",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
]

#: Element-wise functions known by name (explicit registry).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "elu": F.elu,
    "softplus": F.softplus,
}


class ReLU(Module):
    """``max(0, x)`` on a Gaussian.

    Args:
        method: ``"closed"`` (default): exact moments of the rectified Gaussian
            (:func:`dualflow.rules.relu`); ``"taylor"``: the paper's first-order rule (Eq. 3),
            ``(relu(m), 1[m>0] v)``, which ignores the mass below 0.
    """

    def __init__(self, method: str = "closed") -> None:
        super().__init__()
        if method not in ("closed", "taylor"):
            raise ValueError(f"ReLU: method must be 'closed' or 'taylor', got {method!r}")
        self.method = method

    def forward(self, x: Input) -> Input:
        if isinstance(x, Tensor):
            return torch.relu(x)
        m, v = x
        fn = rules.relu if self.method == "closed" else rules.relu_taylor
        return Gaussian(*fn(m, v))

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class Activation(Module):
    """Any element-wise ``f`` on a Gaussian.

    Args:
        fn: a name from :data:`ACTIVATIONS` or a callable acting element-wise.
        method: ``"gh"`` (default): Gauss-Hermite quadrature with ``nodes`` points
            (:func:`dualflow.rules.elementwise_gh`); ``"taylor"``: the paper's Eq. 3,
            ``(f(m), f'(m)^2 v)``.
        nodes: number of Gauss-Hermite nodes.
    """

    def __init__(self, fn: str | Callable[[Tensor], Tensor], method: str = "gh", nodes: int = 20) -> None:
        super().__init__()
        if isinstance(fn, str):
            if fn not in ACTIVATIONS:
                raise ValueError(f"unknown activation {fn!r}; known: {sorted(ACTIVATIONS)}")
            self.name, self.fn = fn, ACTIVATIONS[fn]
        elif callable(fn):
            self.name, self.fn = getattr(fn, "__name__", "f"), fn
        else:
            raise TypeError(f"fn must be a name or a callable, got {type(fn).__name__}")
        if method not in ("gh", "taylor"):
            raise ValueError(f"Activation: method must be 'gh' or 'taylor', got {method!r}")
        if nodes < 1:
            raise ValueError(f"Activation: nodes must be >= 1, got {nodes}")
        self.method, self.nodes = method, int(nodes)

    def forward(self, x: Input) -> Input:
        if isinstance(x, Tensor):
            return self.fn(x)
        m, v = x
        if self.method == "taylor":
            return Gaussian(*rules.elementwise_taylor(self.fn, m, v))
        return Gaussian(*rules.elementwise_gh(self.fn, m, v, self.nodes))

    def extra_repr(self) -> str:
        return f"{self.name}, method={self.method!r}, nodes={self.nodes}"


class GELU(Activation):
    """GELU on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__("gelu", method=method, nodes=nodes)


class SiLU(Activation):
    """SiLU (swish) on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__("silu", method=method, nodes=nodes)


class Tanh(Activation):
    """tanh on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__("tanh", method=method, nodes=nodes)


class Sigmoid(Activation):
    """logistic sigmoid on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__("sigmoid", method=method, nodes=nodes)


class ELU(Activation):
    """ELU on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__("elu", method=method, nodes=nodes)


class Softplus(Activation):
    """softplus on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__("softplus", method=method, nodes=nodes)
