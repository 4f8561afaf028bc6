"""What every Keras-faithful base shares: Keras' layer list, lookup by index or name, BatchNorm
kept in inference mode.

A base built on :class:`KerasBase` registers each Keras layer once, in Keras' order
(``keras.applications.<App>(include_top=False).layers``), as one named module: so freezing by Keras
index (:func:`tl_torch.freeze`), the layer table, weight import/export by layer name
(:mod:`tl_torch.keras_weights`) and reading a layer's output by its name work the same for every
base. The InputLayer has no module; layers without weights (activations, padding, Add...) have
modules without parameters. Operations that Keras records as graph nodes but not as layers
(``x + 3.0``, ``* (1 / 6)``) live in ``forward`` and have no entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from tl_torch.model import Block, KerasLayerIndex

#: Where a base's ``run`` takes each Keras layer from, by name (:meth:`KerasBase.layer`, or a
#: folded view's: :func:`tl_torch.backbones.folding.fold_pairs`).
LayerLookup = Callable[[str], Callable[..., torch.Tensor]]
#: A base whose ``run`` also takes ``residual=``: asked ``residual(conv, bn, add, activation)``
#: at each residual block's end, it gives ``(h, shortcut) -> activation(add(shortcut,
#: bn(conv(h))))`` as one computation, or None to run those layers one by one.
ResidualLookup = Callable[[str, str, str, str],
                          Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]


class KerasBase(KerasLayerIndex, nn.Module):
    """A base whose modules are Keras' layers, named and ordered as Keras has them."""

    #: Keras' application name, for messages (``MobileNetV3Large``...).
    KERAS_NAME = ""

    def __init__(self) -> None:
        super().__init__()
        self.input_layer_name = "input_layer"
        self._types: dict[str, str] = {}
        self._order: list[str] = []
        self._blocks: list[Block] = []
        self.frozen_below = 0  # layers with a Keras index below this are frozen (tl_torch.freeze)

    def add_layer(self, name: str, keras_type: str, module: nn.Module) -> str:
        """Register the next Keras layer (in Keras' order) and return its name."""
        if name in self._types:
            raise ValueError(f"Keras layer {name!r} registered twice")
        self.add_module(name, module)
        self._types[name] = keras_type
        self._order.append(name)
        return name

    def layer(self, name: str) -> nn.Module:
        return getattr(self, name)

    # ---- BatchNorm (and Dropout) always in inference mode ----------------------------------
    def train(self, mode: bool = True) -> KerasBase:
        """Stay in inference mode: the recipe calls the base with ``training=False`` in both
        phases, so BatchNorm normalises with, and never updates, its moving statistics, and any
        Dropout inside the base passes its input through. Gradients still reach the unfrozen
        weights."""
        return super().train(False)

    def batchnorms(self) -> Iterator[nn.BatchNorm2d]:
        return (m for m in self.modules() if isinstance(m, nn.BatchNorm2d))
