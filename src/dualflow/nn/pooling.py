"""Pooling on Gaussian feature maps ``(B, C, H, W)``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dualflow import rules
from dualflow.gaussian import Gaussian
from dualflow.nn.base import Input, Module, split_input

__all__ = ["AvgPool2d", "GlobalAvgPool2d", "MaxPool2d"]


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _check_4d(name: str, x: Input) -> None:
    m = x.mean if isinstance(x, Gaussian) else x
    if m.dim() != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) input, got shape {tuple(m.shape)}")


class MaxPool2d(Module):
    """Max pooling of Gaussian activations.

    Args:
        kernel_size, stride, padding: as :class:`torch.nn.MaxPool2d` (``stride`` defaults to
            ``kernel_size``); padded positions never win the max.
        method: ``"clark"`` (default): a tree of pairwise Clark (1961) maxima, exact for a
            window of 2, approximate beyond (each intermediate max is treated as Gaussian);
            ``"lse"``: the paper's smooth max ``T logsumexp(x/T)`` with first-order variance.
        temperature: ``T`` for ``"lse"``.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        method: str = "clark",
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if method not in ("clark", "lse"):
            raise ValueError(f"MaxPool2d: method must be 'clark' or 'lse', got {method!r}")
        if temperature <= 0:
            raise ValueError(f"MaxPool2d: temperature must be > 0, got {temperature}")
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        self.method, self.temperature = method, float(temperature)

    def forward(self, x: Input) -> Input:
        _check_4d("MaxPool2d", x)
        if isinstance(x, Tensor):
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        m, v = x
        if self.method == "clark":
            return Gaussian(*rules.max_pool2d_clark(m, v, self.kernel_size, self.stride, self.padding))
        return Gaussian(
            *rules.max_pool2d_lse(m, v, self.kernel_size, self.stride, self.padding, self.temperature)
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"method={self.method!r}"
        )


class AvgPool2d(Module):
    """Average pooling: ``(avgpool(m), avgpool(v) / k)`` (exact; zero padding counts in ``k``)."""

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)

    def forward(self, x: Input) -> Input:
        _check_4d("AvgPool2d", x)
        m, v = split_input(x)
        mean, var = rules.avg_pool2d(m, v, self.kernel_size, self.stride, self.padding)
        return mean if var is None else Gaussian(mean, var)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool2d(Module):
    """Mean over all ``k = H W`` positions: ``(B, C, H, W) -> (B, C)``, variance ``mean(v)/k``. Exact."""

    def forward(self, x: Input) -> Input:
        _check_4d("GlobalAvgPool2d", x)
        m, v = split_input(x)
        mean, var = rules.global_avg_pool(m, v, (-2, -1))
        return mean if var is None else Gaussian(mean, var)
