"""Multilayer perceptron on flattened images, and VGG16 for CIFAR."""

from __future__ import annotations

from collections.abc import Sequence

from dualflow import nn as dnn
from dualflow.models.blocks import ACT_GAINS, LayerFactory

__all__ = ["build_mlp", "build_vgg"]


def build_mlp(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int = 400,
    depth: int = 2,
) -> dnn.Sequential:
    """``Flatten -> [Linear(width) -> (BatchNorm1d) -> ReLU] x depth -> Linear(num_classes)``.

    Defaults: two hidden layers of 400 units (the MNIST MLP of Blundell et al. 2015).
    Normalisation-free: nothing else is needed at this depth (the He second-moment
    initialisation keeps the activation scale).
    """
    if depth < 0 or width < 1:
        raise ValueError(f"mlp: need depth >= 0 and width >= 1, got depth={depth}, width={width}")
    layers: list = [dnn.Flatten(1)]
    fin = in_channels * image_size * image_size
    for i in range(depth):
        layers += [
            make.linear(fin, width, bias=True, gain=1.0 if i == 0 else ACT_GAINS["relu"]),
            make.norm1d(width),
            make.act("relu"),
            make.dropout(),
        ]
        fin = width
    layers.append(make.linear(fin, num_classes, bias=True, gain=1.0 if depth == 0 else ACT_GAINS["relu"]))
    return dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)])


#: Channels per block of VGG16 (configuration "D" of Simonyan & Zisserman 2015).
VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_BLOCKS = (2, 2, 3, 3, 3)


def build_vgg(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float = 1.0,
    blocks: Sequence[int] = VGG16_BLOCKS,
    channels: Sequence[int] = VGG16_CHANNELS,
    pool: str = "max",
) -> dnn.Sequential:
    """VGG16 for 32x32 inputs, as used for CIFAR-10 by Wen et al. (2018, Flipout).

    Five blocks of 3x3 convolutions (``blocks`` convolutions each, ``channels`` wide, times
    ``width``), each conv followed by BatchNorm (normalised variant) and ReLU, each block by
    2x2 max pooling; then ``Flatten`` and one linear classifier on the 512 features (the
    CIFAR form of VGG16: 13 conv layers + 1 linear, 14.7M parameters with BatchNorm). The
    TensorFlow-Probability ``bayesian_vgg`` example derived from that paper uses two
    convolutions per block: ``blocks=(2, 2, 2, 2, 2)``.

    Max pooling (``pool="max"``) is applied to the pre-activations, before the ReLU of the
    block's last convolution: the same function as pooling after it (``max`` commutes with
    ``relu``), with far more accurate moments (:mod:`dualflow.nn.rewrite`). The pool uses
    Clark's maxima with the window correlations implied by the convolution
    (:class:`dualflow.nn.MaxPool2d`). ``pool="avg"`` uses exact average pooling after the
    ReLU instead (average pooling does not commute with it).
    """
    if len(blocks) != len(channels):
        raise ValueError("vgg: blocks and channels must have the same length")
    n_pool = len(blocks)
    if image_size % (2**n_pool):
        raise ValueError(
            f"vgg: image_size must be divisible by {2**n_pool} ({n_pool} poolings), got {image_size}"
        )
    if pool not in ("max", "avg"):
        raise ValueError(f"vgg: pool must be 'max' or 'avg', got {pool!r}")
    layers: list = []
    cin = in_channels
    first = True
    for n, c in zip(blocks, channels):
        c = max(1, round(c * width))
        for i in range(n):
            layers += [make.conv(cin, c, 3, gain=1.0 if first else ACT_GAINS["relu"]), make.norm2d(c)]
            if i == n - 1 and pool == "max":
                # max pooling commutes with ReLU: pool the pre-activations (same function,
                # accurate moments; dualflow.nn.rewrite)
                layers.append(dnn.MaxPool2d(2))
            layers.append(make.act("relu"))
            cin, first = c, False
        if pool == "avg":
            layers.append(dnn.AvgPool2d(2))
    side = image_size // 2**n_pool
    layers += [dnn.Flatten(1), make.dropout(), make.linear(cin * side * side, num_classes, bias=True)]
    return dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)])
