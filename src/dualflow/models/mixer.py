"""MLP-Mixer (Tolstikhin et al. 2021) for small images."""

from __future__ import annotations

import torch

from dualflow import nn as dnn
from dualflow.models.blocks import ACT_GAINS, LayerFactory, TokenMean, Transpose, finish_skip_gains

__all__ = ["build_mixer"]


def _mlp(make: LayerFactory, dim: int, hidden: int) -> list[torch.nn.Module]:
    return [
        make.linear(dim, hidden, bias=True, gain=1.0),
        make.act("gelu"),
        make.dropout(),
        make.linear(hidden, dim, bias=True, gain=ACT_GAINS["gelu"]),
    ]


def _norm(make: LayerFactory, dim: int) -> torch.nn.Module:
    return dnn.LayerNorm(dim) if make.normalized else dnn.Identity()


def _clean(mods):
    return [m for m in mods if not isinstance(m, dnn.Identity)]


def build_mixer(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    patch_size: int = 4,
    hidden_dim: int = 512,
    depth: int = 8,
    tokens_mlp_dim: int = 256,
    channels_mlp_dim: int = 2048,
    skip_init: float | None = None,
) -> dnn.Sequential:
    """MLP-Mixer; the defaults are Mixer-S (hidden 512, 8 layers, token MLP 256, channel MLP
    2048) with ``patch_size`` 4 for 32x32 inputs (64 tokens; the paper's S/16 on 224x224
    inputs has 196 tokens).

    ``patch_size x patch_size`` patches embedded by a strided convolution, then ``depth``
    blocks ``x + TokenMLP(LN(x)^T)^T`` and ``x + ChannelMLP(LN(x))`` (token mixing acts on
    the transposed ``(B, C, T)`` tensor), a final LayerNorm, the mean over tokens and a
    linear head. GELU moments by Gauss-Hermite quadrature; LayerNorm uses the statistics of
    the means (:class:`dualflow.nn.LayerNorm`).

    Normalised variant (``normalization="batch"`` or ``"layer"``): the LayerNorms of the
    paper. Normalisation-free variant: no LayerNorm, and a learnable gain (initialised
    at ``skip_init``; default ``1/sqrt(2 depth)``, see :mod:`dualflow.models.resnet`) on each of
    the ``2 depth`` residual branches.
    """
    if image_size % patch_size:
        raise ValueError(f"mixer: image_size {image_size} is not divisible by patch_size {patch_size}")
    tokens = (image_size // patch_size) ** 2
    c = int(hidden_dim)
    layers: list = [
        dnn.Conv2d(
            in_channels,
            c,
            patch_size,
            patch_size,
            0,
            bias=True,
            bayes=make.bayes,
            prior_var=make.prior_var,
            init_var_ratio=make.init_var_ratio,
            gain=1.0,
        ),
        dnn.Flatten(2),  # (B, C, T)
        Transpose(1, 2),  # (B, T, C)
    ]
    for _ in range(depth):
        token_branch = _clean(
            [
                _norm(make, c),
                Transpose(1, 2),
                *_mlp(make, tokens, tokens_mlp_dim),
                Transpose(1, 2),
                make.skip_scale(skip_init),
            ]
        )
        channel_branch = _clean(
            [_norm(make, c), *_mlp(make, c, channels_mlp_dim), make.skip_scale(skip_init)]
        )
        layers += [dnn.Residual(dnn.Sequential(*token_branch)), dnn.Residual(dnn.Sequential(*channel_branch))]
    layers += _clean([_norm(make, c), TokenMean(1), make.linear(c, num_classes, bias=True, gain=1.0)])
    return finish_skip_gains(dnn.Sequential(*layers), skip_init)
