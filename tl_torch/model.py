"""MobileNetV2 (alpha 1.0, no top) in PyTorch that *is* Keras' base: same layers, names and numbers.

Every Keras layer of ``keras.applications.MobileNetV2(include_top=False)`` is one module here,
named exactly as in Keras (``Conv1``, ``bn_Conv1``, ``block_11_expand_relu``...), in Keras' order,
so that

- ``base.keras_layers`` is the same 154-entry list as Keras' ``base.layers`` (the InputLayer has no
  module; ReLU, ZeroPadding2D and Add layers have modules without weights),
- freezing by Keras layer index (``fine_tune_at``) is a slice of that list,
- the state dict's keys are Keras layer names, which makes weight import and export a table lookup,
- every layer's output can be read by its Keras name (:mod:`tl_torch.features`).

torchvision's ``MobileNetV2`` computes the same function but hides padding and the residual adds
inside its blocks' ``forward``, so it cannot offer that list; its weights load here instead
(``weights="torchvision"``), with its own padding and BatchNorm epsilon.

The numerics that decide whether outputs match Keras:
- stride-2 3x3 convolutions pad TF-"same" (0 before, 1 after on even sizes): :mod:`tl_torch.padding`;
- BatchNorm ``eps=1e-3``; torch momentum = 1 - Keras momentum = 0.001;
- ReLU6; Conv kernels transposed from Keras' (kh, kw, in, out) layout on import.

BatchNorm always runs in inference mode, as ``base(x, training=False)`` does in the recipe: the
base stays in ``eval()`` whatever ``.train()`` is called on it or on a parent, so the moving
statistics are used and never updated, in both phases, while unfrozen gamma/beta still learn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tl_common.mobilenet_v2 import FIRST_FILTERS, INVERTED_RESIDUAL_SETTING, LAST_FILTERS
from tl_common.recipe import scale_pixels
from tl_torch.padding import Conv2dSame, Pad2d

#: Keras' ``BatchNormalization(epsilon=1e-3, momentum=0.999)``; torch's momentum is 1 - Keras'.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.999
#: torchvision trained its weights with torch's default BatchNorm epsilon.
TORCHVISION_BN_EPS = 1e-5


#: How inputs in [0, 255] are brought to what the weights expect.
PREPROCESSING = ("keras", "torchvision")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Add(nn.Module):
    """Keras' ``Add`` layer (the residual connection), a module so it has a name and an output."""

    def forward(self, shortcut: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return shortcut + x


@dataclass(frozen=True)
class KerasLayer:
    """One entry of the Keras layer list: index, Keras type and name, and the torch module."""

    index: int
    name: str
    type: str
    module: nn.Module | None

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.module is None else list(self.module.parameters(recurse=False))

    @property
    def has_weights(self) -> bool:
        return bool(self.parameters())


@dataclass(frozen=True)
class Block:
    """One inverted residual block: its Keras layers in order, and the Add closing it."""

    layers: tuple[str, ...]  # Keras names, in order
    add: str | None          # the Add layer closing the block, if it has a residual


class KerasLayerIndex:
    """Keras' view of a base whose modules are Keras' layers: ``base.layers`` as
    :class:`KerasLayer` entries, InputLayer first, and lookup by index or name. The base keeps
    ``input_layer_name``, ``_order`` (layer names in Keras' order), ``_types`` (name -> Keras
    type), ``_blocks`` and ``KERAS_NAME`` (the application's name, for messages)."""

    KERAS_NAME = ""

    @property
    def keras_layers(self) -> list[KerasLayer]:
        """Keras' ``base.layers``, InputLayer first, in Keras' order."""
        layers = [KerasLayer(0, self.input_layer_name, "InputLayer", None)]
        for i, name in enumerate(self._order, start=1):
            layers.append(KerasLayer(i, name, self._types[name], getattr(self, name)))
        return layers

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The network's repeated blocks, in order: their Keras layers and the Add closing each."""
        return tuple(self._blocks)

    def keras_layer(self, key: int | str) -> KerasLayer:
        """A layer by Keras index or name."""
        layers = self.keras_layers
        if isinstance(key, bool):
            raise TypeError(f"a Keras layer is named by index or name, not {key!r}")
        if isinstance(key, int):
            if not 0 <= key < len(layers):
                raise IndexError(f"Keras layer index {key} out of range 0..{len(layers) - 1}")
            return layers[key]
        for layer in layers:
            if layer.name == key:
                return layer
        raise KeyError(f"no Keras layer named {key!r} in {self.KERAS_NAME}")


class MobileNetV2Base(KerasLayerIndex, nn.Module):
    """MobileNetV2 without its classifier; ``(N, 3, H, W)`` in the weights' input range ->
    ``(N, 1280, ceil(H/32), ceil(W/32))``.

    Build it with :func:`tl_torch.build_base`, which also loads weights and picks the padding,
    BatchNorm epsilon and preprocessing that the weights were trained with.
    """

    KERAS_NAME = "MobileNetV2"

    def __init__(self, *, pad_type: str = "same", bn_eps: float = KERAS_BN_EPS,
                 preprocessing: str = "keras") -> None:
        super().__init__()
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing={preprocessing!r}; expected one of {PREPROCESSING}")
        self.pad_type, self.bn_eps, self.preprocessing = pad_type, bn_eps, preprocessing
        self.input_layer_name = "input_layer"
        self._types: dict[str, str] = {}
        self._order: list[str] = []
        self.frozen_below = 0  # layers with a Keras index below this are frozen (see tl_torch.freeze)

        def add(name: str, keras_type: str, module: nn.Module) -> str:
            self.add_module(name, module)
            self._types[name] = keras_type
            self._order.append(name)
            return name

        def bn(name: str, channels: int) -> str:
            return add(name, "BatchNormalization",
                       nn.BatchNorm2d(channels, eps=bn_eps, momentum=1 - KERAS_BN_MOMENTUM))

        def relu(name: str) -> str:
            return add(name, "ReLU", nn.ReLU6())

        def conv1x1(name: str, cin: int, cout: int) -> str:
            return add(name, "Conv2D", nn.Conv2d(cin, cout, 1, bias=False))

        add("Conv1", "Conv2D", Conv2dSame(3, FIRST_FILTERS, 3, stride=2, bias=False, pad_type=pad_type))
        bn("bn_Conv1", FIRST_FILTERS)
        relu("Conv1_relu")

        self._blocks: list[Block] = []
        cin, block_id = FIRST_FILTERS, 0
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
                names = []
                hidden = cin * t
                if t != 1:
                    names += [conv1x1(f"{prefix}expand", cin, hidden),
                              bn(f"{prefix}expand_BN", hidden), relu(f"{prefix}expand_relu")]
                if stride == 2:
                    names.append(add(f"{prefix}pad", "ZeroPadding2D", Pad2d(3, 2, pad_type)))
                names.append(add(f"{prefix}depthwise", "DepthwiseConv2D",
                                 nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1 if stride == 1 else 0,
                                           groups=hidden, bias=False)))
                names += [bn(f"{prefix}depthwise_BN", hidden), relu(f"{prefix}depthwise_relu"),
                          conv1x1(f"{prefix}project", hidden, c), bn(f"{prefix}project_BN", c)]
                residual = stride == 1 and cin == c
                add_name = add(f"{prefix}add", "Add", Add()) if residual else None
                self._blocks.append(Block(tuple(names), add_name))
                cin, block_id = c, block_id + 1

        conv1x1("Conv_1", cin, LAST_FILTERS)
        bn("Conv_1_bn", LAST_FILTERS)
        relu("out_relu")
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    # ---- forward -------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] pixels -> the weights' input range: ``x / 127.5 - 1`` for Keras weights
        (``mobilenet_v2.preprocess_input``), ImageNet mean/std for torchvision's."""
        if self.preprocessing == "keras":
            return scale_pixels(images)
        return (images / 255.0 - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv1_relu(self.bn_Conv1(self.Conv1(x)))                # (N, 32, H/2, W/2)
        for block in self._blocks:
            shortcut = x
            for name in block.layers:
                x = getattr(self, name)(x)
            if block.add is not None:
                x = getattr(self, block.add)(shortcut, x)
        return self.out_relu(self.Conv_1_bn(self.Conv_1(x)))             # (N, 1280, H/32, W/32)

    # ---- BatchNorm always in inference mode ------------------------------------------------
    def train(self, mode: bool = True) -> MobileNetV2Base:
        """Stay in inference mode: the recipe calls the base with ``training=False`` in both
        phases, so BatchNorm normalises with, and never updates, its moving statistics. Gradients
        still reach gamma/beta of unfrozen layers. (Lightning's ``BaseFinetuning.freeze`` sets
        ``track_running_stats=False`` instead, which normalises with batch statistics.)"""
        return super().train(False)

    def batchnorms(self) -> Iterator[nn.BatchNorm2d]:
        return (m for m in self.modules() if isinstance(m, nn.BatchNorm2d))

    def extra_repr(self) -> str:
        return (f"pad_type={self.pad_type!r}, bn_eps={self.bn_eps:g}, "
                f"preprocessing={self.preprocessing!r}")
