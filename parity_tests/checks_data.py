"""Checks 6 and 7: the input pipeline and the augmentation."""

from __future__ import annotations

import keras
import numpy as np
import torch
from scipy import stats

from parity_tests import pairs
from parity_tests.rows import Row, close, verdict
from tl_common.demo import demo_data_root
from tl_common.files import find_images
from tl_common.settings import Settings
from tl_keras import model as kmodel
from tl_keras.data import make_dataset
from tl_torch.augment import RandomFlipRotation, augment
from tl_torch.data import ImageFolderDataModule

#: The same JPEG through both pipelines (TF's decode_image + tf.image.resize; simplejpeg with
#: TF's fast IDCT + F.interpolate), 0..255 scale. Decoded pixels are equal (libjpeg-turbo, the same
#: IDCT and upsampling); both resizes compute source coordinates in float32, up to the source
#: width (~500): an ulp or two there is ~6e-5 pixel, times intensity steps of up to 255 per pixel
#: at sharp edges, ~1.5e-2. (Measured on the demo images: ~1e-3. With Pillow's accurate-IDCT
#: decoder instead, pixels differ by up to ~17.)
PIXEL_TOL = 2e-2
#: Augmented pixels for given flips and angles, 0..255 scale: grid_sample's round trip through
#: normalised coordinates and torch's float32 sin/cos move a sample by ~1e-5 pixel, so a pixel
#: moves by up to ~1e-5 times the local intensity step (at most 255 per pixel at sharp edges).
AUGMENT_TOL = 1e-2
#: Distribution tests fail below this p-value.
P_MIN = 1e-3
DRAWS = 20_000
FACTOR = 0.2


# ---- 6 input pipeline ------------------------------------------------------------------------

def check_pipeline(size: int = 160) -> list[Row]:
    group = "6 input pipeline"
    settings = Settings(demo=True, image_size=size, batch_size=16)
    data = ImageFolderDataModule(settings, cache=False, num_workers=0)
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
    rows.append(close(group, "pixels of the first 2 validation batches (0..255)", kimages, timages,
                      PIXEL_TOL, note="decode + bilinear resize, no antialias"))
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
    rows = [
        close(group, "Keras' flips and angles, whole images (0..255)", kout, tout, AUGMENT_TOL,
              note=f"angles {np.round(angles, 1).tolist()[:4]}..., flips {int(flips.sum())}/8"),
        close(group, f"the same, reflect-filled border only ({int(border.sum()):,} pixels)",
              kout[border], tout[border], AUGMENT_TOL),
    ]
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
