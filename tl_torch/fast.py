"""Speed without changing the function: the frozen part of the base, folded.

A frozen convolution followed by its frozen, inference-mode BatchNorm computes
``gamma * (conv(x) - mean) / sqrt(var + eps) + beta``, an affine map of ``conv(x)``: one
convolution with scaled weights and a bias does the same in one pass. In feature extraction the
whole base is frozen; in fine-tuning the layers below ``fine_tune_at``. :func:`folded_modules`
returns replacement modules for those layers, which :meth:`MobileNetV2Base.forward` uses in place
of its own when given them; the base itself (its state dict, layer table, counts, Keras export)
is untouched. Frozen ReLU6 layers run in place, since nothing there needs its input for a
backward pass. Folding changes rounding only (~1e-6 relative); the parity suite's training
trajectory runs through it.

:func:`keep_freed_memory` is the other large CPU lever (about 2x on this model's forward): glibc
maps every large tensor fresh from the kernel and returns it on free, so each activation costs
its page faults again; keeping freed memory in the heap reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import nn

from tl_torch.model import MobileNetV2Base
from tl_torch.padding import Conv2dSame

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution equal to ``bn(conv(x))`` with ``bn`` in inference mode (no gradients)."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)          # (C_out,)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
    kwargs = {"stride": conv.stride, "dilation": conv.dilation, "groups": conv.groups}
    if isinstance(conv, Conv2dSame):
        fused = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size,
                           pad_type=conv.pad.pad_type, **kwargs)
    else:
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                          padding=conv.padding, **kwargs)
    fused = fused.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    fused.weight = nn.Parameter(fused.weight.contiguous(memory_format=torch.channels_last),
                                requires_grad=False)
    fused.bias.requires_grad_(False)
    return fused.eval()


def folded_modules(base: MobileNetV2Base) -> dict[str, nn.Module]:
    """Replacements for the frozen layers (Keras index < ``base.frozen_below``), by Keras name."""
    layers = base.keras_layers
    frozen = base.frozen_below
    fast: dict[str, nn.Module] = {}
    for layer in layers[1:frozen]:
        if layer.type in ("Conv2D", "DepthwiseConv2D"):
            bn = layers[layer.index + 1]
            if bn.index < frozen:  # its BatchNorm frozen too
                fast[layer.name] = fold_conv_bn(layer.module, bn.module)
                fast[bn.name] = nn.Identity()
        elif layer.type == "ReLU":
            fast[layer.name] = nn.ReLU6(inplace=True)
    return fast


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
