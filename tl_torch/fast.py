"""Speed without changing the function: the frozen part of the base, folded.

A frozen convolution followed by its frozen, inference-mode BatchNorm computes
``gamma * (conv(x) - mean) / sqrt(var + eps) + beta``, an affine map of ``conv(x)``: one
convolution with scaled weights and a bias does the same in one pass. In feature extraction the
whole base is frozen; in fine-tuning the layers below ``fine_tune_at``. :func:`folded_modules`
returns replacement modules for those layers, which :meth:`MobileNetV2Base.forward` uses in place
of its own when given them; the base itself (its state dict, layer table, counts, Keras export)
is untouched. Trainable pairs (fine-tuning's upper layers) are folded too, on the fly: each
forward scales the live convolution weights by the BatchNorm's live ``gamma / sqrt(var + eps)``
(a few thousand multiplications) instead of normalising the activations, so autograd sends the
gradients to the original parameters and skips BatchNorm's backward pass over the activations.
Every ReLU6 then follows a convolution, whose backward pass needs its input, not its output: those
no gradient flows through run in place, the frozen ones within oneDNN's convolution itself
(:class:`FrozenConvReLU6`). The strided blocks pad their (small) input rather than their expanded
activations (:class:`PaddedFrozenConvReLU6`), and trainable 1x1 convolutions run as matrix
products. Folding changes rounding only (~1e-6 relative); the parity suite's training trajectory
runs through it.

:func:`keep_freed_memory` is the other large CPU lever (about 2x on this model's forward): glibc
maps every large tensor fresh from the kernel and returns it on free, so each activation costs
its page faults again; keeping freed memory in the heap reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
import torch.nn.functional as F
from torch import nn

from tl_torch.model import MobileNetV2Base
from tl_torch.padding import Conv2dSame, Pad2d, pad_amounts, zero_border_, zero_pad

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


def _has_fused_convolution() -> bool:
    """Whether this torch build has oneDNN's convolution with a fused activation (the op that
    ``torch.compile`` emits on the CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_convolution_pointwise")


_FUSED_CONVOLUTION = _has_fused_convolution()


class FrozenConvReLU6(nn.Module):
    """A folded frozen convolution (:func:`fold_conv_bn`) and the ReLU6 after it, in one oneDNN
    call on the CPU: the activation is applied as each output block is written, instead of in a
    second pass over the whole tensor (about a tenth of the base's forward time here). Falls
    back to the two operations, with identical results, where the fused call does not apply:
    other devices or dtypes, autocast, or an input that needs a gradient."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (_FUSED_CONVOLUTION and x.device.type == "cpu" and x.dtype == torch.float32
                and c.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not (x.requires_grad and torch.is_grad_enabled())
                and x.is_contiguous(memory_format=torch.channels_last)):
            if isinstance(c, Conv2dSame):
                x = c.pad(x)
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups,
                "hardtanh", [0.0, 6.0], "")
        return F.relu6(c(x), inplace=True)


class PaddedFrozenConvReLU6(FrozenConvReLU6):
    """A frozen 1x1 convolution + ReLU6 and the ZeroPadding2D after it, the padding moved before
    the convolution: the strided blocks pad their expanded activations (6x the channels of the
    block's input) for the depthwise convolution, a copy of the largest tensors of the network.
    Here the block's input is padded instead, the convolution runs on the padded input, and the
    padded border of its output, ``relu6(bias)`` there, is set back to 0: the same values,
    a sixth of the copying."""

    def __init__(self, conv: nn.Conv2d, pad: Pad2d) -> None:
        super().__init__(conv)
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0):
            raise ValueError("PaddedFrozenConvReLU6: the convolution must be 1x1, stride 1, "
                             "unpadded")
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        left, right, top, bottom = pad_amounts(h, w, self.pad.kernel, self.pad.stride,
                                               self.pad.pad_type)
        out = super().forward(zero_pad(x, left, right, top, bottom))
        return zero_border_(out, left, right, top, bottom)


class ReLU6(nn.Module):
    """ReLU6 in place where no gradient flows through it; out of place where one does, since
    autograd would copy the input of an in-place ReLU6 first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x, inplace=not (x.requires_grad and torch.is_grad_enabled()))


class LiveFoldedConvBN(nn.Module):
    """``bn(conv(x))``, ``bn`` in inference mode, as one convolution folded at every call from the
    two modules' current parameters: gradients reach ``conv.weight``, ``bn.weight`` and
    ``bn.bias`` through the folding (the modules are referenced, not copied)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if conv.bias is not None:
            raise ValueError("LiveFoldedConvBN: the convolution must have no bias (Keras' "
                             "MobileNetV2 convolutions have none)")
        self._modules_ref = (conv, bn)  # a tuple: not registered as submodules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self._modules_ref
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        if (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
                and x.is_contiguous(memory_format=torch.channels_last)):
            # A 1x1 convolution of a channels-last tensor is a matrix product over the channels:
            # BLAS' forward and backward beat oneDNN's convolution on these small maps.
            out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)   # (N, H, W, C_out)
            return out.permute(0, 3, 1, 2)                                  # channels-last
        if isinstance(conv, Conv2dSame):
            x = conv.pad(x)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def folded_modules(base: MobileNetV2Base) -> dict[str, nn.Module]:
    """Replacements for every convolution + BatchNorm pair and every ReLU6, by Keras name: folded
    once where both are frozen (Keras index < ``base.frozen_below``), else at every call."""
    layers = base.keras_layers
    frozen = base.frozen_below
    fast: dict[str, nn.Module] = {}
    for layer in layers[1:]:
        if layer.type in ("Conv2D", "DepthwiseConv2D"):
            bn = layers[layer.index + 1]
            if bn.type != "BatchNormalization":
                raise ValueError(f"{layer.name} is followed by {bn.name} ({bn.type}), not its "
                                 "BatchNormalization")
            if bn.index < frozen:  # both frozen: fold once
                fast[layer.name] = fold_conv_bn(layer.module, bn.module)
                after = layers[bn.index + 1] if bn.index + 1 < len(layers) else None
                if after is not None and after.type == "ReLU":  # no weights: frozen or not
                    fast[layer.name] = FrozenConvReLU6(fast[layer.name])
                    fast[after.name] = nn.Identity()
                    pad = layers[after.index + 1] if after.index + 1 < len(layers) else None
                    if (pad is not None and pad.type == "ZeroPadding2D"
                            and layer.module.kernel_size == (1, 1)):
                        fast[layer.name] = PaddedFrozenConvReLU6(fast[layer.name].conv,
                                                                 pad.module)
                        fast[pad.name] = nn.Identity()
            else:
                fast[layer.name] = LiveFoldedConvBN(layer.module, bn.module)
            fast[bn.name] = nn.Identity()
        elif layer.type == "ReLU" and layer.name not in fast:
            fast[layer.name] = ReLU6()
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
