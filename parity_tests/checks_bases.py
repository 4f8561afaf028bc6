"""Check 20: the other bases (``--base``): MobileNetV3Large, EfficientNetB0 and ResNet50, each
against the Keras application itself, as checks 1-12 compare the recipe's MobileNetV2.

Per base: the layer table and the output shape at an even and an odd size; the whole model's
(trainable, non-trainable) counts at several fine-tune points, as both trainers count them; the
preprocessing (``preprocess_input`` and the model's own Rescaling/Normalization layers: the range
of what reaches the first convolution, and the values); every layer's output in float64 (equal to
rounding) and float32 (within the band of Keras' own error); BatchNorm and stochastic depth in
inference mode through a fine-tuning step; training steps in both phases from a shared state
(check 9's comparison); and three unbalanced classes, the validation loss and accuracy as each
trainer reports them (Keras' ``evaluate``, the port's Lightning validation).

The weights are random, made in Keras (``pairs.calibrated_random_weights``: BatchNorm statistics
measured on demo images, so that activations are of order 1; EfficientNet's Normalization away
from 0 and 1), and reach the port through Keras' file, as a user's would.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import keras
import numpy as np
import torch

from parity_tests import checks_steps, pairs
from parity_tests.checks_training import PHASES, torch_phase
from parity_tests.rows import Row, close, equal, measured, verdict
from tl_common import bands
from tl_common.bases import BASES, DEFAULT_BASE, base_facts
from tl_keras import model as kmodel
from tl_torch.module import TransferModule

GROUP = "20 other bases"
#: The bases this check covers: every one but the recipe's (checks 1-19).
OTHER_BASES = tuple(name for name in BASES if name != DEFAULT_BASE)
#: Even at every stride-2 layer, and odd (TF "same" padding is asymmetric there).
SIZE, ODD_SIZE = 64, 65
IMAGES = 4
#: Float64 agreement, relative to a layer's magnitude: the frameworks sum in other orders, which
#: in float64 leaves differences of order 1e-15 per operation, far below this.
FLOAT64_TOL = 1e-10
#: Layers that bring the pixels to the first convolution, inside the Keras model.
PREPROCESSING_LAYERS = ("Rescaling", "Normalization")


def group(name: str) -> str:
    return f"{GROUP}: {name}"


def weights(name: str, directory: Path) -> Path:
    """The calibrated random Keras weights file of ``name`` the checks compare on."""
    return pairs.calibrated_random_weights(directory, size=SIZE, base=name)


# ---- structure: layers, shapes, counts, the default fine-tune point -------------------------

def fine_tune_points(name: str) -> tuple[int, ...]:
    """0, the default, the middle and the end of the base (all of it, none of it trainable)."""
    facts = base_facts(name)
    return (0, facts.fine_tune_at, facts.layers // 2, facts.layers)


def _counts(kbase, model, tbase, fine_tune_at: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The fine-tuning phase's (trainable, non-trainable) of the whole two-class model
    (``model``, around ``kbase``), as tl_keras.train and tl_torch.train report them."""
    kmodel.set_phase(kbase, "fine_tuning", fine_tune_at)
    module = TransferModule(tbase, fine_tune_at=fine_tune_at, fast=False)
    module.set_phase("fine_tuning")
    counts = module.counts()
    return kmodel.count_params(model), (counts["trainable"], counts["non_trainable"])


def check_structure(name: str) -> list[Row]:
    """Layer table, output shapes, counts at several fine-tune points, the default point."""
    g, facts = group(name), base_facts(name)
    kbase, tbase = pairs.keras_base("none", SIZE, base=name), pairs.torch_base("none", SIZE, base=name)
    ktable = [(type(layer).__name__, layer.name) for layer in kbase.layers]
    ttable = [(layer.type, layer.name) for layer in tbase.keras_layers]
    rows = [verdict(g, "layer table: count, and (type, name) of every layer in order",
                    f"{len(ktable)} layers", f"{len(ttable)} layers", ktable == ttable,
                    tolerance="exact", note=_first_difference(ktable, ttable)),
            equal(g, f"default fine_tune_at = {facts.fine_tune_at}: the layer there",
                  kbase.layers[facts.fine_tune_at].name,
                  tbase.keras_layer(facts.fine_tune_at).name,
                  note=f"expected {facts.fine_tune_from}: {facts.reason}")]
    for size in (SIZE, ODD_SIZE):
        k = pairs.keras_base("none", size, base=name) if size != SIZE else kbase
        with torch.no_grad():
            t = tbase(torch.zeros(1, 3, size, size))
        rows.append(equal(g, f"output shape at {size} x {size} (NHWC)", tuple(k.output.shape[1:]),
                          tuple(t.permute(0, 2, 3, 1).shape[1:])))
    model = kmodel.build_model(kbase, seed=0)
    for k in fine_tune_points(name):
        kc, tc = _counts(kbase, model, tbase, k)
        rows.append(equal(g, f"fine_tune_at={k}: (trainable, non-trainable) of the model",
                          kc, tc))
    return rows


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at layer {i}: {x} vs {y}"
    return "" if len(a) == len(b) else f"lengths {len(a)} vs {len(b)}"


# ---- preprocessing ---------------------------------------------------------------------------

def first_convolution_inputs(name: str, kbase, tbase, pixels: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
    """What reaches the first convolution in each, NHWC: ``preprocess_input`` and the model's
    leading Rescaling/Normalization layers."""
    k = pairs.preprocess(pixels, name)
    with torch.no_grad():
        t = tbase.preprocess(pairs.nchw(pixels))
    for layer in tbase.keras_layers[1:]:
        if layer.type not in PREPROCESSING_LAYERS:
            break
        k = keras.ops.convert_to_numpy(kbase.get_layer(layer.name)(k))
        with torch.no_grad():
            t = layer.module(t)
    return k, pairs.nhwc(t)


def check_preprocessing(name: str, directory: Path) -> list[Row]:
    """The range of the first convolution's input (pixels 0 and 255), and its values on demo
    images, Keras' against the port's, with the Normalization weights of the calibrated file."""
    g, path = group(name), weights(name, directory)
    kbase, tbase = pairs.keras_base(path, SIZE, base=name), pairs.torch_base(path, SIZE, base=name)
    extremes = np.stack([np.zeros((SIZE, SIZE, 3), np.float32),
                         np.full((SIZE, SIZE, 3), 255, np.float32)])
    k, t = first_convolution_inputs(name, kbase, tbase, extremes)
    # One float32 rounding of the largest value: a multiply-add rounded once (fused) or twice.
    tol = 4 * bands.EPS32 * max(bands.magnitude(k), 1.0)
    rows = [close(g, "preprocessing range: first convolution's input for pixels 0 and 255 "
                     "(min, max)", [k.min(), k.max()], [t.min(), t.max()], tol,
                  tolerance_name="4 float32 ulp of max",
                  note="per channel, as the application scales it")]
    k, t = first_convolution_inputs(name, kbase, tbase, pairs.demo_images(SIZE, IMAGES))
    rows.append(close(g, "preprocessing values on demo images", k, t, tol,
                      tolerance_name="4 float32 ulp of max"))
    return rows


# ---- numerics: every layer in float64 and float32 -------------------------------------------

@functools.cache
def _keras_numerics(name: str, path: Path) -> tuple[dict, dict]:
    """Keras' every layer in float64 and float32 (computed once: a planted mistake changes the
    port only)."""
    x = pairs.demo_images(SIZE, IMAGES)
    x32, x64 = pairs.preprocess(x, name), pairs.preprocess(x.astype(np.float64), name)
    return (pairs.keras_layer_outputs(pairs.keras_base(path, SIZE, float64=True, base=name), x64),
            pairs.keras_layer_outputs(pairs.keras_base(path, SIZE, base=name), x32))


def check_numerics(name: str, directory: Path) -> list[Row]:
    """Keras in float64 is the exact answer: the port in float64 equals it to rounding at every
    layer; in float32 every layer stays within the band of Keras' own float32 error."""
    g, path = group(name), weights(name, directory)
    x = pairs.demo_images(SIZE, IMAGES)
    x32, x64 = pairs.preprocess(x, name), pairs.preprocess(x.astype(np.float64), name)
    k64, k32 = _keras_numerics(name, path)
    t64 = pairs.torch_layer_outputs(pairs.torch_base(path, SIZE, float64=True, base=name), x64)
    t32 = pairs.torch_layer_outputs(pairs.torch_base(path, SIZE, base=name), x32)
    missing = sorted(set(k64) - set(t64))
    worst64 = max(((bands.max_error(k, t64[n]) / max(1.0, bands.magnitude(k)), n)
                   for n, k in k64.items() if n in t64), default=(np.inf, "none"))
    found = {n: bands.against_exact(k, k32[n], t32[n]) for n, k in k64.items() if n in t32}
    worst = max(found, key=lambda n: found[n].excess)
    failed = [n for n, b in found.items() if not b.passed]
    smallest = min(float(np.std(v)) for v in k32.values())
    return [
        verdict(g, f"float64: every layer's output ({len(k64)} layers), max |diff| / max(1, "
                   "magnitude)", f"{len(k64)} layers", f"{len(t64)} layers",
                not missing and worst64[0] <= FLOAT64_TOL, diff=float(worst64[0]),
                tolerance=f"{FLOAT64_TOL:g} rel",
                note=f"worst: {worst64[1]}" + (f"; no output for {missing[:3]}" if missing else "")),
        measured(g, f"float32: every layer's output within the band (worst of {len(found)})",
                 found[worst], keras=f"{len(found) - len(failed)} of {len(found)} pass",
                 torch=worst, note=f"failing: {failed[:3]}" if failed else ""),
        verdict(g, "the activations compared are of order 1 (smallest std of a layer)",
                f"{smallest:.3g}", "", smallest >= 1e-2, tolerance=">= 0.01",
                note="weights whose activations vanish would make every comparison pass"),
    ]


# ---- BatchNorm and Dropout inside the base through a fine-tuning step ------------------------

def _keras_step(kbase, images: np.ndarray, labels: np.ndarray, fine_tune_at: int):
    """One fine-tuning step of the reference's model around ``kbase``; returns the model."""
    model = kmodel.build_model(kbase, seed=0, augment=False)
    kmodel.set_phase(kbase, "fine_tuning", fine_tune_at)
    kmodel.compile_for(model, "fine_tuning", 1e-3)
    model.run_eagerly = True  # one step: tracing it would cost more than the step
    model.train_on_batch(images, labels.reshape(-1, 1).astype(np.float32))
    return model


def _bn_arrays(kbase=None, tbase=None) -> dict[str, list[np.ndarray]]:
    """{layer: [gamma, beta, moving mean, moving variance]} of every BatchNormalization."""
    if kbase is not None:
        return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in kbase.layers
                if isinstance(layer, keras.layers.BatchNormalization)}
    return {layer.name: [layer.module.weight.detach().numpy().copy(),
                         layer.module.bias.detach().numpy().copy(),
                         layer.module.running_mean.numpy().copy(),
                         layer.module.running_var.numpy().copy()]
            for layer in tbase.keras_layers if layer.type == "BatchNormalization"}


def _changed(before: dict, after: dict) -> tuple[int, int]:
    """(layers whose gamma/beta changed, layers whose moving statistics changed)."""
    affine = sum(not all(np.array_equal(a, b) for a, b in zip(before[n][:2], after[n][:2],
                                                              strict=True)) for n in before)
    stats = sum(not all(np.array_equal(a, b) for a, b in zip(before[n][2:], after[n][2:],
                                                             strict=True)) for n in before)
    return affine, stats


def check_inference_mode(name: str, directory: Path) -> list[Row]:
    """One fine-tuning step (learning rate 1e-3, so that every unfrozen weight moves): the
    unfrozen BatchNorm layers' gamma and beta change, no moving statistic does; the base's output
    in a training step equals its inference output (stochastic depth inactive)."""
    g, path, at = group(name), weights(name, directory), base_facts(name).fine_tune_at
    images, labels = pairs.demo_images(SIZE, IMAGES), pairs.demo_labels(IMAGES)
    kbase = pairs.keras_base(path, SIZE, base=name)
    before = _bn_arrays(kbase)
    model = _keras_step(kbase, images, labels, at)
    kchanged = _changed(before, _bn_arrays(kbase))
    module = TransferModule(pairs.torch_base(path, SIZE, base=name), fine_tune_at=at,
                            fine_tune_learning_rate=1e-3, augment=False, fast=False).train()
    before = _bn_arrays(tbase=module.base)
    x = pairs.nchw(images)
    with torch.no_grad():
        inference = module.base.eval()(module.base.preprocess(x))
    module.train()
    optimizer = torch_phase(module, "fine_tuning")
    with torch.no_grad():
        training = module.base(module.base.preprocess(x))
    loss = module.shared_step((x, torch.from_numpy(labels)), module.train_loss, module.train_acc,
                              augment=False)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    tchanged = _changed(before, _bn_arrays(tbase=module.base))
    unfrozen = sum(layer.index >= at for layer in module.base.keras_layers
                   if layer.type == "BatchNormalization")
    kinf = kbase(pairs.preprocess(images, name), training=False)
    ktrain = model.get_layer("base_inference_mode")(pairs.preprocess(images, name), training=True)
    return [
        verdict(g, "fine-tuning step: BatchNorm layers whose gamma/beta changed", kchanged[0],
                tchanged[0], kchanged[0] == tchanged[0] == unfrozen, tolerance="exact",
                note=f"the {unfrozen} at or above fine_tune_at={at}"),
        verdict(g, "fine-tuning step: BatchNorm layers whose moving statistics changed",
                kchanged[1], tchanged[1], kchanged[1] == tchanged[1] == 0, tolerance="exact",
                note="base(x, training=False): inference mode in both phases"),
        close(g, "the base's output in a training step minus its inference output "
                 "(Dropout, BatchNorm inactive)", keras.ops.convert_to_numpy(ktrain - kinf),
              pairs.nhwc(training - inference), 0.0),
    ]


# ---- training steps in both phases ------------------------------------------------------------

def check_training_steps(name: str, directory: Path, steps: int = 3) -> list[Row]:
    """Check 9's step-by-step comparison (augmentation and dropout on, the reference's draws
    replayed in the port) on this base, from its default fine-tune point."""
    setup = checks_steps.Setup(size=SIZE, batch=IMAGES, steps=steps, base=name,
                               weights=weights(name, directory), free_running=False,
                               group=group(name))
    return checks_steps.run(setup).rows


# ---- three unbalanced classes: the epoch's loss and accuracy as the trainers report them -------

#: 12 images, labels 7 / 3 / 2 (the demo's images, labelled regardless of content: the loss is
#: what it is), in batches of 5: the last batch holds 2, so an epoch's mean is a weighted one.
UNBALANCED = np.array([0, 1, 0, 0, 2, 0, 1, 0, 0, 1, 2, 0])
BATCH = 5
#: A learning rate below every float32 weight's resolution (the optimizers refuse 0): no float32
#: weight moves, so each epoch is evaluated at the same weights in both frameworks.
STILL = 1e-12
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def _per_image_losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sparse categorical cross-entropy of each image, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]


def _keras_model(name: str, path: Path, head: list | None = None):
    """The three-class reference model without augmentation and dropout; ``head``: its Dense
    weights given, and the model in float64."""
    float64 = head is not None
    with pairs.float64_policy() if float64 else contextlib.nullcontext():
        kbase = pairs.keras_base(path, SIZE, float64=float64, base=name)
        model = kmodel.build_model(kbase, seed=0, dropout=0.0, augment=False, num_classes=3)
        if float64:
            model.get_layer("dense").set_weights([w.astype(np.float64) for w in head])
    return kbase, model


def _keras_epochs(name: str, kbase, model, x, y) -> tuple[list[dict], np.ndarray]:
    """One epoch of each phase with ``fit`` at learning rate :data:`STILL` (no augmentation, no
    dropout, not shuffled) and its validation on the same images: the metrics as metrics.json
    records them, and the logits."""
    with pairs.float64_policy() if x.dtype == np.float64 else contextlib.nullcontext():
        epochs = []
        for phase, _ in PHASES:
            kmodel.set_phase(kbase, phase, base_facts(name).fine_tune_at)
            kmodel.compile_for(model, phase, STILL)
            model.run_eagerly = True  # tracing four training graphs costs more than 3 steps
            history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                                validation_data=(x, y), validation_batch_size=BATCH)
            epochs.append({k: float(history.history[k][0]) for k in METRICS})
        logits = model.predict(x, batch_size=BATCH, verbose=0)
    return epochs, logits


def _torch_epochs(name: str, path: Path, x: np.ndarray, y: np.ndarray, head: list) -> list[dict]:
    """The same two epochs in Lightning, as tl_torch.train logs them."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    module = TransferModule(pairs.torch_base(path, SIZE, base=name), num_classes=3, dropout=0.0,
                            augment=False, fast=False, learning_rate=STILL,
                            fine_tune_learning_rate=STILL,
                            fine_tune_at=base_facts(name).fine_tune_at)
    with torch.no_grad():
        module.classifier.weight.copy_(torch.from_numpy(head[0].T))
        module.classifier.bias.copy_(torch.from_numpy(head[1]))
    data = TensorDataset(pairs.nchw(x), torch.from_numpy(y))
    epochs = []
    for phase, _ in PHASES:
        module.set_phase(phase)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, DataLoader(data, batch_size=BATCH), DataLoader(data, batch_size=BATCH))
        epochs.append({k: float(trainer.callback_metrics[k]) for k in METRICS})
    return epochs


def check_unbalanced_classes(name: str, directory: Path) -> list[Row]:
    """Three classes, 7 / 3 / 2 images, batches of 5, 5 and 2: one epoch of each phase and its
    validation, each epoch's loss and accuracy as the trainers report them (Keras' ``fit``
    history, the port's Lightning logs). The learning rate moves no float32 weight
    (:data:`STILL`), so the weights are the same at every step and what is compared is the
    accounting, not a trajectory (the training-step rows compare steps). Keras in float64 is
    the exact answer; each loss is held to the band of Keras' own float32 error on the loss of a
    single image (the largest of the 12: an epoch's mean cannot be further off than its worst
    image); the accuracy, a share of 12, is exact. A mean of the batches' means, or a
    macro-averaged accuracy, misses by far more."""
    g, path = group(name), weights(name, directory)
    x, y = pairs.demo_images(SIZE, len(UNBALANCED)), UNBALANCED.astype(np.int32)
    _, model32 = _keras_model(name, path)
    head = [np.array(w) for w in model32.get_layer("dense").get_weights()]
    logits32 = model32.predict(x, batch_size=BATCH, verbose=0)
    k64, logits64 = _keras_epochs(name, *_keras_model(name, path, head), x.astype(np.float64), y)
    t32 = _torch_epochs(name, path, x, y, head)
    per_image = float(np.max(np.abs(_per_image_losses(logits32, y) - _per_image_losses(logits64, y))))
    rows = []
    for p, (phase, _) in enumerate(PHASES):
        for key in ("loss", "val_loss"):
            band = bands.Band(per_image, abs(t32[p][key] - k64[p][key]),
                              bands.floor(k64[p][key]),
                              "vs float64; Keras' error: its largest on one image's loss")
            rows.append(measured(g, f"3 unbalanced classes, {phase} epoch: {key}", band,
                                 keras=k64[p][key], torch=t32[p][key],
                                 note="Keras column: float64"))
        for key in ("accuracy", "val_accuracy"):
            rows.append(close(g, f"3 unbalanced classes, {phase} epoch: {key}", k64[p][key],
                              t32[p][key], 1e-6, tolerance_name="float32 rounding of k/12",
                              note="Keras column: float64"))
    return rows
