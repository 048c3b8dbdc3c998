"""Element-wise non-linearities on Gaussian activations, read from the op table (:mod:`dualflow.ops`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from dualflow import ops, rules
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


class _Names(Mapping[str, Callable[[Tensor], Tensor]]):
    """Read-only view ``name -> point function`` of the element-wise ops of :data:`dualflow.ops.OPS`."""

    def __getitem__(self, name: str) -> Callable[[Tensor], Tensor]:
        try:
            return ops.activation(name).fn
        except ops.UnsupportedOpError:
            raise KeyError(name) from None

    def __iter__(self):
        return iter(ops.activation_names())

    def __len__(self) -> int:
        return len(ops.activation_names())


#: Element-wise functions known by name: a view of the op table (not a second list).
ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = _Names()


class Activation(Module):
    """An element-wise ``f`` on a Gaussian: an op of the table, or any callable.

    Args:
        fn: an element-wise op name of :data:`dualflow.ops.OPS` (``"relu"``, ``"gelu"``,
            ``"relu6"``, ...) or a callable acting element-wise.
        method: moment rule: ``"auto"`` (default: the op's closed form where it has one,
            else Gauss-Hermite), ``"closed"``, ``"gh"`` (Gauss-Hermite quadrature with
            ``nodes`` points, :func:`dualflow.rules.elementwise_gh`) or ``"taylor"`` (the
            paper's Eq. 3, ``(f(m), f'(m)^2 v)``).
        nodes: number of Gauss-Hermite nodes.
        **params: parameters of the op (e.g. ``negative_slope=0.2`` for ``"leaky_relu"``).

    Attributes:
        op: the table entry (``None`` for a callable outside the table).
        params: the op's parameters.
    """

    def __init__(
        self, fn: str | Callable[[Tensor], Tensor], method: str = "auto", nodes: int = 20, **params: Any
    ) -> None:
        super().__init__()
        if isinstance(fn, str):
            try:
                op = ops.activation(fn)
            except ops.UnsupportedOpError as e:
                raise ValueError(str(e)) from None
            self.op: ops.Op | None = op
            self.name, self.fn = op.name, op.fn
            self.params = op.resolve(**params)
        elif callable(fn):
            if params:
                raise TypeError("parameters are accepted only with an op name")
            self.op, self.params = None, {}
            self.name, self.fn = getattr(fn, "__name__", "f"), fn
        else:
            raise TypeError(f"fn must be a name or a callable, got {type(fn).__name__}")
        if method not in ops.ACT_METHODS:
            raise ValueError(f"Activation: method must be one of {ops.ACT_METHODS}, got {method!r}")
        if method == "closed" and (self.op is None or self.op.closed is None):
            raise ValueError(f"Activation: {self.name} has no closed-form moments; use 'gh' or 'taylor'")
        if nodes < 1:
            raise ValueError(f"Activation: nodes must be >= 1, got {nodes}")
        self.method, self.nodes = method, int(nodes)

    def forward(self, x: Input) -> Input:
        if self.op is not None:
            return self.op.apply_elementwise(x, self.params, self.method, self.nodes)
        if isinstance(x, Tensor):
            return self.fn(x)
        m, v = x
        if self.method == "taylor":
            return Gaussian(*rules.elementwise_taylor(self.fn, m, v))
        return Gaussian(*rules.elementwise_gh(self.fn, m, v, self.nodes))

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"{self.name}{extra}, method={self.method!r}, nodes={self.nodes}"


class ReLU(Activation):
    """``max(0, x)`` on a Gaussian.

    Args:
        method: ``"closed"`` (default): exact moments of the rectified Gaussian
            (:func:`dualflow.rules.relu`); ``"taylor"``: the paper's first-order rule (Eq. 3),
            ``(relu(m), 1[m>0] v)``, which ignores the mass below 0.
    """

    def __init__(self, method: str = "closed") -> None:
        if method not in ("closed", "taylor"):
            raise ValueError(f"ReLU: method must be 'closed' or 'taylor', got {method!r}")
        super().__init__("relu", method=method)

    def forward(self, x: Input) -> Input:
        if self.method == "taylor" and isinstance(x, Gaussian):
            return Gaussian(*rules.relu_taylor(*x))  # Eq. 3 with relu'(0) = 0, as torch
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class _Named(Activation):
    _name = ""

    def __init__(self, method: str = "gh", nodes: int = 20) -> None:
        super().__init__(self._name, method=method, nodes=nodes)


class GELU(_Named):
    """GELU on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    _name = "gelu"


class SiLU(_Named):
    """SiLU (swish) on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    _name = "silu"


class Tanh(_Named):
    """tanh on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    _name = "tanh"


class Sigmoid(_Named):
    """logistic sigmoid on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    _name = "sigmoid"


class ELU(_Named):
    """ELU on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    _name = "elu"


class Softplus(_Named):
    """softplus on a Gaussian by Gauss-Hermite quadrature (``method="taylor"``: Eq. 3)."""

    _name = "softplus"
