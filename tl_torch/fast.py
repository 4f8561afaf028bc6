"""Speed without changing the function: ``fold(base)``, the base with its BatchNorm folded away.

A convolution followed by its inference-mode BatchNorm computes
``gamma * (conv(x) - mean) / sqrt(var + eps) + beta``, an affine map of ``conv(x)``: one
convolution with scaled weights and a bias does the same in one pass. :func:`fold` returns a
:class:`FoldedBase`, a module that computes what the base computes that way, as torch's
``fuse_conv_bn_eval`` and timm's ``reparameterize_model`` do, with one difference that lets it be
built once and used in every phase: it has no parameters or buffers of its own. Each call folds
from the base's current parameters and statistics (a few thousand multiplications per layer,
next to the convolutions' millions), or reuses what it folded while those are unchanged, so it
is right after ``load_state_dict``, ``.to()``, and any change of which layers are frozen; the
base itself (state dict, layer table, counts, Keras export) is what trains and is saved.

Per convolution + BatchNorm pair, at each call:
- no gradient wanted for its parameters (frozen, or under ``no_grad``): folded without autograd,
  and, where a ReLU6 follows, run as one oneDNN convolution with the activation fused; a strided
  block's ZeroPadding2D after that ReLU6 is moved before the (1x1) convolution, so the block's
  input is padded rather than its six times wider expanded activations; a residual block's
  shortcut is added by its last convolution as it writes its output. The folded weight and bias
  are kept while the six tensors they come from are unchanged: the same tensors (storage
  address, dtype, device), none modified in place since (autograd's version counter, which every
  in-place operation, ``load_state_dict`` and the optimizers bump). Only an in-place change made
  through ``tensor.data``, which autograd does not see either, goes unnoticed:
  :meth:`FoldedBase.forget` drops the kept weights. They are also kept in oneDNN's own layout per
  input shape, which spares a reorder of every weight at every call;
- gradients wanted (fine-tuning's upper layers): folded with autograd, so gradients reach the
  convolution's weight and BatchNorm's gamma and beta, and BatchNorm's backward pass over the
  activations disappears; 1x1 convolutions run as matrix products.
Under CPU autocast to bf16 (``--precision bf16-mixed``) where oneDNN has bf16 kernels, the frozen
pairs run in bf16 with their folded weights kept in bf16 (cast once, not at every call), as
autocast runs the trainable ones; in float32 and in bf16 the leading frozen blocks also run as
one graph (:mod:`tl_torch.frozen_graph`). The results differ from the base's only by rounding
(``tests/test_torch_fast.py`` bounds it over shapes and freezing points).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tl_torch import internals
from tl_torch.frozen_graph import FrozenGraphs, GraphInfo
from tl_torch.fused import (
    autocast_bf16,
    conv_add,
    conv_plain,
    conv_relu6,
    convolve,
    fold_conv_bn,
    fused_applies,
    graph_dtype,
    is_pointwise,
    relu6_,
)
from tl_torch.model import MobileNetV2Base
from tl_torch.padding import Pad2d, zero_border_, zero_pad

#: How many input shapes a frozen pair keeps a packed weight for (the last batch of a data set is
#: often smaller than the others, and validation's may differ from training's).
PACKED_SHAPES = 4


class Kept(NamedTuple):
    """What a frozen pair keeps between calls (:meth:`FoldedConvBN.folded`)."""
    key: tuple             # what the weights were folded from
    weight: torch.Tensor   # folded, gradient-free
    bias: torch.Tensor
    storages: list         # the sources' storages, held so that no new tensor takes their address
    packs: dict            # (input shape, dtype) -> the weight in oneDNN's layout
    bf16: dict             # "weight", "bias": the folded ones cast to bf16, made at first need


class FoldedConvBN(nn.Module):
    """One convolution + BatchNorm pair of the base, then its ReLU6 and the ZeroPadding2D after
    that where the base has them, computed folded (see the module's docstring). The base's
    modules are referenced, not registered: this module has no parameters or buffers."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, relu: bool,
                 pad: Pad2d | None = None) -> None:
        super().__init__()
        if pad is not None and not relu:
            raise ValueError("FoldedConvBN: a padding is folded only after a ReLU6")
        self._parts = (conv, bn, pad)   # a tuple: not registered as submodules
        self.relu = relu
        self.kept: Kept | None = None   # see folded()

    @property
    def conv(self) -> nn.Conv2d:
        return self._parts[0]

    @property
    def pad(self) -> Pad2d | None:
        return self._parts[2]

    def extra_repr(self) -> str:
        return (f"{self.conv.__class__.__name__}{tuple(self.conv.weight.shape)}, "
                f"relu={self.relu}, pad={self.pad}")

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """The pair's output; ``shortcut``: a residual block's input, added to it (only for a
        unit without ReLU6 or padding, a block's last)."""
        conv, bn, pad = self._parts
        if shortcut is not None and (self.relu or pad is not None):
            raise ValueError("FoldedConvBN: a shortcut is added only to a unit without ReLU6 "
                             "or padding")
        if torch.is_grad_enabled() and not self.frozen():
            out = self._trainable(x, *fold_conv_bn(conv, bn))
            return out if shortcut is None else shortcut + out
        if autocast_bf16(x):
            x = x.to(torch.bfloat16)   # once, at the first frozen pair; bf16 from then on
            shortcut = None if shortcut is None else shortcut.to(torch.bfloat16)
        weight, bias = self.folded(x.is_contiguous(memory_format=torch.channels_last), x.dtype)
        packed = self._packed(x, weight)
        if not self.relu:
            if shortcut is not None:
                return conv_add(x, conv, weight, bias, shortcut, packed)
            return conv_plain(x, conv, weight, bias, packed)
        if pad is not None and is_pointwise(conv):
            # Pad the block's input, not the expanded activations; the padded border of the
            # output, relu6(bias) there, is set back to the zeros the padding would have added.
            left, right, top, bottom = pad.amounts(*x.shape[-2:])
            out = conv_relu6(zero_pad(x, left, right, top, bottom), conv, weight, bias, packed)
            return zero_border_(out, left, right, top, bottom)
        out = conv_relu6(x, conv, weight, bias, packed)
        return out if pad is None else pad(out)

    def __getstate__(self) -> dict:
        # Pickled or copied without the kept weights (they are folded again at the next call).
        return {**self.__dict__, "kept": None}

    def frozen(self) -> bool:
        """Whether none of the pair's parameters wants a gradient."""
        return not any(t is not None and t.requires_grad for t in self._sources()[:4])

    def _sources(self) -> tuple[torch.Tensor | None, ...]:
        """What the folded weight and bias come from: the convolution's weight and bias,
        BatchNorm's gamma, beta, mean and variance; read from the modules' own tables, which
        is much quicker than through ``nn.Module.__getattr__`` (every frozen pair is asked at
        every call)."""
        conv, bn, _ = self._parts
        try:
            p, q, b = conv._parameters, bn._parameters, bn._buffers
            return (p["weight"], p["bias"], q["weight"], q["bias"], b["running_mean"],
                    b["running_var"])
        except KeyError:   # computed attributes (a parametrization, a subclass)
            return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def folded(self, channels_last: bool,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient-free folded weight (channels-last if asked, as oneDNN wants it; in
        ``dtype``: the base's own, or bf16) and bias (likewise): kept from the last call
        while their sources are unchanged (the module's docstring says what that means), else
        folded again; folded at each call from tensors made under inference mode (they have no
        version counter), then ``kept`` is None."""
        sources = self._sources()
        key: list = [channels_last]
        for t in sources:
            if t is None:
                key.append(None)
            elif t.is_inference():
                self.kept = None
                weight, bias = self._fold(channels_last)
                if dtype == torch.bfloat16:
                    weight, bias = weight.to(dtype), bias.to(dtype)
                return weight, bias
            else:
                key.append((t.data_ptr(), internals.version(t), t.dtype, t.device))
        key = tuple(key)
        if self.kept is None or self.kept.key != key:
            storages = [t.untyped_storage() for t in sources if t is not None]
            with torch.inference_mode(False):   # usable outside inference mode too
                self.kept = Kept(key, *self._fold(channels_last), storages, {}, {})
        if dtype != torch.bfloat16 or self.kept.weight.dtype == torch.bfloat16:
            return self.kept.weight, self.kept.bias
        if not self.kept.bf16:   # cast once, as autocast casts a convolution's weight and bias
            with torch.inference_mode(False):
                self.kept.bf16.update(weight=self.kept.weight.to(torch.bfloat16),
                                      bias=self.kept.bias.to(torch.bfloat16))
        return self.kept.bf16["weight"], self.kept.bf16["bias"]

    def _packed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """The kept folded weight in the layout oneDNN's convolution wants for inputs shaped
        like ``x``, made once per shape (at most :data:`PACKED_SHAPES`) and dropped with the kept
        weights; None where nothing is kept or the fused call does not apply. Without it oneDNN
        reorders the weight from torch's layout at every call."""
        kept = self.kept
        if (kept is None or not internals.HAS_WEIGHT_PACKING or not fused_applies(x, weight)
                or not any(weight is w for w in (kept.weight, kept.bf16.get("weight")))):
            return None
        key = (tuple(x.shape), weight.dtype)
        packed = kept.packs.get(key)
        if packed is None:
            if len(kept.packs) >= PACKED_SHAPES:
                del kept.packs[next(iter(kept.packs))]   # the oldest
            with torch.inference_mode(False):
                packed = kept.packs[key] = internals.pack_weight(weight, self.conv, key[0])
        return packed

    def packed_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes this pair keeps a packed weight for."""
        return [] if self.kept is None else [shape for shape, _ in self.kept.packs]

    def _fold(self, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        conv, bn, _ = self._parts
        with torch.no_grad():
            weight, bias = fold_conv_bn(conv, bn, divide=True)
            if channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
        return weight, bias

    def _trainable(self, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        conv, _, pad = self._parts
        if is_pointwise(conv) and x.is_contiguous(memory_format=torch.channels_last):
            # A 1x1 convolution of a channels-last tensor is a matrix product over the channels:
            # BLAS' forward and backward beat oneDNN's convolution on these small maps.
            out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)   # (N, H, W, C_out)
            out = out.permute(0, 3, 1, 2)                                   # channels-last
        else:
            out = convolve(x, conv, weight, bias)
        if self.relu:
            out = relu6_(out)
        return out if pad is None else pad(out)


@dataclass(frozen=True)
class Stage:
    """The stem, one block, or the top convolution: its pairs in order, and whether the block's
    input is added to its output."""
    units: tuple[FoldedConvBN, ...]
    residual: bool


@dataclass(frozen=True)
class CacheInfo:
    """What a :class:`FoldedBase` keeps between calls (:meth:`FoldedBase.cache_info`)."""
    kept: int                                  # pairs with kept folded weights
    packed_shapes: tuple[tuple, ...]           # per pair, the input shapes with a packed weight
    graphs: tuple[GraphInfo, ...]              # the graphs of the frozen blocks, per input shape
    traces: int                                # graphs traced so far
    fallbacks: dict[tuple, str]                # (stages, input shape, dtype) with no graph, and why


class FoldedBase(nn.Module):
    """What ``base(x)`` computes, with every convolution + BatchNorm pair folded
    (:class:`FoldedConvBN`). Build it with :func:`fold`.

    ``graph``: where the input is a channels-last CPU tensor that needs no gradient, float32 or
    under autocast to bf16, the leading stages with no trainable parameter (the whole base in
    feature extraction, those below ``fine_tune_at`` in fine-tuning) run as one graph through
    oneDNN Graph (:mod:`tl_torch.frozen_graph`), one per input shape and dtype: traced in the
    call that first needs it, with the kept weights as constants; once a kept weight is folded
    again, that shape's graph is traced once more, reading the weights as buffers, and is
    handed new ones from then on. At most ``frozen_graph.GRAPH_SHAPES`` graphs are kept and
    ``GRAPH_TRACES`` traced (torch keeps some memory of each for the life of the process); past
    that, and for a shape oneDNN cannot build a graph for on this CPU (reported once, and in
    :meth:`cache_info`), the units run. The results differ from the units' own by rounding (the
    fused kernels sum in another order, and in bf16 round at other places), and do not depend
    on how many calls came before. ``graph = False``: never.
    """

    def __init__(self, base: MobileNetV2Base, *, graph: bool = True) -> None:
        super().__init__()
        self._base = (base,)   # a tuple: not registered (its parameters are the base's)
        self.graph = graph
        self._frozen_graphs = FrozenGraphs()
        self.units = nn.ModuleList()

        def stage(names: tuple[str, ...], residual: bool) -> Stage:
            # conv, BatchNorm [, ReLU6 [, ZeroPadding2D]] ... in the base's order
            layers = [base.keras_layer(name) for name in names]
            found, i = [], 0
            while i < len(layers):
                conv, bn = layers[i], layers[i + 1] if i + 1 < len(layers) else None
                if conv.type not in ("Conv2D", "DepthwiseConv2D") or bn is None \
                        or bn.type != "BatchNormalization":
                    raise ValueError(f"fold: expected a convolution and its BatchNormalization at "
                                     f"{conv.name}, found {[layer.type for layer in layers[i:i + 2]]}")
                i += 2
                relu = i < len(layers) and layers[i].type == "ReLU"
                i += relu
                pad = layers[i].module if relu and i < len(layers) and \
                    layers[i].type == "ZeroPadding2D" else None
                i += pad is not None
                self.units.append(FoldedConvBN(conv.module, bn.module, relu=relu, pad=pad))
                found.append(self.units[-1])
            return Stage(tuple(found), residual)

        # What forward runs, in order: the stem, the 17 blocks, the top convolution.
        self.stages: tuple[Stage, ...] = (
            stage(("Conv1", "bn_Conv1", "Conv1_relu"), residual=False),
            *(stage(block.layers, block.add is not None) for block in base.blocks),
            stage(("Conv_1", "Conv_1_bn", "out_relu"), residual=False))

    @property
    def base(self) -> MobileNetV2Base:
        """The base whose function this computes, and whose parameters it reads."""
        return self._base[0]

    def forget(self) -> None:
        """Drop the kept folded weights and the graphs made of them (they are made again at the
        next call); needed only after changing the base's tensors in place through
        ``tensor.data``."""
        for unit in self.units:
            unit.kept = None
        self._frozen_graphs.clear()

    def cache_info(self) -> CacheInfo:
        """What is kept between calls: folded and packed weights, graphs, and the input shapes
        that run without a graph (and why)."""
        graphs = self._frozen_graphs
        return CacheInfo(kept=sum(unit.kept is not None for unit in self.units),
                         packed_shapes=tuple(tuple(unit.packed_shapes()) for unit in self.units),
                         graphs=tuple(graphs.info()), traces=graphs.traces,
                         fallbacks=dict(graphs.fallbacks))

    def __getstate__(self) -> dict:
        # Pickled or copied without the graphs (traced again at the next call).
        return {**self.__dict__, "_frozen_graphs": FrozenGraphs()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        done, dtype = 0, graph_dtype(x)
        if self.graph and dtype is not None and internals.HAS_GRAPH_FUSION \
                and internals.onednn_on() and not torch.jit.is_tracing():
            done, x = self._graph(x, dtype)
        return self.run_stages(x, done, len(self.stages))            # (N, 1280, H/32, W/32)

    def run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Stages ``start`` to ``stop`` (the stem, the blocks, the top) through the units."""
        for stage in self.stages[start:stop]:
            shortcut = x
            for unit in stage.units[:-1]:
                x = unit(x)
            x = stage.units[-1](x, shortcut if stage.residual else None)
        return x

    def _graph(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """``(k, x after the first k stages)``, the k leading stages with no trainable parameter
        run as one graph in ``dtype`` (see the class docstring); ``(0, x)`` where the units must
        run them."""
        frozen = 0
        while frozen < len(self.stages) and all(u.frozen() for u in self.stages[frozen].units):
            frozen += 1
        weights = []
        for stage in self.stages[:frozen]:
            for unit in stage.units:
                pair = unit.folded(True, dtype)
                if unit.kept is None:   # folded at each call (see folded): nothing to trace
                    return 0, x
                weights.append(pair)
        if frozen == 0:
            return 0, x
        out = self._frozen_graphs.run(self, x.to(dtype), frozen, weights)
        return (0, x) if out is None else (frozen, out)


def fold(base: MobileNetV2Base, *, graph: bool = True) -> FoldedBase:
    """``base`` with every BatchNorm folded into its convolution: the same function, faster.
    Built once, it follows the base's weights, device and freezing (see :class:`FoldedBase`,
    which also says what ``graph`` does)."""
    return FoldedBase(base, graph=graph)
