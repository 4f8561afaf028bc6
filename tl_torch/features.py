"""Intermediate outputs by Keras layer name or index, and the recipe's flattened-feature aside.

Built on ``torchvision.models.feature_extraction.create_feature_extractor``: the base is traced
and cut after the last requested layer, so asking for ``block_6_expand`` does not run the blocks
above it. The traced graph has one node per Keras layer, in Keras' order (the modules are named
after the layers); torchvision rewrites some node names (``Conv_1`` becomes ``Conv``, taken for a
second call of ``Conv``), so nodes are matched to layers by position, not by name. The other bases
(:mod:`tl_torch.backbones`) compute operations that are not layers, or run their layers in another
order than Keras lists them (ResNet's shortcut), so their outputs are read with forward hooks on
the layers' modules, over a whole forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from tl_torch.model import Add, MobileNetV2Base
from tl_torch.padding import Conv2dSame, Pad2d

#: Modules kept whole when tracing (their padding depends on the input's size at run time).
LEAF_MODULES = [Pad2d, Conv2dSame, Add]


class _WithInput(nn.Module):
    """Returns the input itself for the InputLayer, which has no module to trace."""

    def __init__(self, extractor: nn.Module, input_name: str, wants_input: bool) -> None:
        super().__init__()
        self.extractor, self.input_name, self.wants_input = extractor, input_name, wants_input

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(self.extractor(x)) if self.extractor is not None else {}
        if self.wants_input:
            out = {self.input_name: x, **out}
        return out


class _HookedOutputs(nn.Module):
    """The layers' outputs read with forward hooks on their modules, over a whole forward pass:
    for bases whose forward holds operations that are not Keras layers (MobileNetV3's ``x + 3``,
    EfficientNet's squeeze-and-excitation reshapes), so that no traced node is one layer."""

    def __init__(self, base: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.base, self.names = base, list(names)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {self.base.input_layer_name: x}
        hooks = [self.base.keras_layer(name).module.register_forward_hook(
                     lambda m, args, out, n=name: seen.__setitem__(n, out))
                 for name in self.names if name != self.base.input_layer_name]
        try:
            self.base(x)
        finally:
            for hook in hooks:
                hook.remove()
        # A layer whose module did not run (a forward that skips it) has no output to give.
        return {name: seen[name] for name in self.names if name in seen}


def feature_extractor(base: MobileNetV2Base, layers: Sequence[int | str]) -> nn.Module:
    """A module returning ``{keras_name: output}`` for the given Keras layer names or indices."""
    names = [base.keras_layer(key).name for key in layers]
    wants_input = base.input_layer_name in names
    # The traced nodes are matched to layers by position: only where the forward runs exactly the
    # layers, in Keras' order (MobileNetV2's); elsewhere the modules' outputs are read.
    if not isinstance(base, MobileNetV2Base):
        return _HookedOutputs(base, names).eval()
    tracer_kwargs = {"leaf_modules": LEAF_MODULES}
    _, graph_nodes = get_graph_node_names(base, tracer_kwargs=tracer_kwargs)
    keras_names = [layer.name for layer in base.keras_layers]
    if len(graph_nodes) != len(keras_names):
        return _HookedOutputs(base, names).eval()
    node_of = dict(zip(keras_names, graph_nodes, strict=True))
    nodes = {node_of[n]: n for n in names if n != base.input_layer_name}
    extractor = None
    if nodes:
        extractor = create_feature_extractor(base, return_nodes=nodes, tracer_kwargs=tracer_kwargs)
    return _WithInput(extractor, base.input_layer_name, wants_input).eval()


def all_layer_outputs(base: MobileNetV2Base, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every Keras layer's output for input ``x`` (already preprocessed), in Keras' order."""
    return feature_extractor(base, [layer.name for layer in base.keras_layers])(x)


class FlatFeatures(nn.Module):
    """The recipe's aside: the base's last layer, flattened (5 * 5 * 1280 = 32,000 at 160x160).

    Flattened in Keras' channels-last order, so the i-th number is the i-th number Keras gives.
    """

    def __init__(self, base: MobileNetV2Base) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x).permute(0, 2, 3, 1).flatten(1)    # (N, H * W * 1280)
