"""Any op of the table (:mod:`dualflow.ops`) as a module."""

from __future__ import annotations

from typing import Any

from dualflow import ops
from dualflow.nn.base import Input, Module

__all__ = ["Functional"]


class Functional(Module):
    """Apply op ``name`` of :data:`dualflow.ops.OPS` with fixed keyword arguments.

    ``Functional("adaptive_avg_pool2d", output_size=1)(x)`` is ``OPS["adaptive_avg_pool2d"](x,
    output_size=1)``: the op's rule on a Gaussian, the torch function on a point tensor. The
    converters use it for parameter-free ``torch.nn`` modules without a dedicated
    ``dualflow.nn`` class.

    Args:
        name: an op name (see :func:`dualflow.ops.get`).
        **params: keyword arguments of the op's functional form (plain values).
    """

    def __init__(self, name: str, **params: Any) -> None:
        super().__init__()
        self.op = ops.get(name)
        self.params = dict(params)

    def forward(self, x: Input) -> Input:
        return self.op(x, **self.params)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.op.name!r}" + (f", {args}" if args else "")
