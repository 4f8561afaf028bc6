"""Checks 6 and 7: the input pipeline and the augmentation."""

from __future__ import annotations

import functools
from dataclasses import replace

import keras
import numpy as np
import torch
from scipy import stats

from parity_tests import exact, pairs
from parity_tests.records import Record, Step, data_rows, decoded
from parity_tests.rows import Row, measured, summary, verdict
from tl_common import bands, recipe
from tl_common.demo import demo_data_root
from tl_common.files import find_images
from tl_common.settings import Settings
from tl_keras import model as kmodel
from tl_keras.data import TrainingData, make_dataset
from tl_torch.augment import RandomFlipRotation, augment
from tl_torch.data import ImageFolderDataModule

# Pixels (check 6) and augmented images (check 7) are judged by bands measured in the run
# (tl_common.bands): both frameworks' float32 results against the exact float64 resize or
# rotation of the same decoded pixels (parity_tests.exact). Decoded JPEG pixels are equal in both
# (libjpeg-turbo with TensorFlow's fast integer IDCT), so what remains is the float32 rounding of
# each resize's or rotation's coordinates and interpolation, largest at sharp edges.
#: Distribution tests fail below this p-value.
P_MIN = 1e-3
DRAWS = 20_000
FACTOR = recipe.ROTATION_FACTOR


# ---- 6 input pipeline ------------------------------------------------------------------------

def check_pipeline(size: int = 160) -> list[Row]:
    group = "6 input pipeline"
    settings = Settings(demo=True, image_size=size, batch_size=16)
    data = ImageFolderDataModule(settings, cache=False)
    data.setup()
    splits = data.splits
    # Keras' own finder is the oracle for the shared one.
    keras_files = keras.utils.image_dataset_from_directory(
        demo_data_root() / "train", shuffle=False, image_size=(size, size), verbose=False).file_paths
    ours = find_images(demo_data_root() / "train").paths
    rows = [verdict(group, "train files and order: tl_common vs image_dataset_from_directory",
                    f"{len(keras_files)} files", f"{len(ours)} files", keras_files == ours,
                    tolerance="exact")]
    kbatches = list(make_dataset(splits.validation, size, 16, shuffle=False, seed=0)
                    .take(2).as_numpy_iterator())
    it = iter(data.val_dataloader())
    tbatches = [next(it), next(it)]
    klabels = np.concatenate([b[1] for b in kbatches])
    tlabels = np.concatenate([b[1].numpy() for b in tbatches])
    rows.append(verdict(group, "labels of the first 2 validation batches", str(klabels.tolist()[:8]),
                        str(tlabels.tolist()[:8]), np.array_equal(klabels, tlabels),
                        tolerance="exact"))
    kimages = np.concatenate([b[0] for b in kbatches])
    timages = np.concatenate([pairs.nhwc(b[0]) for b in tbatches])
    exact_images = np.stack([exact.resize_bilinear(decoded(path), size)
                             for path in splits.validation.paths[:len(kimages)]])
    rows.append(measured(group, "pixels of the first 2 validation batches (0..255)",
                         bands.against_exact(exact_images, kimages, timages),
                         keras=summary(kimages), torch=summary(timages),
                         note="decode + bilinear resize, no antialias"))
    rows.append(verdict(group, "the exact resize reproduces Keras' pixels to float32 precision",
                        "", "", exact.sane(exact_images, kimages),
                        tolerance=f"{exact.SANITY_RTOL:g} of the range"))
    # Both trainers take their splits from tl_common (check 11 compares the digests each run
    # wrote): the test split must be disjoint from validation and 1/5 of each class.
    val, test = set(splits.validation.paths), set(splits.test.paths)
    counts = splits.test.class_counts()
    rows.append(verdict(group, "test split disjoint from validation", f"{len(test)} test files",
                        f"{len(val & test)} shared", not (val & test), tolerance="exact"))
    full = {k: counts[k] + splits.validation.class_counts()[k] for k in counts}
    rows.append(verdict(group, "test split: 1/5 of each class's validation files",
                        str(counts), str({k: round(v * 0.2) for k, v in full.items()}),
                        all(counts[k] == round(full[k] * 0.2) for k in counts), tolerance="exact"))
    return rows


# ---- 7 augmentation --------------------------------------------------------------------------

def _keras_augment(images: np.ndarray, seed: int):
    """Keras' layers with their own random draws; returns the images and the draws."""
    aug = kmodel.data_augmentation(seed)
    flip, rotation = aug.layers
    t_flip = flip.get_random_transformation(images, training=True)
    t_rot = rotation.get_random_transformation(images, training=True)
    out = rotation.transform_images(flip.transform_images(images, t_flip, training=True), t_rot,
                                    training=True)
    flips = keras.ops.convert_to_numpy(t_flip["flips"]).reshape(-1).astype(bool)
    angles = keras.ops.convert_to_numpy(t_rot["angle"])
    return keras.ops.convert_to_numpy(out), flips, angles, keras.ops.convert_to_numpy(
        t_rot["rotation_matrix"])


def _outside(matrix: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixels whose source falls outside the image (the fill region), (N, H, W)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    a0, a1, a2, b0, b1, b2 = (matrix[:, i, None, None] for i in range(6))
    xin, yin = a0 * xs + a1 * ys + a2, b0 * xs + b1 * ys + b2
    return (xin < 0) | (xin > w - 1) | (yin < 0) | (yin > h - 1)


def check_augmentation(size: int = 160) -> list[Row]:
    group = "7 augmentation"
    images = pairs.demo_images(size, 8)
    kout, flips, angles, matrix = _keras_augment(images, seed=3)
    tout = pairs.nhwc(augment(pairs.nchw(images), torch.from_numpy(flips),
                              torch.from_numpy(angles)))
    border = _outside(matrix, size, size)
    truth = exact.rotate(images, flips, angles)
    rows = [
        measured(group, "Keras' flips and angles, whole images (0..255)",
                 bands.against_exact(truth, kout, tout), keras=summary(kout), torch=summary(tout),
                 note=f"angles {np.round(angles, 1).tolist()[:4]}..., flips {int(flips.sum())}/8"),
        measured(group, f"the same, reflect-filled border only ({int(border.sum()):,} pixels)",
                 bands.against_exact(truth[border], kout[border], tout[border])),
        verdict(group, "the exact rotation reproduces Keras' images to float32 precision", "", "",
                exact.sane(truth, kout), tolerance=f"{exact.SANITY_RTOL:g} of the range"),
    ]
    # The module's augmentation layer as training calls it (its forward, in training mode),
    # with Keras' draws in place of its own.
    layer = RandomFlipRotation(FACTOR).train()
    layer.draw = lambda n, generator=None: (torch.from_numpy(flips), torch.from_numpy(angles))
    lout = pairs.nhwc(layer(pairs.nchw(images), torch.Generator().manual_seed(0)))
    rows.append(measured(group, "the augmentation layer's forward (training), Keras' draws",
                         bands.against_exact(truth, kout, lout), keras=summary(kout),
                         torch=summary(lout), note="RandomFlipRotation.forward"))
    # The draws' distributions.
    rotation = kmodel.data_augmentation(5).layers[1]
    kangles = keras.ops.convert_to_numpy(rotation.get_random_transformation(
        np.zeros((DRAWS, 1, 1, 3), np.float32), training=True)["angle"])
    flip = kmodel.data_augmentation(6).layers[0]
    kflips = keras.ops.convert_to_numpy(flip.get_random_transformation(
        np.zeros((DRAWS, 1, 1, 3), np.float32), training=True)["flips"]).reshape(-1)
    tflips, tangles = RandomFlipRotation(FACTOR).draw(DRAWS, torch.Generator().manual_seed(0))
    tangles, tflips = tangles.numpy(), tflips.numpy()
    limit = FACTOR * 360
    uniform = stats.uniform(-limit, 2 * limit).cdf
    kp, tp = stats.kstest(kangles, uniform).pvalue, stats.kstest(tangles, uniform).pvalue
    rows += [
        verdict(group, f"angles within +-{limit:g} degrees ({DRAWS:,} draws)",
                f"[{kangles.min():.2f}, {kangles.max():.2f}]", f"[{tangles.min():.2f}, {tangles.max():.2f}]",
                max(abs(kangles).max(), abs(tangles).max()) <= limit, tolerance="exact bounds"),
        verdict(group, f"angles ~ U(-{limit:g}, {limit:g}): Kolmogorov-Smirnov p-value",
                f"p={kp:.3g}", f"p={tp:.3g}", kp > P_MIN and tp > P_MIN, tolerance=f"p > {P_MIN:g}"),
    ]
    kb = stats.binomtest(int(kflips.sum()), DRAWS, 0.5).pvalue
    tb = stats.binomtest(int(tflips.sum()), DRAWS, 0.5).pvalue
    rows.append(verdict(group, "flip probability 1/2: binomial test p-value",
                        f"{kflips.mean():.3f} (p={kb:.3g})", f"{tflips.mean():.3f} (p={tb:.3g})",
                        kb > P_MIN and tb > P_MIN, tolerance=f"p > {P_MIN:g}"))
    # Nothing is augmented outside training.
    aug = kmodel.data_augmentation(7)
    keval = keras.ops.convert_to_numpy(aug(images, training=False))
    layer = RandomFlipRotation(FACTOR).eval()
    teval = pairs.nhwc(layer(pairs.nchw(images), torch.Generator().manual_seed(0)))
    rows.append(verdict(group, "evaluation and prediction: images pass unchanged",
                        "identical" if np.array_equal(keval, images) else "changed",
                        "identical" if np.array_equal(teval, images) else "changed",
                        np.array_equal(keval, images) and np.array_equal(teval, images),
                        tolerance="exact"))
    return rows


# ---- 6 input pipeline, as training reads it: the cache ----------------------------------------

@functools.cache
def _keras_training_epoch(size: int, batch: int):
    """The reference's training batches of epoch 0 (``tl_keras.data.TrainingData``)."""
    settings = Settings(demo=True, image_size=size, batch_size=batch)
    splits = ImageFolderDataModule(settings, cache=False)
    splits.setup()
    data = TrainingData(splits.splits.train, size, batch, settings.seed)
    return Record([Step(0, (), (), 0, True, images, labels)
                   for images, labels in data.one_epoch(0).as_numpy_iterator()])


def check_cached_pipeline(size: int = 32, batch: int = 48) -> list[Row]:
    """One training epoch through the port's data module with its cache on (as ``tl_torch.train``
    reads it), and through the reference's ``TrainingData``: every file once, with its label, and
    the pixels against the exact resize of their files."""
    settings = Settings(demo=True, image_size=size, batch_size=batch)
    data = ImageFolderDataModule(settings, cache=True)
    data.setup()
    torch_record = Record([Step(0, (), (), 0, True, pairs.nhwc(images), labels.numpy())
                           for images, labels in data.train_dataloader()])
    rows = data_rows(_keras_training_epoch(size, batch), torch_record, group="6 input pipeline")
    return [replace(r, check=r.check.replace("epoch 1: ", "through the cache, one epoch: "))
            for r in rows]
