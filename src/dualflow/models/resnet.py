"""CIFAR ResNets (He et al. 2016, 6n+2 layers, option-A shortcuts) and Wide ResNets
(Zagoruyko & Komodakis 2016).

Normalisation-free variants (``normalization="none"``) drop every BatchNorm, give the
convolutions a bias, and multiply each residual branch by a learnable scalar gain ``a``
(SkipInit, De & Smith 2020; ReZero, Bachlechner et al. 2021), initialised by default at
``1/sqrt(L)`` for ``L`` residual branches (``skip_init=None``; a number sets every gain to
it). Why: without BatchNorm nothing shrinks the residual branches, so the second moment of
``x + f(x)`` roughly doubles per block and a 56-layer network starts with exploding,
input-independent activations. With ``a = 1/sqrt(L)`` each of the ``L`` blocks adds about
``1/L`` of the stream's second moment, a growth bounded by ``e`` whatever the depth (the
``1/sqrt(L)`` scaling of Stable ResNet, Hayou et al. 2021), while every branch still gets a
gradient from the first step. The gain acts on mean *and* variance (``(a m, a^2 v)``), so
it also bounds the weight-noise variance the Bayesian branches inject, which a Fixup-style
zero initialisation of the last weight means would not switch off.

``skip_init=0`` is SkipInit exactly (every block the identity at initialisation); measured
on MNIST (ResNet-20, point weights, 1600 images, batch 32, 200 steps) it sits on a plateau
that ``1/sqrt(L)`` avoids: test error 0.42 (Adam 2e-3) / 0.74 (SGD 0.02) for ``a = 0``
against 0.14 / 0.15 for ``a = 1/sqrt(L)`` (0.05 / 0.07 with BatchNorm). The normalised
variants are the published architectures with BatchNorm and no gains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualflow import nn as dnn
from dualflow.models.blocks import ChannelPadShortcut, LayerFactory, finish_skip_gains

__all__ = ["build_resnet", "build_wrn"]


def _basic_block(make: LayerFactory, cin: int, cout: int, stride: int, skip_init: float) -> torch.nn.Module:
    """Post-activation basic block: ``relu(shortcut(x) + a * bn(conv(relu(bn(conv(x))))))``."""
    branch = [
        make.conv(cin, cout, 3, stride),
        make.norm2d(cout),
        make.act("relu"),
        make.conv(cout, cout, 3),
        make.norm2d(cout),
        make.skip_scale(skip_init),
    ]
    branch = [m for m in branch if not isinstance(m, dnn.Identity)]
    shortcut = ChannelPadShortcut(cin, cout, stride) if (stride != 1 or cin != cout) else None
    return dnn.Sequential(dnn.Residual(dnn.Sequential(*branch), shortcut), make.act("relu"))


def build_resnet(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int = 20,
    widths: Sequence[int] = (16, 32, 64),
    skip_init: float | None = None,
) -> dnn.Sequential:
    """CIFAR ResNet with ``depth = 6n + 2`` layers (He et al. 2016, section 4.2).

    A 3x3 conv with ``widths[0]`` filters, three stages of ``n`` basic blocks on
    ``widths`` filters (the first block of stages 2 and 3 has stride 2), global average
    pooling and a linear classifier. Shortcuts are identities, and where the shape changes,
    "option A": subsampling plus zero-padded channels (no parameters), applied identically
    to the mean and the variance. ResNet-20: 0.27M parameters, ResNet-56: 0.85M.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"resnet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}"
        )
    if len(widths) != 3:
        raise ValueError(f"resnet: widths must have 3 entries, got {tuple(widths)}")
    n = (depth - 2) // 6
    w0 = int(widths[0])
    layers: list = [make.conv(in_channels, w0, 3, gain=1.0), make.norm2d(w0), make.act("relu")]
    cin = w0
    for stage, w in enumerate(widths):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(_basic_block(make, cin, int(w), stride, skip_init))
            cin = int(w)
    layers += [dnn.GlobalAvgPool2d(), make.dropout(), make.linear(cin, num_classes, bias=True)]
    return finish_skip_gains(
        dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)]), skip_init
    )


def _wide_block(make: LayerFactory, cin: int, cout: int, stride: int, skip_init: float) -> torch.nn.Module:
    """Pre-activation wide block ``B(3,3)``: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, with a
    1x1 convolution shortcut (on the pre-activated input) where the shape changes."""
    pre = dnn.Sequential(
        *[m for m in (make.norm2d(cin), make.act("relu")) if not isinstance(m, dnn.Identity)]
    )
    branch = [
        make.conv(cin, cout, 3, stride),
        make.norm2d(cout),
        make.act("relu"),
        make.dropout(),
        make.conv(cout, cout, 3),
        make.skip_scale(skip_init),
    ]
    branch = dnn.Sequential(*[m for m in branch if not isinstance(m, dnn.Identity)])
    if stride != 1 or cin != cout:
        # the projection shortcut reads the pre-activated input (as the reference code)
        shortcut = make.conv(cin, cout, 1, stride, padding=0, bias=False)
        return dnn.Sequential(pre, dnn.Residual(branch, shortcut))
    return dnn.Residual(dnn.Sequential(pre, *branch))


def build_wrn(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int = 28,
    widen_factor: int = 10,
    skip_init: float | None = None,
) -> dnn.Sequential:
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016, Table 1).

    conv1 3x3 with 16 filters; three groups of ``N = (depth - 4) / 6`` pre-activation
    blocks on ``16k, 32k, 64k`` filters (strides 1, 2, 2); BN-ReLU, global average pooling
    and a linear classifier. Dropout (``dropout=0.3`` in the paper) sits between the two
    convolutions of each block. WRN-28-10: 36.5M parameters.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wrn: depth must be 6N+4 with N >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"wrn: widen_factor must be >= 1, got {widen_factor}")
    n = (depth - 4) // 6
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    layers: list = [make.conv(in_channels, 16, 3, gain=1.0)]
    cin = 16
    for stage, w in enumerate(widths):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(_wide_block(make, cin, w, stride, skip_init))
            cin = w
    layers += [
        make.norm2d(cin),
        make.act("relu"),
        dnn.GlobalAvgPool2d(),
        make.linear(cin, num_classes, bias=True),
    ]
    return finish_skip_gains(
        dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)]), skip_init
    )
