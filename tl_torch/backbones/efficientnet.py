"""EfficientNetB0 (no top) as Keras 3 builds it.

``keras.applications.EfficientNetB0(include_top=False)``: 237 layers with ``weights=None`` or a
file, 238 with ``weights="imagenet"`` (see ``imagenet_rescaling``); a ``(N, 3, H, W)`` image in
[0, 255] becomes ``(N, 1280, ceil(H/32), ceil(W/32))``.

What decides whether outputs match Keras:
- the input scaling is inside the model: ``Rescaling(1/255)`` -> ``Normalization`` (its mean,
  variance and count are weights of the file; it divides by the square root of the variance) ->
  only when Keras is built with ``weights="imagenet"``, one more ``Rescaling(1/sqrt(std))`` per
  channel (Keras' correction for TensorFlow issue 49930). Pixels go in as they are
  (``efficientnet.preprocess_input`` is the identity);
- stride-2 convolutions (the stem and depthwise) behind ``ZeroPadding2D(correct_pad)`` with
  ``valid`` padding (TF "same"); stride-1 depthwise ``same`` (symmetric for odd kernels);
- swish everywhere; BatchNorm with Keras' defaults (``eps=1e-3, momentum=0.99``);
- squeeze-and-excitation to ``max(1, int(filters_in * 0.25))`` channels, a quarter of the block's
  *input* filters, not of its expanded ones; the SE convolutions carry their activations;
- every residual block but the first ends in ``Dropout(rate, noise_shape=(None, 1, 1, 1))``
  (stochastic depth), inactive under the recipe's inference-mode base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tl_torch.backbones.base import KerasBase, LayerLookup
from tl_torch.backbones.layers import (
    Activation,
    Conv2dAct,
    GlobalAveragePooling2D,
    Multiply,
    Normalization,
    Rescaling,
    Reshape,
    StochasticDepth,
)
from tl_torch.model import Add, Block
from tl_torch.padding import Pad2d

#: Keras' ``BatchNormalization()`` defaults; torch's momentum is 1 - Keras'.
BN_EPS = 1e-3
BN_MOMENTUM = 0.99
#: ``IMAGENET_STDDEV_RGB`` of keras.applications.efficientnet.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
STEM_FILTERS = 32
TOP_FILTERS = 1280
SE_RATIO = 0.25
#: ``drop_connect_rate``: block b of B drops with rate 0.2 * b / B.
DROP_CONNECT_RATE = 0.2
#: Stages of B0 (width and depth coefficients 1.0): kernel, repeats, filters in, filters out,
#: expansion, first stride.
STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)


def se_filters(filters_in: int, expanded: int) -> int:
    """The squeeze width: a quarter of the block's input filters (``expanded`` is not used:
    naming it here keeps the choice visible)."""
    del expanded
    return max(1, int(filters_in * SE_RATIO))


@dataclass(frozen=True)
class _Unit:
    """One block for ``forward``: layers before the SE, the SE's five, those after, the Add."""

    head: tuple[str, ...]
    se: tuple[str, ...]
    tail: tuple[str, ...]
    add: str | None


class EfficientNetB0Base(KerasBase):
    """EfficientNetB0 without its classifier; ``(N, 3, H, W)`` pixels in [0, 255] ->
    ``(N, 1280, ceil(H/32), ceil(W/32))``.

    ``imagenet_rescaling``: the extra ``Rescaling(1/sqrt(std))`` that Keras inserts only for
    ``weights="imagenet"`` (it moves every later layer's index by one); give it for a Keras model
    built that way, leave it off for ``weights=None`` or a file.
    """

    KERAS_NAME = "EfficientNetB0"

    def __init__(self, *, imagenet_rescaling: bool = False) -> None:
        super().__init__()
        self.imagenet_rescaling = imagenet_rescaling
        self._units: list[_Unit] = []
        stem = [self.add_layer("rescaling", "Rescaling", Rescaling(1.0 / 255.0)),
                self.add_layer("normalization", "Normalization", Normalization(3))]
        if imagenet_rescaling:
            stem.append(self.add_layer("rescaling_1", "Rescaling", Rescaling(
                [1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB])))
        stem += [self.add_layer("stem_conv_pad", "ZeroPadding2D", Pad2d(3, 2)),
                 self.add_layer("stem_conv", "Conv2D", nn.Conv2d(3, STEM_FILTERS, 3, stride=2,
                                                                 bias=False)),
                 self._bn("stem_bn", STEM_FILTERS),
                 self.add_layer("stem_activation", "Activation", Activation("swish"))]
        self._stem = tuple(stem)
        total = sum(stage[1] for stage in STAGES)
        b = 0
        for i, (kernel, repeats, fin, fout, expansion, stride) in enumerate(STAGES):
            for j in range(repeats):
                self._block(f"block{i + 1}{chr(j + 97)}_", DROP_CONNECT_RATE * b / total,
                            fout if j else fin, fout, kernel, 1 if j else stride, expansion)
                b += 1
        self._top = (self.add_layer("top_conv", "Conv2D", nn.Conv2d(320, TOP_FILTERS, 1, bias=False)),
                     self._bn("top_bn", TOP_FILTERS),
                     self.add_layer("top_activation", "Activation", Activation("swish")))
        self.eval()

    def _bn(self, name: str, channels: int) -> str:
        return self.add_layer(name, "BatchNormalization",
                              nn.BatchNorm2d(channels, eps=BN_EPS, momentum=1 - BN_MOMENTUM))

    def _squeeze_excite(self, name: str, filters_in: int, filters: int) -> tuple[str, ...]:
        reduced = se_filters(filters_in, filters)
        return (self.add_layer(f"{name}se_squeeze", "GlobalAveragePooling2D", GlobalAveragePooling2D()),
                self.add_layer(f"{name}se_reshape", "Reshape", Reshape()),
                self.add_layer(f"{name}se_reduce", "Conv2D",
                               Conv2dAct(filters, reduced, 1, activation="swish")),
                self.add_layer(f"{name}se_expand", "Conv2D",
                               Conv2dAct(reduced, filters, 1, activation="sigmoid")),
                self.add_layer(f"{name}se_excite", "Multiply", Multiply()))

    def _block(self, name: str, drop_rate: float, fin: int, fout: int, kernel: int, stride: int,
               expansion: int) -> None:
        filters = fin * expansion
        head: list[str] = []
        if expansion != 1:
            head += [self.add_layer(f"{name}expand_conv", "Conv2D", nn.Conv2d(fin, filters, 1, bias=False)),
                     self._bn(f"{name}expand_bn", filters),
                     self.add_layer(f"{name}expand_activation", "Activation", Activation("swish"))]
        if stride == 2:
            head.append(self.add_layer(f"{name}dwconv_pad", "ZeroPadding2D", Pad2d(kernel, 2)))
        head += [self.add_layer(f"{name}dwconv", "DepthwiseConv2D", nn.Conv2d(
                     filters, filters, kernel, stride=stride,
                     padding=kernel // 2 if stride == 1 else 0, groups=filters, bias=False)),
                 self._bn(f"{name}bn", filters),
                 self.add_layer(f"{name}activation", "Activation", Activation("swish"))]
        squeeze = self._squeeze_excite(name, fin, filters)
        tail = [self.add_layer(f"{name}project_conv", "Conv2D", nn.Conv2d(filters, fout, 1, bias=False)),
                self._bn(f"{name}project_bn", fout)]
        add = None
        if stride == 1 and fin == fout:
            if drop_rate > 0:
                tail.append(self.add_layer(f"{name}drop", "Dropout", StochasticDepth(drop_rate)))
            add = self.add_layer(f"{name}add", "Add", Add())
        self._units.append(_Unit(tuple(head), squeeze, tuple(tail), add))
        self._blocks.append(Block(tuple(head) + squeeze + tuple(tail), add))

    # ---- forward -------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] pixels -> the model's input: unchanged (Rescaling and Normalization are the
        first layers; Keras' ``efficientnet.preprocess_input`` is the identity)."""
        return images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.layer)

    def run(self, x: torch.Tensor, layer: LayerLookup) -> torch.Tensor:
        """The forward pass with each Keras layer taken from ``layer(name)``."""
        for name in self._stem:
            x = layer(name)(x)
        for unit in self._units:
            shortcut = x
            for name in unit.head:
                x = layer(name)(x)
            squeeze, reshape, reduce, expand, excite = (layer(n) for n in unit.se)
            x = excite(x, expand(reduce(reshape(squeeze(x)))))
            for name in unit.tail:
                x = layer(name)(x)
            if unit.add is not None:
                x = layer(unit.add)(x, shortcut)   # Keras: add([x, inputs])
        for name in self._top:
            x = layer(name)(x)
        return x

    def extra_repr(self) -> str:
        return f"imagenet_rescaling={self.imagenet_rescaling}"
