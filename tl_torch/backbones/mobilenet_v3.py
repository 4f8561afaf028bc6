"""MobileNetV3Large (alpha 1.0, not minimalistic, no top) as Keras 3 builds it.

``keras.applications.MobileNetV3Large(include_top=False, include_preprocessing=True)``: 187 layers,
the InputLayer included; a ``(N, 3, H, W)`` image in [0, 255] becomes ``(N, 960, ceil(H/32),
ceil(W/32))`` (``include_top=False`` keeps the last 1x1 convolution, its BatchNorm and hard-swish).

What decides whether outputs match Keras:
- ``Rescaling(1/127.5, offset=-1)`` is the model's first layer, so pixels go in as they are
  (``mobilenet_v3.preprocess_input`` is the identity) and the Rescaling counts in the layer index;
- BatchNorm ``eps=1e-3, momentum=0.999``; stride-2 depthwise convolutions behind a
  ``ZeroPadding2D(correct_pad)`` (TF "same": 0 before, 1 after on even sizes for 3x3);
- hard-swish is an ``Activation`` layer; hard-sigmoid is ``ReLU(6.)(x + 3) * (1/6)``, where only the
  ReLU is a layer (``+ 3`` and ``* (1/6)`` are operations, with no index);
- squeeze-and-excitation: ``GlobalAveragePooling2D(keepdims=True)`` -> 1x1 conv (with bias) to
  ``_depth(expanded / 4)`` -> ReLU -> 1x1 conv back -> hard-sigmoid -> ``Multiply``;
- Keras names the ReLU and Activation layers it does not name itself in creation order
  (``re_lu``, ``re_lu_1``..., ``activation``, ``activation_1``...): the names a fresh Keras session
  gives, which are the ones in its files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tl_torch.backbones.base import KerasBase, LayerLookup
from tl_torch.backbones.layers import Activation, GlobalAveragePooling2D, Multiply, Rescaling
from tl_torch.model import Add, Block
from tl_torch.padding import Conv2dSame, Pad2d

#: ``BatchNormalization(epsilon=1e-3, momentum=0.999)``; torch's momentum is 1 - Keras'.
BN_EPS = 1e-3
BN_MOMENTUM = 0.999
FIRST_FILTERS = 16
SE_RATIO = 0.25
#: Inverted residual blocks 0..14: expansion, output filters, kernel, stride, squeeze-excite,
#: activation (Keras' ``MobileNetV3Large.stack_fn`` with alpha 1.0, kernel 5 and se_ratio 0.25).
BLOCKS = (
    (1, 16, 3, 1, False, "relu"),
    (4, 24, 3, 2, False, "relu"),
    (3, 24, 3, 1, False, "relu"),
    (3, 40, 5, 2, True, "relu"),
    (3, 40, 5, 1, True, "relu"),
    (3, 40, 5, 1, True, "relu"),
    (6, 80, 3, 2, False, "hard_swish"),
    (2.5, 80, 3, 1, False, "hard_swish"),
    (2.3, 80, 3, 1, False, "hard_swish"),
    (2.3, 80, 3, 1, False, "hard_swish"),
    (6, 112, 3, 1, True, "hard_swish"),
    (6, 112, 3, 1, True, "hard_swish"),
    (6, 160, 5, 2, True, "hard_swish"),
    (6, 160, 5, 1, True, "hard_swish"),
    (6, 160, 5, 1, True, "hard_swish"),
)
#: The last 1x1 convolution has six times the last block's filters.
LAST_EXPANSION = 6


def depth(v: float, divisor: int = 8) -> int:
    """Keras' ``_depth``: ``v`` rounded to a multiple of 8, never more than 10 % below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def hard_sigmoid(relu6: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Keras' ``hard_sigmoid``: ``ReLU(6.)(x + 3.0) * (1.0 / 6.0)``; ``relu6`` is the layer."""
    return relu6(x + 3.0) * (1.0 / 6.0)


@dataclass(frozen=True)
class _Unit:
    """One block for ``forward``: layers before the SE, the SE's six, those after, the Add."""

    head: tuple[str, ...]
    se: tuple[str, ...]
    tail: tuple[str, ...]
    add: str | None


class MobileNetV3LargeBase(KerasBase):
    """MobileNetV3Large without its classifier; ``(N, 3, H, W)`` pixels in [0, 255] ->
    ``(N, 960, ceil(H/32), ceil(W/32))``."""

    KERAS_NAME = "MobileNetV3Large"

    def __init__(self) -> None:
        super().__init__()
        self._counters = {"ReLU": 0, "Activation": 0}
        self._units: list[_Unit] = []
        self.add_layer("rescaling", "Rescaling", Rescaling(1.0 / 127.5, offset=-1.0))
        self.add_layer("conv", "Conv2D", Conv2dSame(3, FIRST_FILTERS, 3, stride=2, bias=False))
        self._bn("conv_bn", FIRST_FILTERS)
        self._activation("hard_swish")
        cin = FIRST_FILTERS
        for block_id, setting in enumerate(BLOCKS):
            cin = self._block(block_id, cin, *setting)
        last = depth(cin * LAST_EXPANSION)
        self.add_layer("conv_1", "Conv2D", nn.Conv2d(cin, last, 1, bias=False))
        self._bn("conv_1_bn", last)
        self._last_activation = self._activation("hard_swish")
        del self._counters
        self.eval()

    # ---- building, in Keras' creation order ---------------------------------------------------
    def _auto_name(self, keras_type: str) -> str:
        """The name Keras gives an unnamed layer: snake-case class name, then ``_1``, ``_2``..."""
        n = self._counters[keras_type]
        self._counters[keras_type] = n + 1
        stem = "re_lu" if keras_type == "ReLU" else "activation"
        return stem if n == 0 else f"{stem}_{n}"

    def _bn(self, name: str, channels: int) -> str:
        return self.add_layer(name, "BatchNormalization",
                              nn.BatchNorm2d(channels, eps=BN_EPS, momentum=1 - BN_MOMENTUM))

    def _activation(self, kind: str) -> str:
        """Keras' ``relu`` (an unnamed ``ReLU()``) or ``hard_swish`` (an unnamed Activation)."""
        if kind == "relu":
            return self.add_layer(self._auto_name("ReLU"), "ReLU", nn.ReLU())
        return self.add_layer(self._auto_name("Activation"), "Activation", Activation(kind))

    def _squeeze_excite(self, prefix: str, filters: int) -> tuple[str, ...]:
        p = f"{prefix}squeeze_excite_"
        reduced = depth(filters * SE_RATIO)
        return (self.add_layer(f"{p}avg_pool", "GlobalAveragePooling2D",
                               GlobalAveragePooling2D(keepdims=True)),
                self.add_layer(f"{p}conv", "Conv2D", nn.Conv2d(filters, reduced, 1)),
                self.add_layer(f"{p}relu", "ReLU", nn.ReLU()),
                self.add_layer(f"{p}conv_1", "Conv2D", nn.Conv2d(reduced, filters, 1)),
                self.add_layer(self._auto_name("ReLU"), "ReLU", nn.ReLU6()),
                self.add_layer(f"{p}mul", "Multiply", Multiply()))

    def _block(self, block_id: int, cin: int, expansion: float, filters: int, kernel: int,
               stride: int, se: bool, activation: str) -> int:
        prefix = f"expanded_conv_{block_id}_" if block_id else "expanded_conv_"
        head: list[str] = []
        hidden = cin
        if block_id:
            hidden = depth(cin * expansion)
            head += [self.add_layer(f"{prefix}expand", "Conv2D", nn.Conv2d(cin, hidden, 1, bias=False)),
                     self._bn(f"{prefix}expand_bn", hidden), self._activation(activation)]
        if stride == 2:
            head.append(self.add_layer(f"{prefix}depthwise_pad", "ZeroPadding2D", Pad2d(kernel, 2)))
        head.append(self.add_layer(f"{prefix}depthwise", "DepthwiseConv2D", nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0,
            groups=hidden, bias=False)))
        head += [self._bn(f"{prefix}depthwise_bn", hidden), self._activation(activation)]
        squeeze = self._squeeze_excite(prefix, hidden) if se else ()
        tail = (self.add_layer(f"{prefix}project", "Conv2D", nn.Conv2d(hidden, filters, 1, bias=False)),
                self._bn(f"{prefix}project_bn", filters))
        add = self.add_layer(f"{prefix}add", "Add", Add()) if stride == 1 and cin == filters else None
        self._units.append(_Unit(tuple(head), squeeze, tail, add))
        self._blocks.append(Block(tuple(head) + squeeze + tail, add))
        return filters

    # ---- forward -------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] pixels -> the model's input: unchanged (the Rescaling is the first layer;
        Keras' ``mobilenet_v3.preprocess_input`` is the identity)."""
        return images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.layer)

    def run(self, x: torch.Tensor, layer: LayerLookup) -> torch.Tensor:
        """The forward pass with each Keras layer taken from ``layer(name)``."""
        for name in ("rescaling", "conv", "conv_bn", "activation"):
            x = layer(name)(x)
        for unit in self._units:
            shortcut = x
            for name in unit.head:
                x = layer(name)(x)
            if unit.se:
                pool, conv, relu, conv_1, relu6, mul = (layer(n) for n in unit.se)
                x = mul(x, hard_sigmoid(relu6, conv_1(relu(conv(pool(x))))))
            for name in unit.tail:
                x = layer(name)(x)
            if unit.add is not None:
                x = layer(unit.add)(shortcut, x)
        for name in ("conv_1", "conv_1_bn", self._last_activation):
            x = layer(name)(x)
        return x
