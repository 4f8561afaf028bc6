"""What the parity suite records of a training run and the rows it makes of the images: the
recorded steps (:class:`Step`, :class:`Record`), the reference's decoding of a file, and the
per-epoch data rows (every training file once with its label, the pixels against the exact
resize). Shared by check 6 (``checks_data``) and check 14 (``checks_trainers``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity_tests import exact
from parity_tests.rows import Row, measured, summary, verdict
from tl_common import bands
from tl_common.files import load_splits

#: Check 14's group and image size (its demo configuration), the data rows' defaults.
TRAINERS_GROUP = "14 trainers, recorded"
TRAINERS_IMAGE_SIZE = 32


def decoded(path: str) -> np.ndarray:
    """The file's pixels as TensorFlow decodes them (uint8, RGB), before any resize."""
    import tensorflow as tf

    return tf.image.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()


@dataclass
class Step:
    epoch: int                      # from 0
    optimizer: tuple                # (Keras class, ((name, value), ...))
    trainable: tuple                # ((Keras layer, tensors), ...) in order
    numbers: int                    # trainable numbers
    optimizer_holds_trainable: bool
    images: np.ndarray              # (N, H, W, 3) float32 NHWC, as they reach the model
    labels: np.ndarray
    loss: float = float("nan")


@dataclass
class Record:
    steps: list[Step] = field(default_factory=list)
    epochs: list[tuple[int, str]] = field(default_factory=list)   # the history's (epoch, phase)
    run_dir: Path | None = None
    # Each augmentation draw: (stage, images, angles in degrees); stage is "train" inside a
    # training step, "evaluate" elsewhere.
    draws: list[tuple[str, int, np.ndarray]] = field(default_factory=list)
    # Each pass through the head's Dropout: (stage, training mode, features zeroed, features).
    dropout: list[tuple[str, bool, int, int]] = field(default_factory=list)


@functools.cache
def train_files(size: int = TRAINERS_IMAGE_SIZE) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """The demo's training files, their labels, and their exact resize (N, size, size, 3)."""
    from tl_common.demo import demo_data_root

    files = load_splits(demo_data_root(), test_fraction=0.2, seed=42).train
    images = np.stack([exact.resize_bilinear(decoded(p), size) for p in files.paths])
    return tuple(files.paths), np.asarray(files.labels), images


def identify(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each image, the index of the nearest exact image (mean absolute difference)."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1)
    d = (flat ** 2).sum(1)[:, None] - 2 * flat @ ref.T + (ref ** 2).sum(1)[None, :]
    return d.argmin(axis=1)


def epoch_images(record: Record, epoch: int, reference: np.ndarray, labels: np.ndarray):
    """An epoch's images in the file list's order (NaN where a file was not seen), whether every
    file came exactly once with its own label, and a description."""
    steps = [s for s in record.steps if s.epoch == epoch]
    if not steps:
        return np.full(reference.shape, np.nan), False, "no steps"
    images = np.concatenate([s.images for s in steps])
    got = np.concatenate([s.labels for s in steps])
    index = identify(images, reference)
    ordered = np.full(reference.shape, np.nan)
    ordered[index] = images
    once = len(index) == len(reference) and len(set(index.tolist())) == len(reference)
    right = np.array_equal(got, labels[index])
    return ordered, once and right, (f"{len(images)} images, {len(set(index.tolist()))} files, "
                                     f"{int((got != labels[index]).sum())} wrong labels")


def data_rows(k: Record, t: Record, group: str = TRAINERS_GROUP) -> list[Row]:
    """Per epoch: every training file once with its label, in both; the pixels that reach the
    model against the exact resize of their file."""
    _, labels, reference = train_files()
    rows = []
    for epoch in sorted({s.epoch for s in k.steps}):
        kimg, kok, kdesc = epoch_images(k, epoch, reference, labels)
        timg, tok, tdesc = epoch_images(t, epoch, reference, labels)
        rows.append(verdict(group, f"epoch {epoch + 1}: every training file once, with its label",
                            kdesc, tdesc, kok and tok, tolerance="exact"))
        rows.append(measured(group, f"epoch {epoch + 1}: pixels reaching the model (0..255)",
                             bands.against_exact(reference, kimg, timg),
                             keras=summary(kimg) if kok else kdesc,
                             torch=summary(timg) if tok else tdesc,
                             note="vs the exact resize of each image's file"))
    return rows
