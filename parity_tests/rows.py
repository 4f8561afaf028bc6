"""One row of the parity report: a check, the Keras value, the torch value, |diff|, tolerance, verdict.

Check functions return rows and never assert, so the same check serves the suite (which asserts
that every row passes) and the planted-mistake tests (which assert that some row fails).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tl_common import bands
from tl_common.bands import Band


@dataclass(frozen=True)
class Row:
    group: str            # the numbered item of the suite, e.g. "4 numerics"
    check: str            # what is compared, in a few words
    keras: str            # the Keras value, or a summary of it
    torch: str            # the torch value, or a summary of it
    diff: float | None    # |diff| (max over elements for arrays); None for exact comparisons
    tolerance: str        # the named tolerance, or "exact"
    passed: bool
    note: str = ""        # which weights, how measured...
    # Measured bands (tl_common.bands): the reference's own float32 error and the limit the
    # port's error (``diff``) is held to; None for exact rows and statistical tests.
    keras_error: float | None = None
    limit: float | None = None
    # False for rows that report a number a judged row sums up (each step of a trajectory):
    # shown with its band, not failing the suite on its own.
    judged: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    if isinstance(value, np.ndarray):
        return f"array{tuple(value.shape)}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def summary(array: Any) -> str:
    """A short description of an array: shape and range."""
    a = np.asarray(array, dtype=np.float64)
    if a.size == 0:
        return f"shape {a.shape}"
    return f"{tuple(a.shape)} [{a.min():.4g}, {a.max():.4g}]"


def close(group: str, check: str, keras: Any, torch: Any, tolerance: float, *,
          tolerance_name: str = "", relative: bool = False, note: str = "") -> Row:
    """Arrays (or numbers) agree: max |diff| <= tolerance (relative: divided by max |keras|)."""
    k, t = np.asarray(keras, dtype=np.float64), np.asarray(torch, dtype=np.float64)
    diff = bands.max_error(k, t)
    if relative and np.isfinite(diff):
        diff = diff / max(float(np.max(np.abs(k))) if k.size else 0.0, 1e-30)
    shown_k = _fmt(float(k)) if k.ndim == 0 else summary(k)
    shown_t = _fmt(float(t)) if t.ndim == 0 else summary(t)
    if k.shape != t.shape:
        shown_k, shown_t = f"shape {k.shape}", f"shape {t.shape}"
    tol = f"{tolerance_name + ' ' if tolerance_name else ''}{tolerance:g}{' rel' if relative else ''}"
    passed = bool(np.isfinite(diff) and diff <= tolerance)
    return Row(group, check, shown_k, shown_t, diff, tol, passed, note)


def measured(group: str, check: str, band: Band, *, keras: Any = "", torch: Any = "",
             note: str = "", judged: bool = True) -> Row:
    """A float32 comparison judged by a band measured in the run (:mod:`tl_common.bands`)."""
    return Row(group, check, _fmt(keras), _fmt(torch), band.port_error, band.describe(),
               band.passed, note=f"{band.how}{'; ' + note if note else ''}",
               keras_error=band.keras_error, limit=band.limit, judged=judged)


def equal(group: str, check: str, keras: Any, torch: Any, *, note: str = "") -> Row:
    """Exact equality (names, counts, shapes, labels)."""
    passed = bool(keras == torch) if not isinstance(keras, np.ndarray) else bool(
        np.array_equal(keras, torch))
    return Row(group, check, _fmt(keras), _fmt(torch), None, "exact", passed, note)


def verdict(group: str, check: str, keras: Any, torch: Any, passed: bool, *,
            diff: float | None = None, tolerance: str = "", note: str = "") -> Row:
    """A row whose test is computed by the caller (statistics, bands...)."""
    return Row(group, check, _fmt(keras), _fmt(torch), diff, tolerance, bool(passed), note)


def failures(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if not r.passed and r.judged]


def describe_failures(rows: Iterable[Row]) -> str:
    return "\n".join(f"FAIL {r.group} | {r.check}: keras={r.keras} torch={r.torch} "
                     f"|diff|={r.diff} tol={r.tolerance} {r.note}" for r in failures(rows))
