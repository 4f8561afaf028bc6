"""The torch internals the speed path uses, in one place, each behind a feature check.

torch offers no public call for what :mod:`tl_torch.fast` needs on the CPU: oneDNN's convolution
with an activation or an addition fused, a weight kept in oneDNN's own layout, and TorchScript's
oneDNN Graph fuser (``torch.jit`` is deprecated, and ``torch.compile`` does not fuse a 1x1
convolution with the depthwise convolution after it). Everything private is called here and
nowhere else, so that a torch upgrade that removes or changes one of them costs speed, never a
wrong number: each ``HAS_*`` flag is False where the call is missing, and the callers then take
their public path (``F.conv2d`` and friends), which the tests run too.

Checked on torch 2.14.1 (CPU builds with oneDNN). Where a later torch breaks one of these in a
way the flags cannot see, the call raises and :mod:`tl_torch.fast` falls back once with a warning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _has_fused_convolution() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_convolution_pointwise")


def _has_weight_packing() -> bool:
    return _has_fused_convolution() and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")


def _has_graph_fusion() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.jit, "trace")
            and hasattr(torch.jit, "freeze") and hasattr(torch.jit, "enable_onednn_fusion")
            and hasattr(torch.jit, "onednn_fusion_enabled")
            and hasattr(torch._C, "_jit_get_num_profiled_runs")
            and hasattr(torch._C, "CompilationUnit"))


#: oneDNN's convolution with a fused post-operation (the op ``torch.compile`` emits on the CPU).
HAS_FUSED_CONVOLUTION = _has_fused_convolution()
#: A convolution weight reordered once into the layout oneDNN wants for a given input shape.
HAS_WEIGHT_PACKING = _has_weight_packing()
#: TorchScript tracing with the oneDNN Graph fuser.
HAS_GRAPH_FUSION = _has_graph_fusion()


def onednn_on() -> bool:
    """oneDNN is built in and not switched off (``torch.backends.mkldnn.flags(enabled=False)``):
    read at each call, so that switching it off takes every call here off it."""
    return torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled)


def conv_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                   post_op: str, scalars: Sequence[float],
                   padding: Sequence[int] | None = None) -> torch.Tensor:
    """``post_op(conv(x))`` in one oneDNN call (``post_op``: "none", "hardtanh"...), with
    ``conv``'s geometry (its own padding only, or ``padding``) and the given weight and bias."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, list(conv.padding if padding is None else padding), list(conv.stride),
        list(conv.dilation), conv.groups, post_op, list(scalars), "")


def conv_add(x: torch.Tensor, other: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             conv: nn.Conv2d, post_op: str | None = None) -> torch.Tensor:
    """``other + conv(x)`` in one oneDNN call, ``other`` added as each output block is written;
    ``post_op`` ("relu"): applied to the sum in the same call."""
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, "add", None, post_op, [], None)


def pack_weight(weight: torch.Tensor, conv: nn.Conv2d, input_shape: Sequence[int]) -> torch.Tensor:
    """``weight`` in oneDNN's own layout for inputs of ``input_shape`` (an opaque tensor that only
    :func:`conv_pointwise` and :func:`conv_add` read)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, list(input_shape))


def bf16_kernels() -> bool:
    """Whether oneDNN has bf16 convolution kernels under the current settings (it answers
    False where ``ONEDNN_MAX_CPU_ISA`` caps it below AVX-512)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def version(t: torch.Tensor) -> int:
    """autograd's version counter of ``t``: bumped by every in-place change it sees."""
    return t._version


def trace(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``module`` traced on ``example``, in a compilation unit of its own (so that many traces of
    one module class do not share, and keep alive, each other's compiled graphs)."""
    return torch.jit.trace(module, example, check_trace=False,
                           _compilation_unit=torch._C.CompilationUnit())


def profiled_runs() -> int:
    """How many calls TorchScript's profiling executor runs a graph unfused before it optimizes it."""
    return torch._C._jit_get_num_profiled_runs()


@contextlib.contextmanager
def graph_fusion() -> Iterator[None]:
    """TorchScript's oneDNN fuser on (it is read when a graph is optimized, in a call), and
    back as it was after."""
    previous = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(previous)
