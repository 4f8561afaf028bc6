"""Speed without changing the function, for the bases other than MobileNetV2: ``fold_pairs(base)``.

A convolution followed by its inference-mode BatchNormalization is one convolution with the
weight scaled by ``gamma / sqrt(var + eps)`` and a bias (torch's ``fuse_conv_bn_eval`` does the
same). :func:`fold_pairs` returns a :class:`FoldedPairs`, a module that computes what the base
computes, through the base's own ``run`` with another layer lookup: for every Conv2D or
DepthwiseConv2D + BatchNormalization pair that needs no gradient (frozen, or under
``no_grad``), the convolution runs folded and the BatchNormalization passes its input through;
the activation right after the BatchNormalization in Keras' order (ReLU, swish, hard_swish) is
applied in the same oneDNN call where that applies (float32 channels-last CPU tensors that need no
gradient: :func:`tl_torch.fused.fused_applies`), else right after the folded convolution. A
ZeroPadding2D right before a folded convolution, and a Conv2D's own TF-"same" padding, become the
convolution's padding (:func:`tl_torch.fused.absorb_padding`: no padded copy of the input). A base
whose ``run`` takes ``residual=`` (ResNet50) ends each block whose last pair is folded in one call
that also adds the shortcut and applies the ReLU. Pairs that train run as the base's modules, so
their gradients are the base's.

It holds no parameters or buffers of its own and folds from the base's current weights at each
call (one multiplication per weight, next to the convolutions' hundreds), so it is right after
training steps, ``load_state_dict`` and any change of which layers are frozen, and is built once.
MobileNetV2 has its own, faster path (:mod:`tl_torch.fast`: kept folded weights, a oneDNN graph).
``tests/test_backbones_folding.py`` bounds the difference from the base's own modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tl_torch import internals
from tl_torch.backbones.base import KerasBase
from tl_torch.backbones.layers import Activation
from tl_torch.fused import absorb_padding, conv_add, fold_conv_bn, fused_applies
from tl_torch.padding import Conv2dSame, Pad2d, zero_pad

#: Keras' activation name -> oneDNN's post-operation (``torch.ops.mkldnn._convolution_pointwise``).
ONEDNN_ACTIVATIONS = {"relu": "relu", "swish": "swish", "hard_swish": "hardswish"}
CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D")


@dataclass(frozen=True)
class Pair:
    """A convolution, the BatchNormalization of its output, and the activation after it."""

    conv: str
    bn: str
    activation: str | None   # fused into the folded convolution, or None
    post_op: str             # oneDNN's name of the activation ("none" without one)


def conv_of(types: dict[str, str], bn: str) -> str:
    """The convolution whose output BatchNormalization ``bn`` normalises, by Keras' names
    (``types``: Keras type by layer name): ``X`` -> ``X_bn`` (MobileNetV3), ``X_conv`` -> ``X_bn``
    (ResNet50, EfficientNet's stem, expand, project and top), ``Xdwconv`` -> ``Xbn``
    (EfficientNet's depthwise)."""
    stem = bn.removesuffix("bn")
    for name in (stem.removesuffix("_"), stem + "conv", stem + "dwconv"):
        if types.get(name) in CONVOLUTIONS:
            return name
    raise ValueError(f"no convolution found for BatchNormalization {bn!r}")


def _post_op(module: nn.Module) -> str | None:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, Activation):
        return ONEDNN_ACTIVATIONS.get(module.name)
    return None


def pads_before(base: KerasBase, convs: dict[str, Pair]) -> dict[str, str]:
    """Each ZeroPadding2D (:class:`Pad2d`) that comes right before one of ``convs`` in Keras'
    order, with that convolution's name."""
    layers = base.keras_layers[1:]
    return {layer.name: after.name for layer, after in zip(layers, layers[1:], strict=False)
            if isinstance(layer.module, Pad2d) and after.name in convs}


def pairs_of(base: KerasBase) -> tuple[Pair, ...]:
    """Every BatchNormalization of ``base`` with its convolution, and the activation that follows
    it in Keras' order where oneDNN can apply it."""
    layers = base.keras_layers[1:]   # the InputLayer has no module
    types = {layer.name: layer.type for layer in layers}
    found = []
    for layer, after in zip(layers, [*layers[1:], None], strict=True):
        if layer.type != "BatchNormalization":
            continue
        post_op = _post_op(after.module) if after else None
        found.append(Pair(conv_of(types, layer.name), layer.name,
                          after.name if post_op else None, post_op or "none"))
    return tuple(found)


class FoldedPairs(nn.Module):
    """What ``base(x)`` computes, each gradient-free Conv + BatchNorm pair as one convolution."""

    def __init__(self, base: KerasBase) -> None:
        super().__init__()
        self._base = (base,)   # a tuple: not registered (its parameters are the base's)
        self.pairs = pairs_of(base)
        self._by_conv = {p.conv: p for p in self.pairs}
        self._passed = {name: p for p in self.pairs for name in (p.bn, p.activation) if name}
        # A ZeroPadding2D right before a folded convolution becomes that convolution's padding.
        self._pads = pads_before(base, self._by_conv)
        self._pad_of = {conv: pad for pad, conv in self._pads.items()}
        # ResNet's blocks end in conv -> BatchNorm -> add -> ReLU: one oneDNN call where folded.
        self._residuals = "residual" in inspect.signature(base.run).parameters

    @property
    def base(self) -> KerasBase:
        return self._base[0]

    def frozen(self, pair: Pair) -> bool:
        """No gradient wanted for the pair's parameters."""
        if not torch.is_grad_enabled():
            return True
        modules = (self.base.layer(pair.conv), self.base.layer(pair.bn))
        return not any(p.requires_grad for m in modules for p in m.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = {p.conv: self.frozen(p) for p in self.pairs}

        def lookup(name: str):
            pair = self._by_conv.get(name)
            if pair is not None and frozen[name]:
                return lambda t: self.folded(pair, t)
            pair = self._passed.get(name)
            if pair is not None and frozen[pair.conv]:
                return _identity
            conv = self._pads.get(name)
            if conv is not None and frozen[conv]:
                return _identity
            return self.base.layer(name)

        if not self._residuals:
            return self.base.run(x, lookup)

        def residual(conv: str, bn: str, add: str, activation: str):
            pair = self._by_conv.get(conv)
            if (pair is None or pair.bn != bn or not frozen[conv]
                    or _post_op(self.base.layer(activation)) != "relu"):
                return None
            return lambda h, shortcut: self.folded_add(pair, h, shortcut)

        return self.base.run(x, lookup, residual=residual)

    def folded(self, pair: Pair, x: torch.Tensor) -> torch.Tensor:
        """``activation(bn(conv(x)))`` (or ``bn(conv(x))``) as one convolution, the ZeroPadding2D
        before it, if any, included."""
        conv = self.base.layer(pair.conv)
        weight, bias = self.folded_weights(pair)
        pad = (conv.pad if isinstance(conv, Conv2dSame) else
               self.base.layer(self._pad_of[pair.conv]) if pair.conv in self._pad_of else None)
        padding = conv.padding
        if pad is not None:
            amounts = pad.amounts(*x.shape[-2:])
            absorbed = absorb_padding(weight, conv, amounts)
            if absorbed is None:
                x = zero_pad(x, *amounts)
            else:
                weight, padding = absorbed
        if fused_applies(x, weight):
            return internals.conv_pointwise(x, weight, bias, conv, pair.post_op, (), padding)
        y = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        return self.base.layer(pair.activation)(y) if pair.activation else y

    def folded_add(self, pair: Pair, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """``relu(shortcut + bn(conv(x)))`` as one convolution that adds and rectifies as it writes."""
        weight, bias = self.folded_weights(pair)
        return conv_add(x, self.base.layer(pair.conv), weight, bias, shortcut, relu=True)

    def folded_weights(self, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair's convolution and BatchNormalization as one weight and bias, from the base's
        current parameters, without autograd (the pair needs no gradient)."""
        with torch.no_grad():
            return fold_conv_bn(self.base.layer(pair.conv), self.base.layer(pair.bn), divide=True)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def fold_pairs(base: KerasBase) -> FoldedPairs:
    """The base with its gradient-free Conv + BatchNorm pairs folded (see the module's text);
    built once, it follows the base's weights and freezing."""
    if not hasattr(base, "run"):
        raise TypeError(f"{type(base).__name__} has no run(x, layer): fold_pairs takes the "
                        "bases of tl_torch.backbones other than MobileNetV2 (tl_torch.fast.fold)")
    return FoldedPairs(base)
