"""Keras' ``RandomFlip("horizontal")`` + ``RandomRotation(0.2)``, batched, on the images' device.

The recipe augments inside the model: a left-right flip with probability 1/2, then a rotation by
an angle drawn uniformly in ±0.2·360° about the image centre ((w−1)/2, (h−1)/2), bilinear, with
``fill_mode="reflect"`` (d c b a | a b c d | d c b a). Keras (TensorFlow backend) computes 8
transform numbers (:func:`keras_rotation_transform`, its ``_compute_affine_matrix``) and applies them
with ``tf.raw_ops.ImageProjectiveTransformV3``: output pixel (x, y), integer indices, reads input
(a0·x + a1·y + a2, b0·x + b1·y + b2), the coordinate folded into the image by the fill mode, then
interpolated bilinearly. :func:`affine_transform` does the same with ``F.affine_grid`` and
``F.grid_sample`` (``align_corners=False``: its reflection about the pixel borders −0.5 and
len − 0.5, followed by clamping, is TF's reflect). The round trip through normalised coordinates
and torch's float32 sin/cos move a sample by ~1e-5 pixel: pixel values agree with Keras' to
~1e-3 on smooth images and ~1e-2 at sharp edges (0..255 scale; the parity suite measures it).

The random draws cannot follow Keras' (different generators); the distribution is the same. Draws
are made on the CPU so that a seeded run gives the same augmentation on any device.

Images are NCHW, values 0..255 (before ``preprocess_input``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tl_common.recipe import ROTATION_FACTOR, ROTATION_FILL_MODE

#: ``fill_mode`` values supported, and grid_sample's name for each.
FILL_MODES = {"reflect": "reflection", "constant": "zeros", "nearest": "border"}


def keras_rotation_transform(angles_deg: Tensor, height: int, width: int) -> Tensor:
    """The 8 transform numbers of Keras' ``RandomRotation`` for each angle, (N,) → (N, 8).

    A rotation about ((w−1)/2, (h−1)/2) mapping output pixel (x, y) to input
    (a0·x + a1·y + a2, b0·x + b1·y + b2); a positive angle turns the picture counter-clockwise
    on screen. float32, in ``_compute_affine_matrix``'s order of operations.
    """
    if angles_deg.ndim != 1:
        raise ValueError(f"angles_deg must be 1-D (one angle per image); got shape {tuple(angles_deg.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive; got height={height}, width={width}")
    angles = angles_deg.to(torch.float32)
    # Keras multiplies by the float32 rounding of pi/180.
    radians = angles * torch.tensor(math.pi / 180.0, dtype=torch.float32, device=angles.device)
    cx, cy = 0.5 * (width - 1), 0.5 * (height - 1)
    sin, cos = torch.sin(radians), torch.cos(radians)
    a0, a1, b0, b1 = cos, -sin, sin, cos   # zero shear, unit scale
    a2 = (cx - cx * a0) - cy * a1
    b2 = (cy - cx * b0) - cy * b1
    zeros = torch.zeros_like(radians)
    return torch.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], dim=1)  # (N, 8)


def affine_transform(images: Tensor, transforms: Tensor, fill_mode: str = "reflect") -> Tensor:
    """Bilinear affine transform of NCHW images with TF's convention (see the module docstring).

    ``transforms``: (N, 8) or (8,) for the whole batch; projective terms (c0, c1) must be 0.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW (4-D); got shape {tuple(images.shape)}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {tuple(FILL_MODES)}; got {fill_mode!r}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor; got dtype {images.dtype}")
    n, _, h, w = images.shape
    if transforms.shape not in ((8,), (1, 8), (n, 8)):
        raise ValueError(f"transforms must be (8,), (1, 8) or (N, 8) with N = {n} images; "
                         f"got shape {tuple(transforms.shape)}")
    t = transforms.to(device=images.device, dtype=torch.float32).reshape(-1, 8).expand(n, 8)
    if bool((t[:, 6:] != 0).any()):
        raise ValueError("only affine transforms are supported (c0 = c1 = 0)")
    a0, a1, a2, b0, b1, b2 = t[:, :6].unbind(1)
    # TF maps pixel indices, grid_sample normalised pixel centres u = (2x + 1)/w − 1: substitute
    # x = (w(u + 1) − 1)/2 and y = (h(v + 1) − 1)/2 into TF's map and normalise its result.
    theta = torch.stack([
        torch.stack([a0, a1 * h / w, (a0 * (w - 1) + a1 * (h - 1) + 2 * a2 + 1) / w - 1], 1),
        torch.stack([b0 * w / h, b1, (b0 * (w - 1) + b1 * (h - 1) + 2 * b2 + 1) / h - 1], 1),
    ], 1)                                                                   # (N, 2, 3)
    grid = affine_grid(theta, h, w)                                         # (N, H, W, 2)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear",
                         padding_mode=FILL_MODES[fill_mode], align_corners=False)


def affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(theta, [N, 1, h, w], align_corners=False)``, as broadcast products.

    ``F.affine_grid`` multiplies an (H·W, 3) grid by each 3×2 matrix with ``bmm``, which is slow
    for an inner dimension of 3 on the CPU (as slow as the bilinear sampling itself); the same
    sums of three products, element by element, are a fraction of that.
    """
    x = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1  # pixel centres
    y = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]                                               # (N, 2, 3, 1, 1)
    grid = t[:, :, 0] * x + t[:, :, 1] * y[:, None] + t[:, :, 2]                 # (N, 2, H, W)
    return grid.permute(0, 2, 3, 1)  # a view: grid_sample reads it strided, faster than a copy


def flip_horizontal(images: Tensor, flips: Tensor) -> Tensor:
    """Left-right flip of the NCHW images where ``flips`` (bool, (N,)) is true."""
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW (4-D); got shape {tuple(images.shape)}")
    if flips.dtype != torch.bool or flips.shape != images.shape[:1]:
        raise ValueError(
            f"flips must be a bool tensor of shape ({images.shape[0]},); "
            f"got dtype {flips.dtype}, shape {tuple(flips.shape)}"
        )
    flips = flips.to(images.device)[:, None, None, None]
    return torch.where(flips, images.flip(-1), images)


def augment(images: Tensor, flips: Tensor, angles_deg: Tensor,
            fill_mode: str = ROTATION_FILL_MODE) -> Tensor:
    """The recipe's ``data_augmentation`` with given draws: flip, then rotate (as its Sequential)."""
    _, _, h, w = images.shape
    transforms = keras_rotation_transform(angles_deg.to(images.device), h, w)
    return affine_transform(flip_horizontal(images, flips), transforms, fill_mode=fill_mode)


class RandomFlipRotation(nn.Module):
    """``Sequential([RandomFlip("horizontal"), RandomRotation(factor)])``: active in training only.

    ``factor`` is Keras': a fraction of 360°, a number (range ±|factor|) or a (lower, upper) pair,
    within [−1, 1].
    """

    def __init__(self, factor: float | Sequence[float] = ROTATION_FACTOR,
                 fill_mode: str = ROTATION_FILL_MODE) -> None:
        super().__init__()
        if isinstance(factor, (int, float)):
            if not -1.0 <= factor <= 1.0:
                raise ValueError(f"factor must be a number in [-1, 1] or a pair of them; got {factor!r}")
            lower, upper = -abs(float(factor)), abs(float(factor))
        elif len(factor) == 2 and all(isinstance(f, (int, float)) for f in factor):
            lower, upper = sorted(float(f) for f in factor)
            if lower < -1.0 or upper > 1.0:
                raise ValueError(f"factor must be a number in [-1, 1] or a pair of them; got {factor!r}")
        else:
            raise ValueError(f"factor must be a number in [-1, 1] or a pair of them; got {factor!r}")
        if fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {tuple(FILL_MODES)}; got {fill_mode!r}")
        self.factor = (lower, upper)
        self.fill_mode = fill_mode

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(flips, angles_deg) for ``n`` images, drawn on the CPU: P(flip) = 1/2, angle uniform."""
        # Keras: flip iff uniform(0, 1) <= 0.5; angle = minval + (maxval - minval) * uniform(0, 1).
        flips = torch.rand(n, generator=generator) <= 0.5
        lower, upper = self.factor[0] * 360.0, self.factor[1] * 360.0
        angles_deg = lower + (upper - lower) * torch.rand(n, generator=generator)
        return flips, angles_deg

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.training:
            return images
        flips, angles_deg = self.draw(images.shape[0], generator)
        return augment(images, flips.to(images.device), angles_deg.to(images.device), self.fill_mode)

    def extra_repr(self) -> str:
        return f"factor={self.factor}, fill_mode={self.fill_mode!r}"
