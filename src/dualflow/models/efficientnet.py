"""EfficientNet-B0 (Tan & Le 2019), following the Keras reference implementation."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dualflow import nn as dnn
from dualflow.models.blocks import ACT_GAINS, LayerFactory, SqueezeExcite, finish_skip_gains

__all__ = ["B0_STAGES", "build_efficientnet"]

#: ``(kernel, repeats, filters_in, filters_out, expand_ratio, stride)`` of the seven stages
#: of EfficientNet-B0 (Keras ``DEFAULT_BLOCKS_ARGS``; squeeze-excite ratio 0.25 everywhere).
B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Keras ``round_filters``: scale by ``width`` and round to a multiple of ``divisor``."""
    filters = filters * width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def _round_repeats(repeats: int, depth: float) -> int:
    return math.ceil(depth * repeats)


class MBConv(dnn.Module):
    """Mobile inverted bottleneck with squeeze-excite (Keras ``block``).

    ``[expand 1x1 -> BN -> SiLU] -> depthwise kxk (stride) -> BN -> SiLU -> SE -> project 1x1
    -> BN``, plus the identity shortcut when the stride is 1 and the widths agree.
    Normalisation-free variant: no BatchNorm, biases on the convolutions, a learnable gain
    (initialised at ``skip_init``; default ``1/sqrt(L)``, see :mod:`dualflow.models.resnet`)
    on the residual branch and a gate of ``2 sigmoid`` in the
    squeeze-excite (see :class:`SqueezeExcite`). The depthwise convolution is a grouped
    :class:`dualflow.nn.Conv2d` (``groups = channels``).
    """

    def __init__(
        self,
        make: LayerFactory,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        expand: int,
        se_ratio: float,
        skip_init: float,
    ) -> None:
        super().__init__()
        mid = cin * expand
        layers: list = []
        if expand != 1:
            layers += [make.conv(cin, mid, 1, padding=0, gain=1.0), make.norm2d(mid), make.act("silu")]
        layers += [
            make.conv(mid, mid, kernel, stride, groups=mid, gain=ACT_GAINS["silu"]),
            make.norm2d(mid),
            make.act("silu"),
        ]
        if se_ratio > 0:
            reduced = max(1, int(cin * se_ratio))
            layers.append(SqueezeExcite(mid, reduced, make, gate_scale=1.0 if make.normalized else 2.0))
        layers += [make.conv(mid, cout, 1, padding=0, gain=ACT_GAINS["silu"]), make.norm2d(cout)]
        self.residual = stride == 1 and cin == cout
        if self.residual:
            # Keras applies dropout ("drop connect" rate) on the branch before the sum.
            layers += [make.skip_scale(skip_init)]
        self.branch = dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)])
        self.add = dnn.Add()

    def forward(self, x):  # type: ignore[override]
        y = self.branch(x)
        return self.add(y, x) if self.residual else y


def build_efficientnet(
    make: LayerFactory,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
    stem_stride: int | None = None,
    stage_strides: Sequence[int] | None = None,
    se_ratio: float = 0.25,
    skip_init: float | None = None,
) -> dnn.Sequential:
    """EfficientNet-B0: stem 3x3 conv (32) -> 16 MBConv blocks in 7 stages -> 1x1 conv (1280)
    -> global average pooling -> (dropout 0.2 in the reference) -> linear classifier.
    Activation SiLU (swish) everywhere, moments by Gauss-Hermite quadrature.

    The paper (appendix E.1.3) ran the Keras model on CIFAR images resized to 224x224,
    i.e. with the full 32x downsampling. For native small inputs the strides default to an
    8x downsampling instead (``stem_stride=1`` and the first stride-2 stage at stride 1
    when ``image_size < 128``; 32 -> 4x4 final maps), which costs about as much as
    224-pixel inputs would cost divided by 10, and keeps every parameter shape (the
    parameter count is the one of B0: 4.02M for 10 classes, 5.29M for 1000). Pass
    ``stem_stride=2, stage_strides=(1, 2, 2, 2, 1, 2, 1)`` for the reference strides.
    ``width_mult``/``depth_mult`` scale the widths/repeats as EfficientNet's compound
    scaling (1.0/1.0 is B0).
    """
    small = image_size < 128
    if stem_stride is None:
        stem_stride = 1 if small else 2
    if stage_strides is None:
        stage_strides = (1, 1, 2, 2, 1, 2, 1) if small else tuple(s[5] for s in B0_STAGES)
    if len(stage_strides) != len(B0_STAGES):
        raise ValueError(f"efficientnet: stage_strides needs {len(B0_STAGES)} entries")
    total = stem_stride * math.prod(stage_strides)
    if image_size % total:
        raise ValueError(
            f"efficientnet: image_size must be divisible by the total stride {total}, got {image_size}"
        )
    stem = _round_filters(32, width_mult)
    layers: list = [
        make.conv(in_channels, stem, 3, stem_stride, gain=1.0),
        make.norm2d(stem),
        make.act("silu"),
    ]
    cin = stem
    for (k, r, _fi, fo, e, _s), s in zip(B0_STAGES, stage_strides):
        cout = _round_filters(fo, width_mult)
        for i in range(_round_repeats(r, depth_mult)):
            layers.append(MBConv(make, cin, cout, k, s if i == 0 else 1, e, se_ratio, skip_init))
            cin = cout
    top = _round_filters(1280, width_mult)
    layers += [
        make.conv(cin, top, 1, padding=0, gain=1.0),
        make.norm2d(top),
        make.act("silu"),
        dnn.GlobalAvgPool2d(),
        make.dropout(),
        make.linear(top, num_classes, bias=True, gain=ACT_GAINS["silu"]),
    ]
    return finish_skip_gains(
        dnn.Sequential(*[m for m in layers if not isinstance(m, dnn.Identity)]), skip_init
    )
