"""Linear and convolutional layers with mean-field Gaussian (or point) weights."""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from dualflow import rules
from dualflow.gaussian import Gaussian
from dualflow.nn.base import BayesLayer, Input, pack, split_input

__all__ = ["Conv1d", "Conv2d", "Linear"]

_DEFAULT_GAIN = math.sqrt(2.0)


class Linear(BayesLayer):
    """``y = x W^T + b`` with ``W ~ N(mu, sigma^2)`` element-wise (``bayes=True``) or point weights.

    Moments by :func:`dualflow.rules.linear` (docs/maths.md section 1.1). Input ``(..., in_features)``,
    output ``(..., out_features)``. A plain-tensor input skips the input-variance map.

    Args:
        in_features, out_features: sizes.
        bias: learn a bias.
        bayes: mean-field Gaussian weights (default) or point weights.
        prior_var: prior variance of every weight (default ``gain^2 / in_features``).
        init_var_ratio: share of the initial weight second moment that is variance.
        gain: initialisation gain (``sqrt(2)`` for ReLU networks, 1 for linear/tanh).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bayes: bool = True,
        *,
        prior_var: float | None = None,
        init_var_ratio: float = 0.01,
        gain: float = _DEFAULT_GAIN,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear: sizes must be positive, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._setup(
            (out_features, in_features),
            in_features,
            bias,
            bayes,
            prior_var,
            init_var_ratio,
            gain,
            device,
            dtype,
        )

    def forward(self, x: Input) -> Input:
        if self.check_inputs:
            self._validate(x, self.in_features, -1, 1)
        return self._propagate(x)

    def forward_moments(self, x: Input) -> Input:
        m, v = split_input(x)
        w_m, w_v, b_m, b_v = self._moments()
        mean, var = rules.linear(m, v, w_m, w_v, b_m, b_v)
        if w_v is None and v is None:
            return mean
        return Gaussian(mean, var)

    def _map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _noise_shape(self, t: Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias_mu is not None}, bayes={self.bayes}"
        )


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(x: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return (x,) * n if isinstance(x, int) else tuple(x)


class _ConvNd(BayesLayer):
    _nd: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        bayes: bool = True,
        *,
        prior_var: float | None = None,
        init_var_ratio: float = 0.01,
        gain: float = _DEFAULT_GAIN,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        n = self._nd
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{type(self).__name__}: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must be divisible by groups ({groups})"
            )
        self.in_channels, self.out_channels, self.groups = (
            int(in_channels),
            int(out_channels),
            int(groups),
        )
        self.kernel_size = _tuple(kernel_size, n)
        self.stride = _tuple(stride, n)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, n)
        self.dilation = _tuple(dilation, n)
        fan_in = (in_channels // groups) * math.prod(self.kernel_size)
        self._setup(
            (out_channels, in_channels // groups, *self.kernel_size),
            fan_in,
            bias,
            bayes,
            prior_var,
            init_var_ratio,
            gain,
            device,
            dtype,
        )

    def forward(self, x: Input) -> Input:
        if self.check_inputs:
            self._validate(x, self.in_channels, 1, self._nd + 2)
        return self._propagate(x)

    def forward_moments(self, x: Input) -> Input:
        m, v = split_input(x)
        w_m, w_v, b_m, b_v = self._moments()
        mean, var = rules.conv(
            m,
            v,
            w_m,
            w_v,
            b_m,
            b_v,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        if w_v is None and v is None:
            return mean
        return pack(mean, var)

    def _map(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        fn = _CONV_FN[self._nd]
        return fn(
            x,
            weight,
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def _noise_shape(self, t: Tensor) -> tuple[int, ...]:
        return (t.shape[0], t.shape[1]) + (1,) * (t.dim() - 2)

    def _bias_view(self, b: Tensor) -> Tensor:
        return b.reshape(-1, *([1] * self._nd))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias_mu is not None}, bayes={self.bayes}"
        )


class Conv1d(_ConvNd):
    """1-d convolution with mean-field Gaussian or point weights. Input ``(B, C_in, L)``.

    Same arguments as :class:`torch.nn.Conv1d` plus ``bayes``, ``prior_var``,
    ``init_var_ratio`` and ``gain`` (see :class:`Linear`).
    """

    _nd = 1


class Conv2d(_ConvNd):
    """2-d convolution with mean-field Gaussian or point weights. Input ``(B, C_in, H, W)``.

    Same arguments as :class:`torch.nn.Conv2d` (stride, padding, dilation, groups) plus
    ``bayes``, ``prior_var``, ``init_var_ratio`` and ``gain`` (see :class:`Linear`).
    Moments by :func:`dualflow.rules.conv`.
    """

    _nd = 2
