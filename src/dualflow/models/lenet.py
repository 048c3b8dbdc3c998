"""LeNet-5-style convolutional network (LeCun et al. 1998) with ReLU and max pooling."""

from __future__ import annotations

from collections.abc import Sequence

from dualflow import nn as dnn
from dualflow.models.blocks import ACT_GAINS, LayerFactory

__all__ = ["build_lenet5"]


def build_lenet5(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    channels: Sequence[int] = (6, 16),
    hidden: Sequence[int] = (120, 84),
    padding: int | None = None,
    pool: str = "max",
) -> dnn.Sequential:
    """``conv5x5(6) -> pool2 -> ReLU -> conv5x5(16) -> pool2 -> ReLU -> fc120 -> ReLU -> fc84 -> ReLU -> fc``.

    The LeNet-5 layout with ReLU activations and 2x2 max pooling (the common modern form).
    The first convolution pads by ``padding`` (default: 2 for 28x28 inputs, so that MNIST is
    seen as the 32x32 input of the original, else 0): 61,706 parameters for 1x28x28 and
    62,006 for 3x32x32 inputs with 10 classes. The normalised variant puts BatchNorm after
    every convolution and hidden linear layer.

    Max pooling is applied to the pre-activations (before the ReLU): the same function as
    pooling after the ReLU, with far more accurate moments (:mod:`dualflow.nn.rewrite`).
    ``pool="avg"`` uses exact average pooling after the ReLU instead.
    """
    if len(channels) != 2 or len(hidden) != 2:
        raise ValueError(f"lenet5: channels and hidden need 2 entries each, got {channels}, {hidden}")
    if pool not in ("max", "avg"):
        raise ValueError(f"lenet5: pool must be 'max' or 'avg', got {pool!r}")
    pad = (2 if image_size == 28 else 0) if padding is None else int(padding)
    side = (image_size + 2 * pad - 4) // 2
    side = (side - 4) // 2
    if side < 1 or pad < 0:
        raise ValueError(
            f"lenet5: image_size {image_size} with padding {pad} is too small for two 5x5 convolutions "
            "and two 2x2 poolings (need image_size + 2 padding >= 16)"
        )
    c1, c2 = (int(c) for c in channels)
    h1, h2 = (int(h) for h in hidden)

    def stage(cin: int, cout: int, gain: float, conv_pad: int) -> list:
        layers = [make.conv(cin, cout, 5, padding=conv_pad, gain=gain), make.norm2d(cout)]
        if pool == "max":  # max pooling commutes with ReLU: pool the pre-activations
            return [*layers, dnn.MaxPool2d(2), make.act("relu")]
        return [*layers, make.act("relu"), dnn.AvgPool2d(2)]

    layers: list = [
        *stage(in_channels, c1, 1.0, pad),
        *stage(c1, c2, ACT_GAINS["relu"], 0),
        dnn.Flatten(1),
        make.linear(c2 * side * side, h1),
        make.norm1d(h1),
        make.act("relu"),
        make.linear(h1, h2),
        make.norm1d(h2),
        make.act("relu"),
        make.dropout(),
        make.linear(h2, num_classes),
    ]
    return dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)])
