"""TensorFlow's "same" padding, isolated: a pure function and one thin module.

A stride-2 3x3 convolution in Keras (``padding="same"``, or ``ZeroPadding2D(correct_pad)`` before a
``valid`` one) pads 0 before and 1 after on an even input, 1 on each side on an odd one. PyTorch's
``padding=1`` pads 1 on each side: the output shape is the same, but every value moves by a pixel.
Which rule applies is decided by where the weights come from (``"same"`` for Keras weights,
``"symmetric"`` for torchvision's), in one place: :func:`tl_torch.model.build_base`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAD_TYPES = ("same", "symmetric")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TF's "same" for one spatial dimension.

    Output size is ``ceil(size / stride)``; the total padding needed for it goes after when odd.
    """
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def symmetric_padding(kernel: int, dilation: int = 1) -> tuple[int, int]:
    """PyTorch's ``padding=k // 2`` on both sides, as torchvision's MobileNetV2 uses."""
    half = ((kernel - 1) * dilation) // 2
    return half, half


def pad_amounts(height: int, width: int, kernel: int, stride: int, pad_type: str) -> tuple[int, ...]:
    """Arguments for ``F.pad`` (left, right, top, bottom)."""
    if pad_type == "same":
        top, bottom = same_padding(height, kernel, stride)
        left, right = same_padding(width, kernel, stride)
    elif pad_type == "symmetric":
        top, bottom = left, right = symmetric_padding(kernel)
    else:
        raise ValueError(f"pad_type={pad_type!r} is not supported; expected one of {PAD_TYPES}")
    return left, right, top, bottom


def zero_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """``F.pad(x, (left, right, top, bottom))`` for NCHW ``x``, keeping its memory format.

    Written as a copy into an uninitialised tensor whose border strips alone are zeroed: on the
    CPU ``F.pad`` zero-fills the whole output first, which costs as much as the copy again.
    """
    n, c, h, w = x.shape
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           and not x.is_contiguous() else torch.contiguous_format)
    out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=fmt)
    out[:, :, top:top + h, left:left + w] = x
    return zero_border_(out, left, right, top, bottom)


def zero_border_(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Zero the border strips of NCHW ``x`` (the given widths on each side) in place; return it."""
    h, w = x.shape[-2] - top - bottom, x.shape[-1] - left - right
    x[:, :, :top].zero_()
    x[:, :, top + h:].zero_()
    x[:, :, top:top + h, :left].zero_()
    x[:, :, top:top + h, left + w:].zero_()
    return x


class Pad2d(nn.Module):
    """Zero padding for a following ``padding=0`` convolution, computed from the input's size.

    Stands for Keras' ``ZeroPadding2D(correct_pad(...))`` layers (``block_{1,3,6,13}_pad``) and for
    the padding inside ``Conv2D(padding="same")``; equal to TF "same" for 3x3 stride 2 kernels.
    """

    def __init__(self, kernel: int, stride: int, pad_type: str = "same") -> None:
        super().__init__()
        if pad_type not in PAD_TYPES:
            raise ValueError(f"pad_type={pad_type!r} is not supported; expected one of {PAD_TYPES}")
        self.kernel, self.stride, self.pad_type = kernel, stride, pad_type

    def amounts(self, height: int, width: int) -> tuple[int, ...]:
        """(left, right, top, bottom) for an input of this size: what any code that pads or
        reasons about this padding (the folded base) asks for."""
        return pad_amounts(height, width, self.kernel, self.stride, self.pad_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.amounts(x.shape[-2], x.shape[-1])
        if x.requires_grad and torch.is_grad_enabled():
            # zero_pad's slice assignments would cost autograd five copies on the way back,
            # several times F.pad's forward and backward together
            return F.pad(x, (left, right, top, bottom))
        return zero_pad(x, left, right, top, bottom)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, pad_type={self.pad_type!r}"


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with Keras' ``padding="same"`` (possibly asymmetric) done before the conv."""

    def __init__(self, *args, pad_type: str = "same", **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)
        self.pad = Pad2d(self.kernel_size[0], self.stride[0], pad_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))
