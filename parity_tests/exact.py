"""Exact (float64) answers for the image operations, where neither framework runs in float64.

TensorFlow computes the resize's source coordinates and the rotation's transform in float32 even
for float64 images (``ImageProjectiveTransformV3`` takes float32 transforms), so a float64 run of
Keras is not exact there. These numpy functions compute the same operations, as TensorFlow's
kernels define them, entirely in float64: the answer both frameworks' float32 results are
measured against (:mod:`tl_common.bands`). A mistake here would make the reference's own error
large; the checks report that error, and ``SANITY_RTOL`` fails them when it is.
"""

from __future__ import annotations

import numpy as np

#: The exact answer must match Keras' float32 result to float32 precision (errors ~1e-6 of the
#: values' range); a wrongly transcribed formula misses by whole pixels' worth of intensity.
SANITY_RTOL = 1e-3


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(image, (size, size), "bilinear")``: half-pixel centres, no antialiasing,
    (H, W, C) -> (size, size, C) float64."""
    image = np.asarray(image, dtype=np.float64)

    def weights(out: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = (np.arange(out) + 0.5) * (length / out) - 0.5
        floor = np.floor(source)
        lower = np.clip(floor, 0, length - 1).astype(int)
        upper = np.clip(np.ceil(source), 0, length - 1).astype(int)
        return lower, upper, source - floor

    top, bottom, dy = weights(size, image.shape[0])
    left, right, dx = weights(size, image.shape[1])
    rows_top, rows_bottom = image[top], image[bottom]                  # (size, W, C)
    dx = dx[None, :, None]

    def horizontal(rows: np.ndarray) -> np.ndarray:
        return rows[:, left] + (rows[:, right] - rows[:, left]) * dx

    upper_row, lower_row = horizontal(rows_top), horizontal(rows_bottom)
    return upper_row + (lower_row - upper_row) * dy[:, None, None]


def _reflect(coord: np.ndarray, length: int) -> np.ndarray:
    """TensorFlow's ``fill_mode="reflect"`` coordinate map (d c b a | a b c d | d c b a)."""
    if length <= 1:
        return np.zeros_like(coord)
    size2 = 2 * length
    below = np.where(coord < -size2, size2 * np.trunc(-coord / size2) + coord, coord)
    below = np.where(below < -length, below + size2, -below - 1)
    above = coord - size2 * np.trunc(coord / size2)
    above = np.where(above >= length, size2 - above - 1, above)
    c = np.where(coord < 0, below, np.where(coord > length - 1, above, coord))
    return np.clip(c, 0, length - 1)


def rotate(images: np.ndarray, flips: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Keras' ``RandomFlip("horizontal")`` then ``RandomRotation`` for the given draws, in float64:
    the rotation about ((w-1)/2, (h-1)/2), TensorFlow's reflect fill and bilinear interpolation.
    images (N, H, W, C) -> (N, H, W, C) float64."""
    images = np.asarray(images, dtype=np.float64)
    images = np.where(np.asarray(flips, bool).reshape(-1, 1, 1, 1), images[:, :, ::-1], images)
    n, h, w, _ = images.shape
    radians = np.asarray(angles_deg, dtype=np.float64) * (np.pi / 180.0)
    cos, sin = np.cos(radians)[:, None, None], np.sin(radians)[:, None, None]
    cx, cy = 0.5 * (w - 1), 0.5 * (h - 1)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    x_in = cos * xs - sin * ys + ((cx - cx * cos) + cy * sin)
    y_in = sin * xs + cos * ys + ((cy - cx * sin) - cy * cos)
    x_in, y_in = _reflect(x_in, w), _reflect(y_in, h)
    x0, y0 = np.floor(x_in), np.floor(y_in)
    fx, fy = (x_in - x0)[..., None], (y_in - y0)[..., None]
    batch = np.arange(n)[:, None, None]

    def read(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        # The far neighbour of a coordinate clamped to the last pixel is read with weight 0;
        # TensorFlow fills it with 0, any value gives the same sum.
        inside = (x <= w - 1) & (y <= h - 1)
        return np.where(inside[..., None], images[batch, np.minimum(y, h - 1).astype(int),
                                                  np.minimum(x, w - 1).astype(int)], 0.0)

    top = read(y0, x0) * (1 - fx) + read(y0, x0 + 1) * fx
    bottom = read(y0 + 1, x0) * (1 - fx) + read(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def sane(exact: np.ndarray, keras: np.ndarray) -> bool:
    """Whether ``exact`` reproduces Keras' float32 result to float32 precision."""
    exact, keras = np.asarray(exact, np.float64), np.asarray(keras, np.float64)
    scale = max(float(np.abs(exact).max()), 1e-30)
    return bool(exact.shape == keras.shape and np.abs(exact - keras).max() <= SANITY_RTOL * scale)
