"""One folded convolution + BatchNorm pair's arithmetic: the fold, and the fused oneDNN calls.

:func:`fold_conv_bn` gives the one convolution equal to a convolution and its inference-mode
BatchNorm; :func:`conv_relu6`, :func:`conv_add` and :func:`conv_plain` run it with its activation,
its residual addition, or nothing, in one oneDNN call where that applies
(:mod:`tl_torch.internals`), else through torch's public operations, which give the same result.
:mod:`tl_torch.fast` builds the folded base from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tl_torch import internals
from tl_torch.padding import Conv2dSame

#: oneDNN's bf16 kernels, asked once (``ONEDNN_MAX_CPU_ISA`` is read when the process starts).
BF16_KERNELS = internals.bf16_kernels()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, *,
                 divide: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution equal to ``bn(conv(x))``, ``bn`` in inference
    mode; differentiable in the two modules' parameters. ``divide``: gamma / sqrt(var + eps),
    the frozen pairs' rounding, which the parity suite's trajectories follow; else
    gamma * rsqrt(var + eps), cheaper to differentiate."""
    if divide:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)         # (C_out,)
    else:
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def autocast_bf16(x: torch.Tensor) -> bool:
    """CPU autocast to bf16 is on, and oneDNN can compute it."""
    return (BF16_KERNELS and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def fused_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused convolution serves ``x`` and a gradient-free ``weight`` of its
    dtype: float32 outside autocast, or bf16 where oneDNN has bf16 kernels; on the CPU,
    channels-last, no gradient wanted through ``x``."""
    dtype_ok = (x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")) or (
        x.dtype == torch.bfloat16 and BF16_KERNELS)
    return (internals.HAS_FUSED_CONVOLUTION and dtype_ok and weight.dtype == x.dtype
            and internals.onednn_on()
            and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_tracing())   # a traced graph records torch's own operations


def graph_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a graph of frozen blocks computes ``x`` in: float32 for a float32 input outside
    autocast, bf16 under CPU autocast to bf16 where oneDNN can compute it; None for anything
    else (another device or dtype, not channels-last, an input that needs a gradient)."""
    if (x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled())
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return None
    if x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return torch.bfloat16 if autocast_bf16(x) else None


def conv_relu6(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,
               bias: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """``relu6(conv(x))`` with ``conv``'s geometry and the given (folded, gradient-free) weight
    and bias: one oneDNN call on the CPU, the activation applied as each output block is
    written; ``packed``: the weight already in oneDNN's layout for ``x``. Two operations where
    the fused call does not apply (other devices or dtypes, autocast to other than bf16, an
    input that needs a gradient)."""
    if fused_applies(x, weight):
        x = conv.pad(x) if isinstance(conv, Conv2dSame) else x
        return internals.conv_pointwise(x, weight if packed is None else packed, bias, conv,
                                        "hardtanh", (0.0, 6.0))
    return F.relu6(convolve(x, conv, weight, bias), inplace=True)


def conv_add(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
             other: torch.Tensor, packed: torch.Tensor | None = None, *,
             relu: bool = False) -> torch.Tensor:
    """``other + conv(x)`` with the given (folded, gradient-free) weight and bias: on the CPU one
    oneDNN call that adds ``other`` as it writes each output block, instead of a second pass over
    both tensors; ``relu``: ``relu(other + conv(x))``, in the same call. Separate operations where
    the fused call does not apply (as :func:`conv_relu6`)."""
    if (fused_applies(x, weight) and other.dtype == x.dtype
            and not (torch.is_grad_enabled() and other.requires_grad)
            and not isinstance(conv, Conv2dSame)
            and other.is_contiguous(memory_format=torch.channels_last)):
        out = internals.conv_add(x, other, weight if packed is None else packed, bias, conv,
                                 "relu" if relu else None)
        if out.shape == other.shape:
            return out
        raise ValueError(f"conv_add: the shortcut's shape {tuple(other.shape)} is not the "
                         f"convolution's output shape {tuple(out.shape)}")
    out = other + convolve(x, conv, weight, bias)
    return F.relu(out) if relu else out


def conv_plain(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor,
               packed: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` with the given (folded, gradient-free) weight and bias; through oneDNN's
    convolution with no post-op where a packed weight is given."""
    if packed is not None and fused_applies(x, weight):
        x = conv.pad(x) if isinstance(conv, Conv2dSame) else x
        return internals.conv_pointwise(x, packed, bias, conv, "none", ())
    return convolve(x, conv, weight, bias)


def convolve(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,
          bias: torch.Tensor) -> torch.Tensor:
    if isinstance(conv, Conv2dSame):
        x = conv.pad(x)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def absorb_padding(weight: torch.Tensor, conv: nn.Conv2d,
                   amounts: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """Zero padding ``amounts`` (left, right, top, bottom) before ``conv`` (``padding=0``,
    no dilation) as the convolution's own symmetric padding, or None where it cannot be.

    TF's "same" pads symmetrically or one more after than before. A kernel with one more zero
    tap before, padded by the larger amount on both sides, reads the same inputs with the same
    weights at every output, so the sums are those of the padded input; it spares the copy of
    the whole input that padding it costs (the padded tensor is written anew), several times
    the convolution's own time for a depthwise one."""
    left, right, top, bottom = amounts
    if conv.padding != (0, 0) or conv.dilation != (1, 1) or not (
            right - left in (0, 1) and bottom - top in (0, 1)):
        return None
    if right > left or bottom > top:
        weight = F.pad(weight, (right - left, 0, bottom - top, 0))
    return weight, (bottom, right)


def is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1)


def relu6_(x: torch.Tensor) -> torch.Tensor:
    """In place where autograd does not need the input (it would copy it first otherwise)."""
    return F.relu6(x, inplace=not (x.requires_grad and torch.is_grad_enabled()))
