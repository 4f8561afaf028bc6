"""The floating-point work of MobileNetV2's base, counted from its layer shapes.

Counted: every convolution (the first 3x3, the 1x1 expansions and projections, the 3x3 depthwise
convolutions, the last 1x1), as 2 x multiply-accumulates: ``2 * H_out * W_out * C_out * k * k *
C_in / groups``. Not counted: BatchNorm (folded into the convolutions where frozen), ReLU6, the
residual adds, padding and preprocessing, which are elementwise, memory-bound and together under
1 % of the total. Shapes follow Keras' base: TF "same" padding, so a stride-2 layer gives
``ceil(size / 2)``. At 160x160 the base does 2 x 152.8 M MACs = 0.3056 GFLOP per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tl_common.mobilenet_v2 import FIRST_FILTERS, INVERTED_RESIDUAL_SETTING, LAST_FILTERS


@dataclass(frozen=True)
class ConvShape:
    """One convolution of the base: Keras name, kernel, channels, groups and output size."""

    name: str
    kernel: int
    c_in: int
    c_out: int
    groups: int
    out_h: int
    out_w: int

    @property
    def macs(self) -> int:
        return self.out_h * self.out_w * self.c_out * self.kernel * self.kernel * self.c_in // self.groups

    @property
    def flops(self) -> int:
        return 2 * self.macs


def base_convolutions(image_size: int) -> list[ConvShape]:
    """The 52 convolutions of ``MobileNetV2(include_top=False)`` for square ``image_size`` inputs."""
    if image_size < 32:
        raise ValueError(f"image_size={image_size!r}: MobileNetV2 needs at least 32 pixels")
    size = math.ceil(image_size / 2)
    convs = [ConvShape("Conv1", 3, 3, FIRST_FILTERS, 1, size, size)]
    c_in, block_id = FIRST_FILTERS, 0
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
            hidden = c_in * t
            if t != 1:
                convs.append(ConvShape(f"{prefix}expand", 1, c_in, hidden, 1, size, size))
            size = math.ceil(size / stride)
            convs.append(ConvShape(f"{prefix}depthwise", 3, hidden, hidden, hidden, size, size))
            convs.append(ConvShape(f"{prefix}project", 1, hidden, c, 1, size, size))
            c_in, block_id = c, block_id + 1
    convs.append(ConvShape("Conv_1", 1, c_in, LAST_FILTERS, 1, size, size))
    return convs


def base_flops_per_image(image_size: int) -> int:
    """2 x MACs of every convolution of the base, for one ``image_size`` x ``image_size`` image."""
    return sum(conv.flops for conv in base_convolutions(image_size))
