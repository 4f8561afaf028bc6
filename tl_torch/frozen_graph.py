"""The frozen leading blocks of a folded base as one traced graph through oneDNN Graph.

oneDNN Graph (TorchScript's oneDNN fuser) computes a block's expanding 1x1 convolution and its
depthwise convolution together, so that the six times wider expanded activations are never
written out and read back. It needs a traced graph, one per input shape (shapes are constants in
a trace), of blocks whose weights do not change at every step: the whole base in feature
extraction, the blocks below ``fine_tune_at`` in fine-tuning. Under CPU autocast to bf16 the
graph is traced on bf16 inputs with the kept bf16 weights, one per input shape and dtype, so that
``--precision bf16-mixed`` gets the same fusion in bf16 kernels.

The graph runs in a flipped frame (:class:`FrozenStages`): on the image turned upside down and left
to right, with the kernels turned likewise, Keras' one-sided padding of a strided convolution
becomes the convolution's own symmetric padding, so the strided blocks fuse as the others do.

:class:`FrozenGraphs` keeps the graphs of one :class:`tl_torch.fast.FoldedBase` and decides, per
input shape, between the graph and the units: where oneDNN cannot build a graph for a shape (a
kernel it lacks for that size on this CPU), that shape runs through the units, with the same
numbers, after one warning; other shapes keep their graphs. Every private torch call is in
:mod:`tl_torch.internals`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tl_torch import internals
from tl_torch.padding import Conv2dSame, Pad2d


class FoldedBase(Protocol):
    """What this module reads of :class:`tl_torch.fast.FoldedBase` (not imported: that module
    imports this one)."""

    stages: tuple[Any, ...]   # tl_torch.fast.Stage: .units (each with .conv, .pad, .relu), .residual

    def run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...


#: A frozen pair's kept folded weight and bias, in the graph's dtype (float32 or bf16).
Weights = tuple[torch.Tensor, torch.Tensor]

#: Graphs kept per folded base (one per input shape), and traced in its life: torch keeps each
#: traced graph's compiled oneDNN kernels until the process ends, whatever becomes of the graph.
GRAPH_SHAPES = 4
GRAPH_TRACES = 16


@dataclass(frozen=True)
class GraphInfo:
    """One kept graph, as :meth:`tl_torch.fast.FoldedBase.cache_info` reports it."""

    input_shape: tuple[int, ...]
    dtype: torch.dtype   # float32, or bf16 (under CPU autocast)
    stages: int        # leading stages (stem, blocks, top) it runs
    flipped: bool      # in the flipped frame
    constants: bool    # meant to hold the weights as constants, else to read them as buffers
    reads_weights: bool   # the traced graph reads attributes of its module (the weights)
    fused_pairs: int   # oneDNN Graph partitions computing two convolutions together


class _Graph(NamedTuple):
    weights: tuple[Weights, ...]    # each unit's kept weight and bias that the graph holds
    run: torch.jit.ScriptModule     # a traced FrozenStages
    flipped: bool
    constants: bool


class NotFlippable(Exception):
    """A convolution whose windows the flipped frame does not reproduce (:func:`flipped_conv`)."""


class FrozenGraphs:
    """The graphs of one folded base, by (stages, input shape), and the shapes that fell back."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, _Graph] = {}
        # (stages, input shape, dtype) -> why no graph: per number of stages too, since
        # fine-tuning's graph of the lower stages can build where feature extraction's of the
        # whole base cannot, and must not depend on which phase came first in this process.
        self.fallbacks: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
        self.traces = 0
        self._warned = False

    def clear(self) -> None:
        self.graphs.clear()

    def run(self, folded: FoldedBase, x: torch.Tensor, stages: int,
            weights: list[Weights]) -> torch.Tensor | None:
        """The first ``stages`` stages of ``folded`` on ``x`` (float32, or bf16 with bf16
        ``weights``) through a graph, or None where the units must run them (no trace left, or
        none possible for this shape)."""
        key = (stages, tuple(x.shape), x.dtype)
        graph = self.graphs.get(key)
        constants = True
        if graph is not None and any(a is not b for old, new in zip(graph.weights, weights,
                                                                    strict=True)
                                     for a, b in zip(old, new, strict=True)):
            if graph.constants:
                # Weights folded again: a graph holding them as constants is traced once more,
                # reading them as buffers that are handed the new ones from then on.
                del self.graphs[key]
                graph, constants = None, False
            else:
                for n, (weight, bias) in enumerate(frame_weights(weights, graph.flipped)):
                    setattr(graph.run, f"weight_{n}", weight)
                    setattr(graph.run, f"bias_{n}", bias)
                graph = self.graphs[key] = graph._replace(weights=tuple(weights))
        if graph is None:
            graph = self._new(folded, x, key, weights, constants)
            if graph is None:
                return None
        with internals.graph_fusion(), no_autocast():
            return graph.run(x)

    def _new(self, folded: FoldedBase, x: torch.Tensor, key: tuple, weights: list[Weights],
             constants: bool) -> _Graph | None:
        """A graph traced for ``key`` (stages, input shape, dtype), or None."""
        if self.traces >= GRAPH_TRACES or key in self.fallbacks:
            return None
        try:
            run, flipped = _trace(folded, x, key[0], weights, constants)
        except Exception as error:  # noqa: BLE001 - any failure leaves the units' own path
            reason = self.fallbacks[key] = \
                f"{type(error).__name__}: {str(error).splitlines()[0]}"
            if not self._warned:
                self._warned = True
                warnings.warn(f"tl_torch.fast: {x.dtype} inputs of shape {key[1]} run through "
                              f"the folded units (the same numbers, unfused): oneDNN Graph could "
                              f"not build them here ({reason})", RuntimeWarning, stacklevel=4)
            return None
        self.traces += 1
        if len(self.graphs) >= GRAPH_SHAPES:
            del self.graphs[next(iter(self.graphs))]   # the oldest
        graph = self.graphs[key] = _Graph(tuple(weights), run, flipped, constants)
        return graph

    def info(self) -> list[GraphInfo]:
        return [GraphInfo(shape, dtype, stages, g.flipped, g.constants,
                          any(node.kind() == "prim::GetAttr" for node in g.run.graph.nodes()),
                          _fused_pairs(g.run, shape, dtype))
                for (stages, shape, dtype), g in self.graphs.items()]


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """A bf16 graph is traced and run with autocast off: its input and weights are bf16
    already, and autocast would have TorchScript record casts of its own."""
    with torch.autocast("cpu", enabled=False):
        yield


def _trace(folded: FoldedBase, x: torch.Tensor, stages: int, weights: list[Weights],
           constants: bool) -> tuple[torch.jit.ScriptModule, bool]:
    """The graph of the first ``stages`` stages for inputs shaped like ``x``, optimized, and
    whether it runs in the flipped frame (where the shapes allow). ``constants``: the weights
    are constants of the graph (``torch.jit.freeze``), which oneDNN Graph keeps in its own
    layout from the first call on; else buffers, which new ones can replace but which oneDNN
    reorders at every call. TorchScript first runs a graph unfused to profile it, then fused;
    those runs are made here, so that every result comes from the fused graph however many
    calls came before (a resumed run equals an uninterrupted one)."""
    with torch.inference_mode(False), torch.no_grad(), no_autocast(), warnings.catch_warnings():
        # torch.jit's deprecation notices, and the tracer's note that shapes become constants.
        warnings.simplefilter("ignore")
        example = x.clone()
        for flipped in (True, False):
            try:
                run = internals.trace(FrozenStages(folded, stages, weights, flipped), example)
                break
            except NotFlippable:   # a padding the flipped frame cannot express
                continue
        if constants:
            # optimize_numerics=False: nothing is folded into the (already folded) weights.
            run = torch.jit.freeze(run.eval(), optimize_numerics=False)
        with internals.graph_fusion():
            for _ in range(internals.profiled_runs() + 1):
                run(example)
    return run, flipped


def _fused_pairs(run: torch.jit.ScriptModule, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """oneDNN Graph partitions of ``run``'s optimized graph that compute two convolutions."""
    with internals.graph_fusion(), no_autocast():
        optimized = run.graph_for(torch.zeros(shape, dtype=dtype).contiguous(
            memory_format=torch.channels_last))

    def nodes(block):
        for node in block.nodes():
            yield node
            for inner in node.blocks():
                yield from nodes(inner)

    return sum(sum(n.kind() == "aten::_convolution" for n in group.g("Subgraph").nodes()) == 2
               for group in nodes(optimized) if group.kind() == "prim::oneDNNFusionGroup")


def frame_weights(weights: list[Weights], flipped: bool) -> Iterator[Weights]:
    """The weight and bias a graph reads for each kept unit, in run order: the kept ones, with
    the kernels wider than 1x1 turned upside down and left to right in the flipped frame."""
    for weight, bias in weights:
        if flipped and weight.shape[-2:] != (1, 1):
            with torch.inference_mode(False), torch.no_grad():
                weight = weight.flip((2, 3)).contiguous(memory_format=torch.channels_last)
        yield weight, bias


class FrozenStages(nn.Module):
    """The first ``stages`` stages of ``folded`` as a module to trace: its buffers are those
    stages' units' kept weights and biases (``weights``, in run order), which the traced graph
    reads, or holds as constants once frozen.

    ``flipped``: the stages run on the input turned upside down and left to right, with their
    kernels turned likewise, and the result is turned back. A convolution's output is then its
    usual output, turned; Keras' padding of a strided 3x3 convolution on an even size (none
    before, one after) becomes one before and none after, which a convolution's symmetric
    padding of 1 computes (its extra row and column lie past the last window). Raises
    :class:`NotFlippable` for a convolution whose padded input the windows do not tile exactly
    (torchvision's symmetric padding on an even size). ``flipped=False``: the units as they are."""

    def __init__(self, folded: FoldedBase, stages: int, weights: list[Weights],
                 flipped: bool) -> None:
        super().__init__()
        self._folded = (folded,)   # a tuple: not registered
        self.stages, self.flipped = stages, flipped
        for n, (weight, bias) in enumerate(frame_weights(weights, flipped)):
            self.register_buffer(f"weight_{n}", weight, persistent=False)
            self.register_buffer(f"bias_{n}", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = self._folded[0]
        if not self.flipped:
            return folded.run_stages(x, 0, self.stages)
        x = x.flip((2, 3))
        n, pending = 0, None   # pending: the ZeroPadding2D after the last unit, for the next
        stages = folded.stages[:self.stages]
        for stage in stages:
            shortcut = x
            for unit in stage.units:
                x = flipped_conv(x, unit.conv, getattr(self, f"weight_{n}"),
                                 getattr(self, f"bias_{n}"), pending)
                if unit.relu:
                    # In place but in the last stage: traced in place and turned back by the
                    # flip, the last one would leave the graph's output without a recorded
                    # layout, and oneDNN would write it NCHW through one more reorder. The
                    # others stay in place: out of place, the unfused tracing and profiling runs
                    # would need more memory, which the allocator then keeps.
                    x = F.relu6(x, inplace=stage is not stages[-1])
                n, pending = n + 1, unit.pad
            if stage.residual:
                x = shortcut + x
        if pending is not None:   # a padding for the stage after (not in MobileNetV2)
            raise NotFlippable("the frozen stages end with a ZeroPadding2D")
        return x.flip((2, 3))


def flipped_conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
                 pending: Pad2d | None) -> torch.Tensor:
    """``conv`` in the flipped frame (:class:`FrozenStages`), the ZeroPadding2D ``pending``
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
        raise NotFlippable(f"{conv} on a {height}x{width} input")
    return F.conv2d(x, weight, bias, conv.stride, (bottom, right), 1, conv.groups)
