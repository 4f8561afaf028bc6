"""Speed without changing the function: ``fold(base)``, the base with its BatchNorm folded away.

A convolution followed by its inference-mode BatchNorm computes
``gamma * (conv(x) - mean) / sqrt(var + eps) + beta``, an affine map of ``conv(x)``: one
convolution with scaled weights and a bias does the same in one pass. :func:`fold` returns a
:class:`FoldedBase`, a module that computes what the base computes that way, as torch's
``fuse_conv_bn_eval`` and timm's ``reparameterize_model`` do, with one difference that lets it be
built once and used in every phase: it has no parameters or buffers of its own. Each call folds
from the base's current parameters and statistics (a few thousand multiplications per layer,
next to the convolutions' millions), or reuses what it folded while those are unchanged (below),
so it is right after ``load_state_dict``, ``.to()``, and any change of which layers are frozen;
the base itself (state dict, layer table, counts, Keras export) is what trains and is saved.

Per convolution + BatchNorm pair, at each call:
- no gradient wanted for its parameters (frozen, or under ``no_grad``): folded without autograd,
  and, where a ReLU6 follows, run as one oneDNN convolution with the activation fused; a strided
  block's ZeroPadding2D after that ReLU6 is moved before the (1x1) convolution, so the block's
  input is padded rather than its six times wider expanded activations; a residual block's
  shortcut is added by its last convolution as it writes its output. The folded weight and bias
  are kept and reused while the six tensors they come from are unchanged: the same tensors
  (storage address, dtype, device), none modified in place since (autograd's version counter,
  which every in-place operation, ``load_state_dict`` and the optimizers bump). Only an in-place
  change made through ``tensor.data``, which autograd does not see either, goes unnoticed;
  :meth:`FoldedBase.forget` drops the kept weights. For the fused calls they are also kept in
  oneDNN's own weight layout, per input shape, which spares a reorder of every weight at every
  call;
- gradients wanted (fine-tuning's upper layers): folded with autograd, so gradients reach the
  convolution's weight and BatchNorm's gamma and beta, and BatchNorm's backward pass over the
  activations disappears; 1x1 convolutions run as matrix products.
On the CPU the leading blocks with no trainable parameter also run as one traced graph through
oneDNN Graph, which computes each block's expanding and depthwise convolutions together, the
strided blocks' too: the graph runs on the image turned upside down and left to right, where
Keras' one-sided padding becomes the depthwise convolution's own (:class:`FoldedBase`, ``graph``).
ReLU6 runs in place wherever autograd does not need its input. The results differ from the
base's only by float32 rounding (``tests/test_torch_fast.py`` bounds it; the parity suite's
training trajectory runs through the folded base).

:func:`keep_freed_memory` is the other CPU lever: glibc maps every large tensor fresh from the
kernel and returns it on free, so each activation pays its page faults again; keeping freed
memory in the heap reuses it (README, Performance, has the measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tl_torch.model import MobileNetV2Base
from tl_torch.padding import Conv2dSame, Pad2d, zero_border_, zero_pad

#: How many input shapes a frozen pair keeps a packed weight for (FoldedConvBN._pack).
_PACKED_SHAPES = 4
#: How many input shapes a FoldedBase keeps a graph of its frozen blocks for (FoldedBase._graph),
#: and how many graphs it traces in its life: torch keeps each traced graph's compiled oneDNN
#: kernels until the process ends (measured: 10-16 MB a graph), whatever becomes of the graph.
_GRAPH_SHAPES = 4
_GRAPH_TRACES = 16
#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, *,
                 divide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution equal to ``bn(conv(x))``, ``bn`` in inference
    mode; differentiable in the two modules' parameters. ``divide``: gamma / sqrt(var + eps),
    the frozen layers' rounding since folding began (the parity suite's trajectories were
    measured with it); else gamma * rsqrt(var + eps), cheaper to differentiate."""
    if divide:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)         # (C_out,)
    else:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def _has_fused_convolution() -> bool:
    """Whether this torch build has oneDNN's convolution with a fused activation (the op that
    ``torch.compile`` emits on the CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_convolution_pointwise")


_FUSED_CONVOLUTION = _has_fused_convolution()


def _has_graph_fusion() -> bool:
    """Whether this torch can run a traced graph through oneDNN Graph (TorchScript's oneDNN
    fuser), which computes a 1x1 convolution and the depthwise convolution after it together."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.jit, "trace")
            and hasattr(torch.jit, "enable_onednn_fusion")
            and hasattr(torch.jit, "onednn_fusion_enabled")
            and hasattr(torch._C, "_jit_get_num_profiled_runs"))


_GRAPH_FUSION = _has_graph_fusion()


def _fused_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution serves ``x`` and a gradient-free ``weight``: float32
    on the CPU, channels-last input, no autocast, no gradient wanted through ``x``."""
    return (_FUSED_CONVOLUTION and weight.dtype == torch.float32 and _cpu_float32(x)
            and not torch.jit.is_tracing())   # a traced graph records torch's own operations


def _cpu_float32(x: torch.Tensor) -> bool:
    """A float32 channels-last CPU tensor outside autocast that needs no gradient."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=torch.channels_last))


#: ``pack(x) -> weight``: the weight in oneDNN's own layout for an input like ``x`` (see
#: :meth:`FoldedConvBN._pack`); any other layout gives the same result, after a reorder.
Pack = Callable[[torch.Tensor], torch.Tensor]


def conv_relu6(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,
               bias: torch.Tensor, pack: Pack | None = None) -> torch.Tensor:
    """``relu6(conv(x))`` with ``conv``'s geometry and the given (folded, gradient-free) weight
    and bias: one oneDNN call on the CPU, the activation applied as each output block is written
    instead of in a second pass over the tensor; ``pack`` gives it the weight already in its
    layout. Two operations where the fused call does not apply: other devices or dtypes,
    autocast, or an input that needs a gradient. Their results are bitwise the fused call's in
    the tests, except for a batch of one, where torch's own convolution rounds differently
    (about 1e-7 relative)."""
    if _fused_applies(x, weight):
        return _fused(x, conv, weight, bias, pack, "hardtanh", [0.0, 6.0])
    return F.relu6(_conv(x, conv, weight, bias), inplace=True)


def conv_add(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
             other: torch.Tensor, pack: Pack | None = None) -> torch.Tensor:
    """``other + conv(x)`` with the given (folded, gradient-free) weight and bias: on the CPU one
    oneDNN call that adds ``other`` as it writes each output block (the same sums, measured
    bitwise equal), instead of a second pass over both tensors. Two operations where the fused
    call does not apply (as :func:`conv_relu6`)."""
    if (_fused_applies(x, weight) and other.dtype == torch.float32
            and not (torch.is_grad_enabled() and other.requires_grad)
            and not isinstance(conv, Conv2dSame)
            and other.is_contiguous(memory_format=torch.channels_last)):
        out = torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight if pack is None else pack(x), bias, list(conv.padding),
            list(conv.stride), list(conv.dilation), conv.groups, "add", None, None, [], None)
        if out.shape == other.shape:
            return out
        raise ValueError(f"conv_add: the shortcut's shape {tuple(other.shape)} is not the "
                         f"convolution's output shape {tuple(out.shape)}")
    return other + _conv(x, conv, weight, bias)


def conv_plain(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
               pack: Pack | None = None) -> torch.Tensor:
    """``conv(x)`` with the given (folded, gradient-free) weight and bias; through oneDNN's
    convolution with no post-op where the fused call applies (the same result as ``F.conv2d``,
    which calls the same primitive), so that ``pack`` can hand it the weight in its layout."""
    if pack is not None and _fused_applies(x, weight):
        return _fused(x, conv, weight, bias, pack, "none", [])
    return _conv(x, conv, weight, bias)


def _fused(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
           pack: Pack | None, post_op: str, scalars: list[float]) -> torch.Tensor:
    if isinstance(conv, Conv2dSame):
        x = conv.pad(x)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight if pack is None else pack(x), bias, list(conv.padding), list(conv.stride),
        list(conv.dilation), conv.groups, post_op, scalars, "")


def _conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,
          bias: torch.Tensor) -> torch.Tensor:
    if isinstance(conv, Conv2dSame):
        x = conv.pad(x)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1)


def _relu6(x: torch.Tensor) -> torch.Tensor:
    """In place where autograd does not need the input (it would copy it first otherwise)."""
    return F.relu6(x, inplace=not (x.requires_grad and torch.is_grad_enabled()))


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
        self._kept: _Kept | None = None   # see _folded

    def extra_repr(self) -> str:
        conv, _, pad = self._parts
        return f"{conv.__class__.__name__}{tuple(conv.weight.shape)}, relu={self.relu}, pad={pad}"

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
        weight, bias = self._folded(x.is_contiguous(memory_format=torch.channels_last))
        pack = self._pack if self._kept is not None and self._kept.weight is weight else None
        if not self.relu:
            if shortcut is not None:
                return conv_add(x, conv, weight, bias, shortcut, pack)
            return conv_plain(x, conv, weight, bias, pack)
        if pad is not None and _is_pointwise(conv):
            # Pad the block's input, not the expanded activations; the padded border of the
            # output, relu6(bias) there, is set back to the zeros the padding would have added.
            left, right, top, bottom = pad.amounts(*x.shape[-2:])
            out = conv_relu6(zero_pad(x, left, right, top, bottom), conv, weight, bias, pack)
            return zero_border_(out, left, right, top, bottom)
        out = conv_relu6(x, conv, weight, bias, pack)
        return out if pad is None else pad(out)

    def __getstate__(self) -> dict:
        # Pickled or copied without the kept weights (they are folded again at the next call).
        return {**self.__dict__, "_kept": None}

    def frozen(self) -> bool:
        """Whether none of the pair's parameters wants a gradient."""
        for t in self._sources()[:4]:
            if t is not None and t.requires_grad:
                return False
        return True

    def _sources(self) -> tuple[torch.Tensor | None, ...]:
        """What the folded weight and bias come from: the convolution's weight and bias,
        BatchNorm's gamma, beta, mean and variance. Read from the modules' own tables, several
        times quicker than through their attributes (``nn.Module.__getattr__``): every frozen
        pair is asked at every call, and 52 of them took about 1.5 ms a call that way."""
        conv, bn, _ = self._parts
        try:
            p, q, b = conv._parameters, bn._parameters, bn._buffers
            return (p["weight"], p["bias"], q["weight"], q["bias"], b["running_mean"],
                    b["running_var"])
        except KeyError:   # computed attributes (a parametrization, a subclass)
            return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)

    def _folded(self, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient-free folded weight (channels-last if asked, as oneDNN wants it) and
        bias: kept from the last call while their sources are unchanged (the module's
        docstring says what that means), else folded again."""
        sources = self._sources()
        key: list = [channels_last]
        for t in sources:
            if t is None:
                key.append(None)
            elif t.is_inference():
                # Made under inference_mode: no version counter to tell a change. Fold each call.
                self._kept = None
                return self._fold(channels_last)
            else:
                key.append((t.data_ptr(), t._version, t.dtype, t.device))
        key = tuple(key)
        if self._kept is None or self._kept.key != key:
            storages = [t.untyped_storage() for t in sources if t is not None]
            with torch.inference_mode(False):   # usable outside inference mode too
                self._kept = _Kept(key, *self._fold(channels_last), storages, {})
        return self._kept.weight, self._kept.bias

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """The kept folded weight in the layout oneDNN's convolution wants for inputs shaped
        like ``x``, made once per shape (a few: the last one or two batches of a data set are
        smaller) and dropped with the kept weights. Without it oneDNN reorders the weight from
        torch's layout at every call."""
        conv = self._parts[0]
        packs = self._kept.packs
        shape = tuple(x.shape)
        packed = packs.get(shape)
        if packed is None:
            if len(packs) >= _PACKED_SHAPES:
                del packs[next(iter(packs))]   # the oldest
            with torch.inference_mode(False):
                packed = packs[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self._kept.weight.to_mkldnn(), list(conv.padding), list(conv.stride),
                    list(conv.dilation), conv.groups, list(shape))
        return packed

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
        if _is_pointwise(conv) and x.is_contiguous(memory_format=torch.channels_last):
            # A 1x1 convolution of a channels-last tensor is a matrix product over the channels:
            # BLAS' forward and backward beat oneDNN's convolution on these small maps.
            out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)   # (N, H, W, C_out)
            out = out.permute(0, 3, 1, 2)                                   # channels-last
        else:
            out = _conv(x, conv, weight, bias)
        if self.relu:
            out = _relu6(out)
        return out if pad is None else pad(out)


class _Graph(NamedTuple):
    """A traced graph of a FoldedBase's frozen leading blocks (FoldedBase._graph)."""
    kept: tuple              # each unit's _Kept whose weight and bias the graph holds
    run: torch.jit.ScriptModule   # a traced _FrozenStages
    flipped: bool            # traced in the flipped frame (_FrozenStages)
    constants: bool          # holds the weights as constants, else reads them as buffers


class _Kept(NamedTuple):
    """What a frozen pair keeps between calls (FoldedConvBN._folded)."""
    key: tuple             # what the weights were folded from
    weight: torch.Tensor   # folded, gradient-free
    bias: torch.Tensor
    storages: list         # the sources' storages, held so that no new tensor takes their address
    packs: dict            # input shape -> the weight in oneDNN's layout (FoldedConvBN._pack)


@dataclass(frozen=True)
class _FoldedBlock:
    units: tuple[int, ...]   # indices into FoldedBase.units, in order
    residual: bool


class FoldedBase(nn.Module):
    """What ``base(x)`` computes, with every convolution + BatchNorm pair folded
    (:class:`FoldedConvBN`). Build it with :func:`fold`.

    ``graph``: where the input is a float32 channels-last CPU tensor that needs no gradient, the
    leading blocks with no trainable parameter (the whole base in feature extraction, those below
    ``fine_tune_at`` in fine-tuning) run as one graph, traced from these units with their kept
    weights as constants and run through oneDNN Graph (TorchScript's oneDNN fuser): it computes
    each block's expanding 1x1 convolution and its depthwise convolution together, so that the
    six times wider expanded activations are not written out and read back; the strided blocks'
    too, for the graph runs in a flipped frame where their padding is the depthwise
    convolution's own (:class:`_FrozenStages`; torchvision's padding on an even image size
    keeps the usual frame, where the strided blocks pad apart). One graph per input shape (at
    most four kept, at most 16 traced: torch keeps some memory of each for the life of the
    process; past that, new shapes run through the units). Once a kept weight is folded again,
    that shape's graph is traced once more, reading the weights as buffers, and is handed the
    new ones from then on (:meth:`_trace` says what each way costs). A graph is traced and
    optimized in the call that first needs it (a second or so on a CPU). The results differ
    from the units' own by float32 rounding (the fused kernels sum in another order), and do
    not depend on how many calls came before. Where tracing fails, the units run as they are, after one
    warning; where this torch has no oneDNN Graph (torch.jit is deprecated), they run so
    silently. ``graph = False``: never.
    """

    def __init__(self, base: MobileNetV2Base, *, graph: bool = True) -> None:
        super().__init__()
        self._base = (base,)   # a tuple: not registered (its parameters are the base's)
        self.graph = graph
        self._graphs: dict[tuple, _Graph] = {}   # (stages, input shape) -> graph; see _graph
        self._traced = 0                         # graphs traced so far (_GRAPH_TRACES)
        self.units = nn.ModuleList()

        def units_of(names: tuple[str, ...]) -> tuple[int, ...]:
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
                found.append(len(self.units) - 1)
            return tuple(found)

        # What forward runs, in order: the stem, the 17 blocks, the top convolution.
        self._stages = (
            _FoldedBlock(units_of(("Conv1", "bn_Conv1", "Conv1_relu")), residual=False),
            *(_FoldedBlock(units_of(block.layers), block.add is not None) for block in base.blocks),
            _FoldedBlock(units_of(("Conv_1", "Conv_1_bn", "out_relu")), residual=False))

    @property
    def base(self) -> MobileNetV2Base:
        """The base whose function this computes, and whose parameters it reads."""
        return self._base[0]

    def forget(self) -> None:
        """Drop the kept folded weights and the graphs made of them (they are made again at the
        next call); needed only after changing the base's tensors in place through
        ``tensor.data``."""
        for unit in self.units:
            unit._kept = None
        self._graphs.clear()

    def __getstate__(self) -> dict:
        # Pickled or copied without the graphs (traced again at the next call).
        return {**self.__dict__, "_graphs": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        done = 0
        if self.graph and _GRAPH_FUSION and _cpu_float32(x) and not torch.jit.is_tracing():
            done, x = self._graph(x)
        return self._run(x, done, len(self._stages))            # (N, 1280, H/32, W/32)

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Stages ``start`` to ``stop`` (the stem, the blocks, the top) through the units."""
        units = list(self.units)   # indexing a list, not the ModuleList (slower, at every unit)
        for stage in self._stages[start:stop]:
            shortcut = x
            for i in stage.units[:-1]:
                x = units[i](x)
            x = units[stage.units[-1]](x, shortcut if stage.residual else None)
        return x

    def _graph(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """``(k, x after the first k stages)``, the k leading stages with no trainable parameter
        run as one graph (see the class docstring); ``(0, x)`` where there are none."""
        units = list(self.units)
        frozen = 0
        while frozen < len(self._stages) and all(
                units[i].frozen() for i in self._stages[frozen].units):
            frozen += 1
        kept = []
        for stage in self._stages[:frozen]:
            for i in stage.units:
                unit = units[i]
                unit._folded(channels_last=True)
                if unit._kept is None:   # folded at each call (see _folded): nothing to trace
                    return 0, x
                kept.append(unit._kept)
        if frozen == 0:
            return 0, x
        key = (frozen, tuple(x.shape))   # shapes are constants in a trace
        graph = self._graphs.get(key)
        constants = True
        if graph is not None and any(a is not b for a, b in zip(graph.kept, kept, strict=True)):
            if graph.constants:
                # Weights folded again: a graph holding them as constants is traced once more,
                # reading them as buffers that are handed the new ones from then on.
                del self._graphs[key]
                graph, constants = None, False
            else:
                for n, (weight, bias) in enumerate(_frame_weights(kept, graph.flipped)):
                    setattr(graph.run, f"weight_{n}", weight)
                    setattr(graph.run, f"bias_{n}", bias)
                graph = self._graphs[key] = graph._replace(kept=tuple(kept))
        if graph is None:
            if self._traced >= _GRAPH_TRACES:   # see _GRAPH_TRACES
                return 0, x
            try:
                run, flipped = self._trace(x, frozen, kept, constants)
            except Exception as error:  # noqa: BLE001 - any failure leaves the units' own path
                self.graph = False
                warnings.warn(f"tl_torch.fast: the frozen blocks run without oneDNN Graph, "
                              f"which failed to trace them ({type(error).__name__}: {error})",
                              RuntimeWarning, stacklevel=3)
                return 0, x
            self._traced += 1
            if len(self._graphs) >= _GRAPH_SHAPES:
                del self._graphs[next(iter(self._graphs))]   # the oldest
            graph = self._graphs[key] = _Graph(tuple(kept), run, flipped, constants)
        with _onednn_fusion():
            return frozen, graph.run(x)

    def _trace(self, x: torch.Tensor, stages: int, kept: list,
               constants: bool) -> tuple[torch.jit.ScriptModule, bool]:
        """The graph of the first ``stages`` stages for inputs shaped like ``x``, optimized, and
        whether it runs in the flipped frame (:class:`_FrozenStages`; where the shapes allow).
        ``constants``: the graph holds the weights as constants (``torch.jit.freeze``), which
        oneDNN Graph keeps in its own layout from the first call on; else it reads them as
        buffers, which new ones can replace but which oneDNN reorders at every call (52 weights,
        1.5-1.7 ms a call at batch 32, about 1 ms at batch 1).
        TorchScript first runs a graph unfused to profile it (torch's own operations), then
        fused; those runs are made here, so that every result comes from the fused graph,
        however many calls came before (a resumed run equals an uninterrupted one)."""
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch.jit's deprecation notices, and the tracer's note that shapes become
            # constants (why each input shape has a graph of its own).
            warnings.simplefilter("ignore")
            example = x.clone()
            for flipped in (True, False):
                try:
                    run = torch.jit.trace(_FrozenStages(self, stages, kept, flipped), example,
                                          check_trace=False,
                                          _compilation_unit=torch._C.CompilationUnit())
                    break
                except _NotFlippable:   # a padding the flipped frame cannot express
                    continue
            if constants:
                # optimize_numerics=False: nothing is folded into the (already folded) weights.
                run = torch.jit.freeze(run.eval(), optimize_numerics=False)
            with _onednn_fusion():
                for _ in range(torch._C._jit_get_num_profiled_runs() + 1):
                    run(example)
        return run, flipped


class _NotFlippable(Exception):
    """A convolution whose windows the flipped frame does not reproduce (_FrozenStages)."""


def _frame_weights(kept: list[_Kept],
                   flipped: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The weight and bias a graph reads for each kept unit, in run order: the kept ones, with
    the kernels wider than 1x1 turned upside down and left to right in the flipped frame."""
    for unit_kept in kept:
        weight = unit_kept.weight
        if flipped and weight.shape[-2:] != (1, 1):
            with torch.inference_mode(False), torch.no_grad():
                weight = weight.flip((2, 3)).contiguous(memory_format=torch.channels_last)
        yield weight, unit_kept.bias


class _FrozenStages(nn.Module):
    """The first ``stages`` stages of ``folded`` as a module to trace: its buffers are those
    stages' units' weights and biases (from ``kept``, in run order), which the traced graph
    reads, or holds as constants once frozen (:meth:`FoldedBase._trace`).

    ``flipped``: the stages run on the input turned upside down and left to right, with their
    3x3 kernels turned likewise, and the result is turned back. A convolution's output is then
    its output in the usual frame, turned; but Keras' padding of a strided 3x3 convolution on an
    even size (none before, one after) becomes one before and none after, and that, unlike Keras'
    own, a convolution's symmetric padding of 1 computes (its extra row and column lie past the
    last window). Every stride-2 block then computes its padding inside its depthwise
    convolution instead of as a separate copy, and oneDNN Graph computes it together with the
    block's expanding convolution, as it does the stride-1 blocks'. Raises _NotFlippable for a
    convolution whose padded input the windows do not tile exactly (torchvision's symmetric
    padding on an even size): the first and last windows would not trade places. Otherwise
    (``flipped=False``) the stages run through the units as they are (the same tensors the
    units read, which the tracer records as these buffers)."""

    def __init__(self, folded: FoldedBase, stages: int, kept: list[_Kept],
                 flipped: bool) -> None:
        super().__init__()
        self._folded = (folded,)   # a tuple: not registered
        self.stages, self.flipped = stages, flipped
        for n, (weight, bias) in enumerate(_frame_weights(kept, flipped)):
            self.register_buffer(f"weight_{n}", weight, persistent=False)
            self.register_buffer(f"bias_{n}", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self._folded[0]
        if not self.flipped:
            return folded._run(x, 0, self.stages)
        x = x.flip((2, 3))
        n, pending = 0, None   # pending: the ZeroPadding2D after the last unit, for the next
        last = folded._stages[self.stages - 1]
        for stage in folded._stages[:self.stages]:
            shortcut = x
            for i in stage.units:
                unit = folded.units[i]
                conv, _, pad = unit._parts
                x = _flipped_conv(x, conv, getattr(self, f"weight_{n}"),
                                  getattr(self, f"bias_{n}"), pending)
                if unit.relu:
                    # In place but in the last stage: traced in place and turned back by the
                    # flip, the last one left the graph's output with no recorded layout, and
                    # oneDNN wrote it NCHW through one more reorder (0.5-0.8 ms at batch 32).
                    # Not all out of place: oneDNN Graph fuses them either way, but the
                    # unfused tracing and profiling runs would need ~200 MB more at batch 32,
                    # which glibc then keeps (keep_freed_memory).
                    x = F.relu6(x, inplace=stage is not last)
                n, pending = n + 1, pad
            if stage.residual:
                x = shortcut + x
        if pending is not None:   # a padding for the stage after (not in MobileNetV2)
            raise _NotFlippable("the frozen stages end with a ZeroPadding2D")
        return x.flip((2, 3))


def _flipped_conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
                  pending: Pad2d | None) -> torch.Tensor:
    """``conv`` in the flipped frame (:class:`_FrozenStages`), the ZeroPadding2D ``pending``
    before it: the padding each side had in the usual frame goes to the opposite side."""
    height, width = x.shape[-2:]
    # left, right, top, bottom in the usual frame
    amounts = (conv.pad.amounts(height, width) if isinstance(conv, Conv2dSame) else
               (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]))
    if pending is not None:
        amounts = [a + b for a, b in zip(amounts, pending.amounts(height, width), strict=True)]
    left, right, top, bottom = amounts
    # (size, padding before and after in the flipped frame, kernel, stride) per dimension
    dims = ((height, bottom, top, conv.kernel_size[0], conv.stride[0]),
            (width, right, left, conv.kernel_size[1], conv.stride[1]))
    # The windows must tile the padded input exactly, and the padding before serve as a
    # symmetric one: what that adds after (before - after) lies past the last window.
    if conv.dilation != (1, 1) or not all(
            (size + before + after - kernel) % stride == 0 and 0 <= before - after < stride
            for size, before, after, kernel, stride in dims):
        raise _NotFlippable(f"{conv} on a {height}x{width} input")
    return F.conv2d(x, weight, bias, conv.stride, (bottom, right), 1, conv.groups)


@contextlib.contextmanager
def _onednn_fusion() -> Iterator[None]:
    """TorchScript's oneDNN fuser on (it is read when a graph is optimized, in a call), and
    back as it was after."""
    previous = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(previous)


def fold(base: MobileNetV2Base, *, graph: bool = True) -> FoldedBase:
    """``base`` with every BatchNorm folded into its convolution: the same function, faster.
    Built once, it follows the base's weights, device and freezing (see :class:`FoldedBase`,
    which also says what ``graph`` does)."""
    return FoldedBase(base, graph=graph)


def keep_freed_memory() -> bool:
    """Keep freed memory in the process (glibc only); True if applied. Process-wide: call it in
    a program's entry point, not in a library import."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl...)
        return False


def native_bf16_cpu() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles); None if unknown.

    Without them bf16 costs time instead of saving it: on an AVX2 CPU torch's convolutions in bf16
    leave oneDNN for slow fallback kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
    False there), measured 27-31 times slower than float32 (the README's Performance section)."""
    probes = [getattr(torch.cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(p) for p in probes):
        return None
    return any(p() for p in probes)


def bf16_cost_warning(precision: str, accelerator: str) -> str | None:
    """A one-line warning for ``--precision bf16-*`` on a CPU that would emulate it."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if "bf16" not in precision or not on_cpu or native_bf16_cpu() is not False:
        return None
    return (f"warning: --precision {precision} on a CPU without native bf16 (no AVX512-BF16 or "
            "AMX) runs on slow fallback kernels: measured 27-31x slower than 32-true on an AMD "
            "EPYC with AVX2 (README, Performance); bf16 also changes the numbers; 32-true is the "
            "fast choice here")
