"""Float32 bands measured in the run, never chosen: how far the port may be from the reference.

Framework-free (numpy): the parity suite (``parity_tests``) and the conversions' parity summaries
(``python -m tl_torch.convert``) hold their float32 results to the same rule.

Float32 results differ between machines and kernel libraries (oneDNN's instruction set, Eigen or
oneDNN in TensorFlow, thread counts, cuDNN on GPUs): a fixed tolerance tuned on one machine fails
a correct port on another, and one widened to pass everywhere hides wrong ports. So every float32
comparison here measures the reference's own numerical error in the same run and holds the port
to a stated multiple of it:

- :func:`against_exact` — where both frameworks compute the same thing in float64 (forward passes,
  resizing, augmentation), the float64 result is the exact answer. The port's float32 error against
  it must be at most ``RATIO`` times the reference's float32 error against it, plus a floor of
  ``FLOOR_ULPS`` float32 ulps of the exact value's magnitude (for values whose rounding error
  happens to be near zero in the reference).
- :func:`against_spread` — where no float64 run is exact (Keras' float64 optimizers keep float32
  scalars; free-running training amplifies the first rounding difference), the reference is run
  twice under two equally valid computations of the same step (the batch in another order, the
  inputs one ulp apart...), and the port's distance from the reference must be at most ``RATIO``
  times the reference's distance from itself, plus the same floor.

Exact rows (shapes, counts, names, file lists, flags) do not go through here: they stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: float32's machine epsilon (the spacing of floats at 1.0).
EPS32 = float(np.finfo(np.float32).eps)
#: The port may be up to this many times less accurate than the reference. Two equally correct
#: float32 computations that sum in different orders differ in their largest error by a factor of
#: about two, sometimes three (the largest of many rounding errors is itself a random quantity,
#: and the parity report shows the port/Keras ratio of every layer); 4 leaves room for that
#: on any machine, while a wrong port (a shifted padding, another epsilon, a misplaced square root)
#: misses by orders of magnitude more.
RATIO = 4.0
#: Where the reference's error happens to be tiny, the port still gets a few float32 ulps of the
#: value's magnitude: the rounding of the last operation alone is half an ulp per operation.
FLOOR_ULPS = 8.0


def _array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def max_error(a: Any, b: Any) -> float:
    """Largest |a - b| over all elements; inf when the shapes differ or a value is not finite."""
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    return float(diff.max()) if np.all(np.isfinite(diff)) else float("inf")


def rms_error(a: Any, b: Any) -> float:
    """Root mean square of a - b: for updates of many weights, where a few weights whose tiny
    gradient's sign is decided by rounding move by a whole step in either framework."""
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    value = float(np.sqrt(np.mean((a - b) ** 2)))
    return value if np.isfinite(value) else float("inf")


def magnitude(x: Any, norm: str = "max") -> float:
    a = _array(x)
    if a.size == 0:
        return 0.0
    return float(np.abs(a).max() if norm == "max" else np.sqrt(np.mean(a * a)))


ERRORS = {"max": max_error, "rms": rms_error}


@dataclass(frozen=True)
class Band:
    """The reference's own error, the port's, and the limit the port is held to."""

    keras_error: float     # the reference's float32 error (against float64, or its own spread)
    port_error: float      # the port's (against float64, or against the reference)
    floor: float
    how: str               # how keras_error was measured, for the report

    @property
    def limit(self) -> float:
        return RATIO * self.keras_error + self.floor

    @property
    def ratio(self) -> float:
        """Port error / reference error (inf when the reference's is 0 and the port's is not)."""
        if self.keras_error > 0:
            return self.port_error / self.keras_error
        return 0.0 if self.port_error == 0 else float("inf")

    @property
    def excess(self) -> float:
        """Port error / limit: at most 1 passes."""
        if self.limit > 0:
            return self.port_error / self.limit
        return 0.0 if self.port_error == 0 else float("inf")

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.port_error) and self.port_error <= self.limit)

    def describe(self) -> str:
        return f"{RATIO:g} x keras err + {FLOOR_ULPS:g} ulp = {self.limit:.3g}"


def floor(exact: Any, norm: str = "max") -> float:
    """``FLOOR_ULPS`` float32 ulps of the exact value's magnitude."""
    return FLOOR_ULPS * EPS32 * magnitude(exact, norm)


def against_exact(exact: Any, keras: Any, torch: Any, *, norm: str = "max",
                  how: str = "vs float64", scale: float | None = None) -> Band:
    """Both float32 results against the exact (float64) one. ``scale``: the magnitude whose ulps
    make the floor, when it is not the exact value's (an update is stored in weights)."""
    error = ERRORS[norm]
    room = floor(exact, norm) if scale is None else FLOOR_ULPS * EPS32 * scale
    return Band(error(keras, exact), error(torch, exact), room, how)


def against_spread(keras: Any, keras_variant: Any, torch: Any, *, norm: str = "max",
                   how: str) -> Band:
    """The port against the reference, held to the reference's distance from itself under an
    equally valid variation (``keras_variant``, described by ``how``)."""
    error = ERRORS[norm]
    return Band(error(keras_variant, keras), error(torch, keras), floor(keras, norm), how)


def median(bands: list[Band]) -> Band:
    """The median step: for quantities where a rare step of either framework may jump far above
    rounding for a reason both share (a kink of ReLU6 crossed), the typical step is compared."""
    return Band(float(np.median([b.keras_error for b in bands])),
                float(np.median([b.port_error for b in bands])),
                float(np.median([b.floor for b in bands])),
                f"median of {len(bands)} steps, each {bands[0].how}")
