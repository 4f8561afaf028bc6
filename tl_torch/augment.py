"""Keras' ``RandomFlip("horizontal")`` + ``RandomRotation(0.2)``, batched, on the images' device.

The recipe augments inside the model: a left-right flip with probability 1/2, then a rotation by
an angle drawn uniformly in ±0.2·360° about the image centre, bilinear, with ``fill_mode="reflect"``
(d c b a | a b c d | d c b a). Keras (TensorFlow backend) does the rotation with
``tf.raw_ops.ImageProjectiveTransformV3``; :func:`affine_transform` re-implements that kernel
(``tensorflow/core/kernels/image/image_ops.h``) with the same float32 operations in the same order,
and :func:`keras_rotation_transform` computes the 8 numbers with TF's own float32 sin/cos: given
the same angles the pixels are the same, bit for bit (measured on 160×160 images, all fill modes).
``grid_sample`` was not used: its round trip through normalised coordinates moves each sample by
~1e-5 pixel, which is up to 4e-3 on 0..255 images with sharp edges.

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

#: ``fill_mode`` values of Keras' ``RandomRotation`` (and of ImageProjectiveTransformV3).
FILL_MODES = ("reflect", "wrap", "constant", "nearest")


# Eigen's float32 sin/cos (``psincos_float``, GenericPacketMathFunctions.h, the build without FMA),
# which TensorFlow's CPU kernels use: 2/pi, the rounding constant 2^23 + 2^22, the 4-part
# Cody-Waite split of pi/2 and the two minimax polynomials, copied as float32 numbers.
_TWO_OVER_PI = 0.636619746685028076171875
_ROUNDING_MAGIC = 12582912.0
_PIO2_PARTS = (-1.5703125, -0.000483989715576171875, 1.62865035235881805419921875e-07,
               5.5644315544167710640977020375430583953857421875e-11)
_COS_POLY = (2.4372266125283204019069671630859375e-05, -0.00138865201734006404876708984375,
             0.041666619479656219482421875, -0.5, 1.0)
_SIN_POLY = (-0.0001959234114083702898469196984621021329076029360294342041015625,
             0.0083326873655616851693794799871284340042620897293090820312500000,
             -0.1666666203982298255503735617821803316473960876464843750000000000)
#: Eigen's huge-argument threshold without FMA (cos's, the smaller): beyond, TF reduces differently.
_SINCOS_MAX_RADIANS = 18838.0


def tf_sincos(radians: Tensor) -> tuple[Tensor, Tensor]:
    """float32 (sin, cos) bit for bit as TensorFlow's CPU ``tf.sin``/``tf.cos`` (Eigen, vectorised).

    torch's own float32 sin/cos differ from TF's by one ulp for ~15% of angles, and CUDA's from
    both; that ulp moves a rotation's offset by up to 3e-5 pixel and a pixel of a sharp-edged image
    by up to ~7e-3. The same float32 multiplications and additions give the same numbers on any
    device. TF computes whole packets of 8 floats this way and a batch's last ``n % 8`` elements
    with libm's sinf/cosf, which differ from these by an ulp for ~1 angle in 4.
    """
    if radians.dtype != torch.float32:
        raise TypeError(f"radians must be float32 (as TF computes them); got {radians.dtype}")
    if radians.numel() and radians.abs().max() >= _SINCOS_MAX_RADIANS:
        raise ValueError(f"|radians| must be below {_SINCOS_MAX_RADIANS}; got max {radians.abs().max()}")

    def const(value: float) -> Tensor:
        return torch.tensor(value, dtype=torch.float32, device=radians.device)

    magnitude = radians.abs()
    # Nearest multiple of pi/2 by the 2^23 rounding trick (ties to even, as the FPU rounds).
    quadrant = (magnitude * const(_TWO_OVER_PI) + const(_ROUNDING_MAGIC)) - const(_ROUNDING_MAGIC)
    q = quadrant.to(torch.int32)
    r = magnitude
    for part in _PIO2_PARTS:  # r = |x| - quadrant * pi/2, in |r| <= pi/4
        r = quadrant * const(part) + r
    r2 = r * r
    cos_r = const(_COS_POLY[0])
    for coefficient in _COS_POLY[1:]:
        cos_r = cos_r * r2 + const(coefficient)
    sin_r = const(_SIN_POLY[0])
    for coefficient in _SIN_POLY[1:]:
        sin_r = sin_r * r2 + const(coefficient)
    sin_r = (sin_r * r2) * r + r
    even = (q & 1) == 0
    sin = torch.where(even, sin_r, cos_r)
    sin = torch.where(((q & 2) != 0) ^ (radians < 0), -sin, sin)
    cos = torch.where(even, cos_r, sin_r)
    cos = torch.where(((q + 1) & 2) != 0, -cos, cos)
    return sin, cos


def keras_rotation_transform(angles_deg: Tensor, height: int, width: int) -> Tensor:
    """The 8 transform numbers of Keras' ``RandomRotation`` for each angle, (N,) → (N, 8).

    A rotation about ((w−1)/2, (h−1)/2) mapping output pixel (x, y) to input
    (a0·x + a1·y + a2, b0·x + b1·y + b2); a positive angle turns the picture counter-clockwise
    on screen. float32, with ``_compute_affine_matrix``'s operations in its order and TF's sin/cos
    (:func:`tf_sincos`): equal to Keras' numbers bit for bit (see its note on batch tails).
    """
    if angles_deg.ndim != 1:
        raise ValueError(f"angles_deg must be 1-D (one angle per image); got shape {tuple(angles_deg.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive; got height={height}, width={width}")
    angles = angles_deg.to(torch.float32)
    # Keras multiplies by the float32 rounding of pi/180, not by a float64 constant.
    radians = angles * torch.tensor(math.pi / 180.0, dtype=torch.float32, device=angles.device)
    cx = 0.5 * (float(width) - 1.0)  # exact in float32 for any image size
    cy = 0.5 * (float(height) - 1.0)
    sin, cos = tf_sincos(radians)
    # Zero shear, unit scale and zero translation leave a0 = cos, a1 = -sin, b0 = sin, b1 = cos
    # exactly; the offsets keep Keras' left-to-right order ((cx - cx*a0) - cy*a1).
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = (cx - cx * a0) - cy * a1
    b2 = (cy - cx * b0) - cy * b1
    zeros = torch.zeros_like(radians)
    return torch.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], dim=1)  # (N, 8)


def _map_coordinate(coord: Tensor, length: int, fill_mode: str) -> Tensor:
    """TF's ``MapCoordinate<FILL_*>``: bring input coordinates into [0, length − 1]."""
    if fill_mode == "constant":
        return coord  # out-of-range neighbours read the fill value instead
    if length <= 1:
        return torch.zeros_like(coord)
    last = float(length - 1)
    if fill_mode == "nearest":
        return coord.clamp(0.0, last)
    if fill_mode == "reflect":
        period = 2 * length
        # Below 0: fold into (−2·len, 0], then x → −x − 1 (or + 2·len below −len).
        low = period * torch.trunc(-coord / period) + coord
        low = torch.where(low < -length, low + period, -low - 1)
        # Above len − 1: fold into [0, 2·len), then x → 2·len − x − 1 in the upper half.
        high = coord - period * torch.trunc(coord / period)
        high = torch.where(high >= length, (period - high) - 1, high)
    else:  # "wrap", with TF's own formula (period len − 1 in the fold count, len in the shift)
        low = coord + length * (torch.trunc(-coord / last) + 1)
        high = coord - length * torch.trunc(coord / last)
    mapped = torch.where(coord < 0, low, torch.where(coord > last, high, coord))
    # The clamp keeps e.g. 3.5 with len 4 inside, so that floor + 1 is the only neighbour outside.
    return mapped.clamp(0.0, last)


def affine_transform(
    images: Tensor, transforms: Tensor, fill_mode: str = "reflect", fill_value: float = 0.0
) -> Tensor:
    """Bilinear projective transform of NCHW images, as TF's ``ImageProjectiveTransformV3``.

    ``transforms`` is (N, 8) or (8,) / (1, 8) for the whole batch: [a0, a1, a2, b0, b1, b2, c0, c1]
    maps output pixel (x, y) (integer indices, no half-pixel shift) to input
    ((a0·x + a1·y + a2) / k, (b0·x + b1·y + b2) / k) with k = c0·x + c1·y + 1. The input coordinate
    is brought into range by ``fill_mode``, then interpolated between its floor and floor + 1;
    neighbours outside the image read ``fill_value``. Arithmetic in float32, in TF's order; the
    result has the images' dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be NCHW (4-D); got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor; got dtype {images.dtype}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}; got {fill_mode!r}")
    n, c, h, w = images.shape
    transforms = transforms.to(device=images.device, dtype=torch.float32)
    if transforms.ndim == 1:
        transforms = transforms[None]
    if transforms.ndim != 2 or transforms.shape[1] != 8 or transforms.shape[0] not in (1, n):
        raise ValueError(
            f"transforms must be (8,), (1, 8) or (N, 8) with N = {n} images; "
            f"got shape {tuple(transforms.shape)}"
        )
    t = transforms[:, :, None, None].unbind(1)  # 8 × (N or 1, 1, 1)
    # TF multiplies the float transform by the int64 output index, converted to float.
    xs = torch.arange(w, device=images.device, dtype=torch.float32)[None, None, :]  # (1, 1, W)
    ys = torch.arange(h, device=images.device, dtype=torch.float32)[None, :, None]  # (1, H, 1)
    projection = t[6] * xs + t[7] * ys + 1.0
    x_in = (t[0] * xs + t[1] * ys + t[2]) / projection  # (N, H, W)
    y_in = (t[3] * xs + t[4] * ys + t[5]) / projection
    # A zero projection sends the pixel to infinity: TF returns the fill value there. The
    # coordinate (inf or nan) is replaced by 0 only so that it can be turned into an index.
    at_infinity = (projection == 0).expand(n, h, w)
    x = _map_coordinate(torch.where(at_infinity, 0.0, x_in.expand(n, h, w)), w, fill_mode)
    y = _map_coordinate(torch.where(at_infinity, 0.0, y_in.expand(n, h, w)), h, fill_mode)

    x_floor, y_floor = torch.floor(x), torch.floor(y)
    x_ceil, y_ceil = x_floor + 1, y_floor + 1
    # A one-pixel frame of the fill value around the image: any neighbour outside the image,
    # its index clamped to the frame, reads the fill value, without a mask per neighbour.
    framed = F.pad(images.to(torch.float32), (1, 1, 1, 1), value=fill_value)
    flat = framed.reshape(n, c, (h + 2) * (w + 2))

    def read(yi: Tensor, xi: Tensor) -> Tensor:
        """Pixels at integer-valued (yi, xi), (N, C, H·W); the fill value outside the image."""
        # Clamped before the integer conversion, so that far-out coordinates cannot overflow.
        index = (yi.clamp(-1, h) + 1).long() * (w + 2) + (xi.clamp(-1, w) + 1).long()
        return torch.gather(flat, 2, index.reshape(n, 1, h * w).expand(n, c, h * w))

    def flat_(v: Tensor) -> Tensor:
        return v.reshape(n, 1, h * w)

    wx0, wx1 = flat_(x_ceil - x), flat_(x - x_floor)
    wy0, wy1 = flat_(y_ceil - y), flat_(y - y_floor)
    value_yfloor = wx0 * read(y_floor, x_floor) + wx1 * read(y_floor, x_ceil)
    value_yceil = wx0 * read(y_ceil, x_floor) + wx1 * read(y_ceil, x_ceil)
    out = wy0 * value_yfloor + wy1 * value_yceil  # (N, C, H·W)
    out = torch.where(flat_(at_infinity), fill_value, out)
    return out.reshape(n, c, h, w).to(images.dtype)


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


def augment(images: Tensor, flips: Tensor, angles_deg: Tensor, fill_mode: str = "reflect") -> Tensor:
    """The recipe's ``data_augmentation`` with given draws: flip, then rotate (as its Sequential)."""
    _, _, h, w = images.shape
    transforms = keras_rotation_transform(angles_deg.to(images.device), h, w)
    return affine_transform(flip_horizontal(images, flips), transforms, fill_mode=fill_mode)


class RandomFlipRotation(nn.Module):
    """``Sequential([RandomFlip("horizontal"), RandomRotation(factor)])``: active in training only.

    ``factor`` is Keras': a fraction of 360°, a number (range ±|factor|) or a (lower, upper) pair,
    within [−1, 1].
    """

    def __init__(self, factor: float | Sequence[float] = 0.2, fill_mode: str = "reflect") -> None:
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
            raise ValueError(f"fill_mode must be one of {FILL_MODES}; got {fill_mode!r}")
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
