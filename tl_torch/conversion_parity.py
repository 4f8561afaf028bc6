"""The parity summary of a conversion: the same images through the source model and the result,
each judged against the exact (float64) answer by the band rule of :mod:`tl_common.bands`, and
the classes both predict, by the one rule of :mod:`tl_common.head`.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_common import bands, head
from tl_common.outputs import write_json
from tl_torch.data import load_images
from tl_torch.module import TransferModule
from tl_torch.predict import image_paths

#: Images a conversion compares on when none are given: generated demo images, half of each kind.
DEFAULT_IMAGES = 8


def probabilities(outputs: np.ndarray, activation: str = "linear") -> np.ndarray:
    """Class probabilities from a head's outputs, in float64: one logit -> the probability of
    class 1; N logits -> softmax; outputs of a sigmoid/softmax Dense are probabilities already."""
    z = np.asarray(outputs, np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if activation != "linear":
        return z
    if z.ndim == 1:
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """The class of each image, decided as the trainers' accuracy and predict decide it."""
    return head.decide(head.logits_of(probs))[0]


@dataclass
class Parity:
    """The same images through source and result, against the exact (float64) answer."""

    direction: str
    source: str
    result: str
    images: int
    max_abs_probability_difference: float | None
    source_error: float | None       # rms |source float32 - exact| over the probabilities
    result_error: float | None       # rms |result float32 - exact|
    band: float | None               # bands.RATIO * source_error + floor (tl_common.bands)
    same_classes: bool | None
    passed: bool | None
    note: str = ""

    @classmethod
    def not_measured(cls, direction: str, source: str, result: str, images: int,
                     note: str) -> Parity:
        return cls(direction, source, result, images, None, None, None, None, None, None, note)

    def line(self) -> str:
        if self.passed is None:
            return f"parity ({self.direction}): not measured: {self.note}"
        return (f"parity ({self.direction}, {self.images} images): max |probability difference| "
                f"{self.max_abs_probability_difference:.3g}; rms error against float64 "
                f"{self.result_error:.3g} <= band {self.band:.3g} ({bands.RATIO:g} x the "
                f"source's own {self.source_error:.3g} + {bands.FLOOR_ULPS:g} ulps): "
                f"{'pass' if self.passed else 'FAIL'}; same classes: {self.same_classes}"
                + (f"; {self.note}" if self.note else ""))


def compare(direction: str, source: str, result: str, source32: np.ndarray,
            result32: np.ndarray, exact: np.ndarray, note: str = "",
            variants: tuple[np.ndarray, ...] = ()) -> Parity:
    """The band rule of tl_common.bands on the rms error over every image's probabilities:
    result error <= RATIO x source error + FLOOR_ULPS ulps. The source's error is the largest
    of its equally valid float32 runs (``source32`` and ``variants``: the port folded, as predict
    runs it, and unfolded, as exports trace it). The rms, not the largest error: the folded base
    rounds other numbers than Keras (its weights are w * gamma / sigma), so its largest error
    over a few dozen probabilities is a noisy multiple of Keras' while its rms is steady."""
    source_error = max(bands.rms_error(s, exact) for s in (source32, *variants))
    rule = bands.Band(source_error, bands.rms_error(result32, exact), bands.floor(exact, "rms"),
                      "rms vs the source in float64")
    result_error, band = rule.port_error, rule.limit
    same = bool(result32.shape == source32.shape and np.array_equal(
        predicted_classes(source32), predicted_classes(result32)))
    diff = float(np.max(np.abs(result32 - source32))) if result32.shape == source32.shape \
        else float("inf")
    return Parity(direction, source, result, len(exact), diff, source_error, result_error, band,
                  same, rule.passed and same, note)


def comparison_images(paths: list[str] | None, image_size: int) -> torch.Tensor:
    """(N, 3, s, s) float32 [0, 255]: the given image files and folders, or generated demo images."""
    if paths:
        return load_images([str(p) for p in image_paths(paths)], image_size)
    from tl_common.demo import draw_animal

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(DEFAULT_IMAGES):
            file = Path(tmp) / f"{i}.jpg"
            draw_animal(np.random.default_rng([14, i]), dog=i % 2 == 1).save(file, quality=90)
            files.append(str(file))
        return load_images(files, image_size)


def unfolded_copy(module: TransferModule) -> TransferModule:
    """A copy of the module that runs its base's own modules, not the folded speed path: what
    exports trace and what float64 runs (the fold is float32 oneDNN code)."""
    plain = copy.deepcopy(module)
    plain.fast = False
    plain.hparams.fast = False
    return plain.eval()


def port_probabilities(module: TransferModule, images: torch.Tensor) -> np.ndarray:
    """The module's class probabilities on [0, 255] NCHW images, in its own dtype."""
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        return probabilities(module(images.to(dtype)).cpu().numpy())


def port_variants(module: TransferModule, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The port's other valid float32 run: unfolded (what exports trace)."""
    return (port_probabilities(unfolded_copy(module), images),)


def port_answers(module: TransferModule, images: torch.Tensor
                 ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The port as a conversion's source: its float32 probabilities (folded, as predict runs
    it), the exact answer (unfolded, float64) and its other valid float32 run."""
    exact = port_probabilities(unfolded_copy(module).double(), images)
    return port_probabilities(module, images), exact, port_variants(module, images)


def nhwc(images: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC array (Keras' layout)."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def write_summary(parity: Parity, path: Path, extra: dict[str, Any]) -> None:
    """Print the summary's line and write it as JSON, with the band's constants."""
    print(parity.line())
    write_json(path, {**asdict(parity), **extra, "band_multiple": bands.RATIO,
                      "floor_ulps": bands.FLOOR_ULPS})
