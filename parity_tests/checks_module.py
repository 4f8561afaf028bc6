"""Check 16: the port's module as training and evaluation run it, against the Keras model.

Check 4 compares the bases layer by layer with a pooling and head of its own; here the module
runs itself: ``TransferModule`` with the trainer's defaults (the folded base, its own pooling,
Dropout and head, its loss and accuracy metrics), evaluated through its own ``shared_step`` as
``validation_step`` calls it, against the recipe's Keras model (``tl_keras.build_model``: the
augmentation, ``preprocess_input``, the base in inference mode, pooling, Dropout, Dense) called
with ``training=False``, with the same head weights (Keras' init). The exact answer is the Keras
model in float64. And the module's Dropout in training against Keras' ``Dropout`` layer.
"""

from __future__ import annotations

import contextlib
import functools

import keras
import numpy as np
import pytest
import torch
from scipy import stats

from parity_tests import pairs
from parity_tests.rows import Row, equal, measured, summary, verdict
from tl_common import bands, recipe
from tl_common.demo import demo_weights_path
from tl_keras import model as kmodel
from tl_torch.module import TransferModule

GROUP = "16 the module's own paths"
SIZE = 32
IMAGES = 48
#: Features through each Dropout for the share test.
DROPOUT_DRAWS = 64
P_MIN = 1e-3


@functools.cache
def keras_side() -> dict:
    """The Keras model's validation outputs (float32 and float64) on demo images; its head."""
    images, labels = pairs.demo_images(SIZE, IMAGES), pairs.demo_labels(IMAGES)
    results = {}
    for float64 in (False, True):
        # The float64 twin takes the float32 model's weights (the file is read once).
        base = pairs.keras_base("none" if float64 else demo_weights_path(), SIZE, float64=float64)
        with pairs.float64_policy() if float64 else contextlib.nullcontext():
            model = kmodel.build_model(base, seed=0)
            kmodel.compile_for(model, "feature_extraction", recipe.LEARNING_RATE)
        if float64:
            model.set_weights([w.astype(np.float64) for w in results["weights"]])
        else:
            results["weights"] = model.get_weights()
            results["head"] = model.get_layer("dense").get_weights()
        x = images.astype(np.float64 if float64 else np.float32)
        logits = keras.ops.convert_to_numpy(model(x, training=False)).reshape(-1)
        loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype=x.dtype)(
            labels.reshape(-1, 1).astype(x.dtype), logits.reshape(-1, 1))
        accuracy = keras.metrics.BinaryAccuracy(threshold=0.0)
        accuracy.update_state(labels.reshape(-1, 1), logits.reshape(-1, 1))
        results["64" if float64 else "32"] = {"logits": logits, "loss": float(loss),
                                               "accuracy": float(accuracy.result())}
        if not float64:
            ones = np.ones((DROPOUT_DRAWS, 1280), np.float32)
            results["dropout"] = keras.ops.convert_to_numpy(
                model.get_layer("dropout")(ones, training=True))
            results["rate"] = float(model.get_layer("dropout").rate)
    results["images"], results["labels"] = images, labels
    return results


def _bce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Binary cross-entropy from logits, the batch's mean, in float64."""
    z, y = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def port_module() -> TransferModule:
    """The module as ``tl_torch.train`` makes it (defaults: folded base, augmentation,
    Dropout(0.2)), with Keras' head init."""
    k = keras_side()
    module = TransferModule(pairs.torch_base(demo_weights_path(), SIZE))
    kernel, bias = k["head"]
    with torch.no_grad():
        module.classifier.weight.copy_(torch.from_numpy(kernel.T))
        module.classifier.bias.copy_(torch.from_numpy(bias))
    return module


def check_module() -> list[Row]:
    k = keras_side()
    module = port_module().eval()
    images, labels = pairs.nchw(k["images"]), torch.from_numpy(k["labels"].astype(np.int64))
    with torch.no_grad():
        logits = module(images).numpy()
        module.shared_step((images, labels), module.val_loss, module.val_acc, augment=False)
    loss, accuracy = float(module.val_loss.compute()), float(module.val_acc.compute())
    e, f = k["64"], k["32"]
    margin = float(np.abs(e["logits"]).min())
    rows = [
        # rms over the images: the folded base (BatchNorm folded into the convolutions in
        # float32) rounds more than Keras' layers, and the largest of 48 errors is itself a
        # noisy statistic (benchmarks/RESULTS.md gives both, measured).
        measured(GROUP, f"evaluation: logits of {IMAGES} images (module.forward, folded base)",
                 bands.against_exact(e["logits"], f["logits"], logits, norm="rms"),
                 keras=summary(f["logits"]), torch=summary(logits),
                 note="rms; Keras model(x, training=False); exact: the same in float64"),
        # The logits' error is the row above's; here each framework's loss is held to the exact
        # binary cross-entropy of its own logits: the loss function and its metric alone.
        measured(GROUP, "evaluation: loss (the module's validation _step and metric)",
                 bands.Band(abs(f["loss"] - _bce(f["logits"], k["labels"])),
                            abs(loss - _bce(logits, k["labels"])),
                            bands.floor(_bce(f["logits"], k["labels"])),
                            "each loss vs the float64 cross-entropy of its own logits"),
                 keras=f["loss"], torch=loss),
        # The decision is the logit's sign: equal unless a logit lies within rounding of 0.
        verdict(GROUP, "evaluation: accuracy (the module's metric; Keras' BinaryAccuracy(0))",
                f"{f['accuracy']:.6f}", f"{accuracy:.6f}", f["accuracy"] == accuracy,
                tolerance="exact", note=f"smallest |logit| {margin:.3g}"),
    ]
    # Fine-tuning: the fold leaves the unfrozen layers to their modules; nothing else changes.
    module.set_phase("fine_tuning")
    with torch.no_grad():
        tuned = module(images).numpy()
    rows.append(measured(GROUP, "evaluation in fine-tuning (layers from 100 unfrozen): logits",
                         bands.against_exact(e["logits"], f["logits"], tuned, norm="rms"),
                         keras=summary(f["logits"]), torch=summary(tuned)))
    # Dropout in training: kept features scaled by 1 / (1 - rate), the rest zeroed.
    module.train()
    ones = torch.ones(DROPOUT_DRAWS, 1280)
    with torch.no_grad():
        dropped = module.dropout(ones).numpy()
    kept_k = sorted({float(v) for v in np.unique(k["dropout"]) if v != 0})
    kept_t = sorted({float(v) for v in np.unique(dropped) if v != 0})
    rows.append(equal(GROUP, "training: Dropout's kept features, scaled by 1 / (1 - rate)",
                      str(kept_k), str(kept_t)))
    n = dropped.size
    kp = stats.binomtest(int((k["dropout"] == 0).sum()), n, k["rate"]).pvalue
    tp = stats.binomtest(int((dropped == 0).sum()), n, k["rate"]).pvalue
    rows.append(verdict(GROUP, f"training: share dropped = Keras' rate {k['rate']:g} "
                               f"({n:,} features, binomial p-value)",
                        f"{(k['dropout'] == 0).mean():.4f} (p={kp:.3g})",
                        f"{(dropped == 0).mean():.4f} (p={tp:.3g})", kp > P_MIN and tp > P_MIN,
                        tolerance=f"p > {P_MIN:g}"))
    return rows


# ---- check 18: bf16 --------------------------------------------------------------------------

BF16_GROUP = "18 bf16"


@functools.cache
def keras_bf16_unavailable() -> str | None:
    """Why TensorFlow cannot compute the base's operations in bf16 under the current settings
    (oneDNN capped below AVX-512 has no bf16 convolution), asked by computing them; None where
    it can."""
    import tensorflow as tf

    x = tf.ones((1, 8, 8, 4), tf.bfloat16)
    try:
        tf.nn.conv2d(x, tf.ones((1, 1, 4, 4), tf.bfloat16), 1, "SAME").numpy()
        tf.nn.depthwise_conv2d(x, tf.ones((3, 3, 4, 1), tf.bfloat16), (1, 1, 1, 1), "SAME").numpy()
    except (tf.errors.OpError, TypeError, ValueError) as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    return None


@functools.cache
def keras_bf16_logits() -> np.ndarray:
    """The recipe's Keras model under Keras' ``mixed_bfloat16`` policy (bf16 compute, float32
    variables), with check 16's weights, on its images."""
    k = keras_side()
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        base = pairs.keras_base("none", SIZE)
        model = kmodel.build_model(base, seed=0)
    finally:
        keras.config.set_dtype_policy(policy)
    model.set_weights(k["weights"])
    out = model(k["images"].astype(np.float32), training=False)
    return keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")).reshape(-1)


def port_bf16_logits(module: TransferModule, images: torch.Tensor) -> np.ndarray:
    """The module under ``torch.autocast(bfloat16)``, as ``--precision bf16-mixed`` runs it."""
    with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16):
        return module(images).float().numpy().reshape(-1)


def check_bf16() -> list[Row]:
    """The port in bf16 (autocast, ``--precision bf16-mixed``) against the exact logits, held to
    Keras' own ``mixed_bfloat16`` error against them: bf16 changes the numbers, by as much in the
    port as in the reference. The float32 errors are in the note, for scale."""
    reason = keras_bf16_unavailable()
    if reason is not None:
        pytest.skip(f"TensorFlow computes no bf16 under these settings ({reason})")
    k = keras_side()
    module = port_module().eval()
    images = pairs.nchw(k["images"])
    port = port_bf16_logits(module, images)
    keras_bf16 = keras_bf16_logits()
    band = bands.against_exact(k["64"]["logits"], keras_bf16, port, norm="rms",
                               how="bf16 vs float64")
    fp32 = bands.ERRORS["rms"](k["32"]["logits"], k["64"]["logits"])
    sign = float(np.mean(np.sign(port) == np.sign(k["64"]["logits"])))
    ksign = float(np.mean(np.sign(keras_bf16) == np.sign(k["64"]["logits"])))
    return [
        measured(BF16_GROUP, f"logits of {IMAGES} images: port autocast bf16 vs Keras "
                             "mixed_bfloat16 (rms, each vs float64)", band,
                 keras=summary(keras_bf16), torch=summary(port),
                 note=f"Keras float32 for scale: {fp32:.2g}"),
        verdict(BF16_GROUP, "the class of each image, bf16 vs float64 (share agreeing)",
                f"{ksign:.3f}", f"{sign:.3f}", sign >= ksign - 2 / IMAGES,
                tolerance="port >= Keras - 2 images"),
    ]
