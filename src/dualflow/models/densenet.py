"""DenseNet-BC for CIFAR (Huang et al. 2017; the paper's appendix E.1.1)."""

from __future__ import annotations

import math

from dualflow import nn as dnn
from dualflow.models.blocks import DenseLayer, LayerFactory

__all__ = ["build_densenet_bc"]


def _clean(*mods):  # drop Identity placeholders (normalisation-free / no dropout)
    return [m for m in mods if not isinstance(m, dnn.Identity)]


def build_densenet_bc(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    bottleneck_width: int = 4,
) -> dnn.Sequential:
    """DenseNet-BC (bottleneck + compression) with three dense blocks.

    A 3x3 conv with ``2 k`` filters, three dense blocks of ``(depth - 4) / 6`` bottleneck
    layers ``BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k)`` whose outputs are concatenated to
    their inputs, transitions ``BN-ReLU-Conv1x1(floor(compression C))-AvgPool2``
    between blocks, then BN-ReLU, global average pooling and a linear classifier.
    Dropout (if ``dropout > 0``; 0.2 in the paper without augmentation) follows every
    convolution except the first. DenseNet-BC-100-12: 0.77M parameters ("0.8M").

    Normalisation-free: the BatchNorms are dropped and convolutions get a bias. No residual
    sums exist to tame: each layer's input is a concatenation, whose second moment the He
    second-moment initialisation of the 1x1 bottleneck keeps at the scale of its parts.
    The average pooling of the transitions is exact on moments.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"densenet_bc: depth must be 6n+4 with n >= 1 (e.g. 100, 190, 250), got {depth}")
    if image_size % 4:
        raise ValueError(
            f"densenet_bc: image_size must be divisible by 4 (two transitions), got {image_size}"
        )
    n = (depth - 4) // 6
    k = int(growth_rate)
    c = 2 * k
    layers: list = [make.conv(in_channels, c, 3, gain=1.0)]
    for b in range(3):
        for _ in range(n):
            inner = bottleneck_width * k
            block = dnn.Sequential(
                *_clean(
                    make.norm2d(c),
                    make.act("relu"),
                    make.conv(c, inner, 1, padding=0),
                    make.dropout(),
                    make.norm2d(inner),
                    make.act("relu"),
                    make.conv(inner, k, 3),
                    make.dropout(),
                )
            )
            layers.append(DenseLayer(block))
            c += k
        if b < 2:
            cout = math.floor(compression * c)
            layers += _clean(
                make.norm2d(c),
                make.act("relu"),
                make.conv(c, cout, 1, padding=0),
                make.dropout(),
                dnn.AvgPool2d(2),
            )
            c = cout
    layers += _clean(make.norm2d(c), make.act("relu"), dnn.GlobalAvgPool2d(), make.linear(c, num_classes))
    return dnn.Sequential(*layers)
