"""Normalisation layers as maps of Gaussian moments (docs/maths.md section 1.5)."""

from __future__ import annotations

from typing import Any

import torch

from dualflow import rules
from dualflow.nn.base import Input, Module, pack, split_input

__all__ = ["BatchNorm1d", "BatchNorm2d", "LayerNorm"]


class _BatchNorm(Module):
    """BatchNorm on the mean path; the variance is scaled by the same affine factor.

    Eval mode (and converted models) is the exact affine map
    ``m' = g (m - mu_B) / s_B + b``, ``v' = v g^2 / s_B^2`` with running statistics.
    Training mode normalises with batch statistics of the *means* (treated as constants
    of the variance path, an approximation) and updates the running statistics.
    """

    _axes: tuple[int, ...]
    _ndim: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        if m.dtype in (torch.float16, torch.bfloat16):  # autocast: statistics and output in float32
            m, v = m.float(), (None if v is None else v.float())
        if m.dim() != self._ndim or m.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self._ndim}-d input with {self.num_features} channels, "
                f"got shape {tuple(m.shape)}"
            )
        shape = (1, -1) + (1,) * (self._ndim - 2)
        if self.training:
            mu = m.mean(dim=self._axes)
            var_b = m.var(dim=self._axes, unbiased=False)
            with torch.no_grad():
                n = m.numel() / m.shape[1]
                self.running_mean.lerp_(mu.detach(), self.momentum)
                self.running_var.lerp_(var_b.detach() * n / max(n - 1, 1), self.momentum)
                self.num_batches_tracked += 1
        else:
            mu, var_b = self.running_mean, self.running_var
        inv = (var_b + self.eps).rsqrt()
        scale = inv if self.weight is None else inv * self.weight
        mean = (m - mu.reshape(shape)) * scale.reshape(shape)
        if self.bias is not None:
            mean = mean + self.bias.reshape(shape)
        var = None if v is None else v * (scale * scale).reshape(shape)
        return pack(mean, var)


class BatchNorm1d(_BatchNorm):
    """BatchNorm over ``(B, C)`` inputs (see :class:`BatchNorm2d`)."""

    _axes = (0,)
    _ndim = 2


class BatchNorm2d(_BatchNorm):
    """BatchNorm over ``(B, C, H, W)``: exact affine map in eval mode (docs/maths.md section 1.5)."""

    _axes = (0, 2, 3)
    _ndim = 4


class LayerNorm(Module):
    """LayerNorm with the statistics of the means: ``v' = v g^2 / var(m)`` (an approximation)."""

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.normalized_shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        self.eps = float(eps)
        self.weight = (
            torch.nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if elementwise_affine else None
        )

    def forward(self, x: Input) -> Input:
        m, v = split_input(x)
        if tuple(m.shape[-len(self.normalized_shape) :]) != self.normalized_shape:
            raise ValueError(
                f"LayerNorm: expected trailing shape {self.normalized_shape}, got {tuple(m.shape)}"
            )
        mean, var = rules.layer_norm(m, v, self.normalized_shape, self.weight, self.bias, self.eps)
        return pack(mean, var)
