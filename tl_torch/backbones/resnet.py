"""ResNet50 (v1, no top) as Keras 3 builds it.

``keras.applications.ResNet50(include_top=False)``: 175 layers, the InputLayer included; a
``(N, 3, H, W)`` image, after :meth:`ResNet50Base.preprocess`, becomes ``(N, 2048, H/32, W/32)``
for sizes divisible by 32 (the stem's ``valid`` convolution and pooling round down elsewhere).

What decides whether outputs match Keras:
- the stem: ``ZeroPadding2D(3)`` -> 7x7 stride-2 ``valid`` convolution *with bias* -> BatchNorm
  ``eps=1.001e-5`` -> ReLU -> ``ZeroPadding2D(1)`` -> 3x3 stride-2 max-pool;
- bottlenecks (v1): the stride sits on the *first* 1x1 convolution and on the shortcut's 1x1
  convolution (torchvision's ResNet, "v1.5", puts it on the 3x3); every convolution has a bias;
  BatchNorm ``eps=1.001e-5, momentum=0.99``;
- Keras lists a downsampling block's layers as ``_1`` conv/bn/relu, ``_2`` conv/bn/relu, then
  ``_0_conv, _3_conv, _0_bn, _3_bn`` (the shortcut interleaved), ``_add``, ``_out``;
- preprocessing "caffe" (``resnet50.preprocess_input``): RGB -> BGR, the ImageNet means
  (103.939, 116.779, 123.68 in BGR order) subtracted, no scaling.
"""

from __future__ import annotations

import torch
from torch import nn

from tl_common.keras_inputs import CAFFE_MEAN_BGR  # BGR means subtracted after the flip
from tl_torch.backbones.base import KerasBase, LayerLookup, ResidualLookup
from tl_torch.backbones.layers import Activation
from tl_torch.model import Add, Block

BN_EPS = 1.001e-5
BN_MOMENTUM = 0.99
STEM_FILTERS = 64
#: Stacks conv2..conv5: bottleneck filters, blocks, first block's stride.
STACKS = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
EXPANSION = 4


def bottleneck_strides(stride: int) -> tuple[int, int]:
    """(first 1x1, 3x3) strides of a bottleneck: v1 strides the first 1x1 convolution."""
    return stride, 1


def caffe(images: torch.Tensor) -> torch.Tensor:
    """RGB [0, 255] -> BGR minus the ImageNet means (``preprocess_input``, mode "caffe")."""
    mean = torch.tensor(CAFFE_MEAN_BGR, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images.flip(1) - mean


class ResNet50Base(KerasBase):
    """ResNet50 (v1) without its classifier; ``(N, 3, H, W)`` caffe-preprocessed ->
    ``(N, 2048, H/32, W/32)`` for sizes divisible by 32."""

    KERAS_NAME = "ResNet50"

    def __init__(self) -> None:
        super().__init__()
        self._stem = (self.add_layer("conv1_pad", "ZeroPadding2D", nn.ZeroPad2d(3)),
                      self.add_layer("conv1_conv", "Conv2D", nn.Conv2d(3, STEM_FILTERS, 7, stride=2)),
                      self._bn("conv1_bn", STEM_FILTERS),
                      self.add_layer("conv1_relu", "Activation", Activation("relu")),
                      self.add_layer("pool1_pad", "ZeroPadding2D", nn.ZeroPad2d(1)),
                      self.add_layer("pool1_pool", "MaxPooling2D", nn.MaxPool2d(3, stride=2)))
        self._units: list[tuple[tuple[str, ...], tuple[str, ...], str, str]] = []
        cin = STEM_FILTERS
        for stack, (filters, blocks, stride) in enumerate(STACKS, start=2):
            for i in range(1, blocks + 1):
                self._bottleneck(f"conv{stack}_block{i}", cin, filters, stride if i == 1 else 1,
                                 shortcut_conv=i == 1)
                cin = filters * EXPANSION
        self.eval()

    def _bn(self, name: str, channels: int) -> str:
        return self.add_layer(name, "BatchNormalization",
                              nn.BatchNorm2d(channels, eps=BN_EPS, momentum=1 - BN_MOMENTUM))

    def _bottleneck(self, name: str, cin: int, filters: int, stride: int, shortcut_conv: bool) -> None:
        out = filters * EXPANSION
        s1, s2 = bottleneck_strides(stride)
        main = [self.add_layer(f"{name}_1_conv", "Conv2D", nn.Conv2d(cin, filters, 1, stride=s1)),
                self._bn(f"{name}_1_bn", filters),
                self.add_layer(f"{name}_1_relu", "Activation", Activation("relu")),
                self.add_layer(f"{name}_2_conv", "Conv2D",
                               nn.Conv2d(filters, filters, 3, stride=s2, padding=1)),
                self._bn(f"{name}_2_bn", filters),
                self.add_layer(f"{name}_2_relu", "Activation", Activation("relu"))]
        shortcut: tuple[str, ...] = ()
        if shortcut_conv:  # Keras' order: _0_conv, _3_conv, _0_bn, _3_bn
            zero_conv = self.add_layer(f"{name}_0_conv", "Conv2D", nn.Conv2d(cin, out, 1, stride=stride))
            main.append(self.add_layer(f"{name}_3_conv", "Conv2D", nn.Conv2d(filters, out, 1)))
            shortcut = (zero_conv, self._bn(f"{name}_0_bn", out))
            main.append(self._bn(f"{name}_3_bn", out))
        else:
            main += [self.add_layer(f"{name}_3_conv", "Conv2D", nn.Conv2d(filters, out, 1)),
                     self._bn(f"{name}_3_bn", out)]
        add = self.add_layer(f"{name}_add", "Add", Add())
        relu = self.add_layer(f"{name}_out", "Activation", Activation("relu"))
        self._units.append((tuple(main), shortcut, add, relu))
        ordered = [n for n in self._order if n.startswith(f"{name}_")]
        self._blocks.append(Block(tuple(n for n in ordered if n != add), add))

    # ---- forward -------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] RGB pixels -> the model's input: Keras' ``resnet50.preprocess_input``."""
        return caffe(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.layer)

    def run(self, x: torch.Tensor, layer: LayerLookup,
            residual: ResidualLookup | None = None) -> torch.Tensor:
        """The forward pass with each Keras layer taken from ``layer(name)``, and each block's
        ``_3_conv`` -> ``_3_bn`` -> ``_add`` -> ``_out`` from ``residual`` where it gives one."""
        for name in self._stem:
            x = layer(name)(x)
        for main, shortcut_names, add, relu in self._units:
            shortcut = x
            for name in shortcut_names:
                shortcut = layer(name)(shortcut)
            end = residual(*main[-2:], add, relu) if residual is not None else None
            if end is not None:   # main ends with _3_conv, _3_bn
                for name in main[:-2]:
                    x = layer(name)(x)
                x = end(x, shortcut)
                continue
            for name in main:
                x = layer(name)(x)
            x = layer(relu)(layer(add)(shortcut, x))
        return x
