"""Checks 1-4 and 10: architecture, trainable counts, preprocessing, numerics, the head's init."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import torch
from scipy import stats

from parity_tests import pairs
from parity_tests.rows import Row, close, equal, measured, summary, verdict
from tl_common import bands, recipe
from tl_common.mobilenet_v2 import KERAS_BASE_LAYERS
from tl_keras import model as kmodel
from tl_torch import count_params, freeze, layer_table
from tl_torch.module import TransferModule

# ---- tolerances ----------------------------------------------------------------------------

#: Both frameworks in float64: only rounding at 1e-16 relative separates them (measured ~1e-13
#: at layers of magnitude ~70); any difference in the function itself shows up far above this.
#: (float32 rows are judged by bands measured in the run: tl_common.bands.)
FLOAT64_TOL = 1e-9
#: Images per numeric comparison. A band compares the largest error of each framework, and the
#: largest of a few numbers is itself noisy: with 2 images (2 logits) Keras' float32 error was
#: once 8x smaller than the port's by chance (2.8e-7 vs 2.1e-6, both a few ulps) under oneDNN
#: limited to SSE4.1; with 8 the maxima are steady.
NUMERIC_IMAGES = 8
#: Activations smaller than this at some layer make a comparison meaningless (Keras' random init
#: with inference-mode BatchNorm: ~1e-12).
ACTIVATION_FLOOR = 1e-2
#: A Kolmogorov-Smirnov test of a distribution is failed below this p-value.
KS_P_MIN = 1e-3


# ---- 1 architecture --------------------------------------------------------------------------

def check_architecture(sizes=pairs.SHAPE_SIZES) -> list[Row]:
    group = "1 architecture"
    kbase, tbase = kmodel.build_base("none", 160), pairs.torch_base("none", 160)
    klayers = [(type(layer).__name__, layer.name) for layer in kbase.layers]
    tlayers = [(layer.type, layer.name) for layer in tbase.keras_layers]
    first = next((i for i, (a, b) in enumerate(zip(klayers, tlayers, strict=False)) if a != b), None)
    rows = [
        equal(group, "number of layers", len(klayers), len(tlayers)),
        verdict(group, "layer names, types and order", f"{len(klayers)} layers",
                f"{len(tlayers)} layers", klayers == tlayers, tolerance="exact",
                note="" if first is None else f"first difference at {first}: {klayers[first]} vs "
                                               f"{tlayers[first]}"),
        equal(group, f"layers[{recipe.FINE_TUNE_AT}] (fine_tune_at)",
              kbase.layers[recipe.FINE_TUNE_AT].name, tbase.keras_layers[recipe.FINE_TUNE_AT].name),
    ]
    for size in sizes:
        kbase = kmodel.build_base("none", size)
        kshapes = [tuple(layer.output.shape[1:]) for layer in kbase.layers[1:]]
        zeros = np.zeros((1, size, size, 3), np.float32)
        touts = pairs.torch_layer_outputs(tbase, zeros)
        tshapes = [touts[layer.name].shape[1:] for layer in tbase.keras_layers[1:]]
        bad = [kbase.layers[i + 1].name for i, (a, b) in enumerate(zip(kshapes, tshapes, strict=True))
               if a != b]
        rows.append(verdict(group, f"every layer's output shape at {size}x{size}",
                            f"out {kshapes[-1]}", f"out {tshapes[-1]}", not bad, tolerance="exact",
                            note=f"differ: {bad[:3]}" if bad else "153 layers"))
    return rows


# ---- 2 trainable counts ----------------------------------------------------------------------

def _keras_model(size: int = 96):
    base = kmodel.build_base("none", size)
    return base, kmodel.build_model(base, seed=0)


def _torch_module():
    return TransferModule(pairs.torch_base("none", 96), fast=False)


def check_counts(fine_tune_at: int = recipe.FINE_TUNE_AT) -> list[Row]:
    group = "2 trainable counts"
    kbase, kmodel_ = _keras_model()
    module = _torch_module()
    rows = []
    for phase in ("feature_extraction", "fine_tuning"):
        kmodel.set_phase(kbase, phase, fine_tune_at)
        module.hparams.fine_tune_at = fine_tune_at
        module.set_phase(phase)
        kt, knt = kmodel.count_params(kmodel_)
        tt, tnt = count_params(module)
        rows.append(equal(group, f"{phase}: trainable", kt, tt))
        rows.append(equal(group, f"{phase}: non-trainable", knt, tnt))
        ktable = [row[3] for row in kmodel.layer_table(kbase)]
        ttable = [row[3] for row in layer_table(module.base)]
        rows.append(verdict(group, f"{phase}: layer table's trainable column",
                            f"{sum(ktable)} trainable", f"{sum(ttable)} trainable",
                            ktable == ttable, tolerance="exact"))
    # every fine_tune_at: Keras' loop over base.layers[:k] against tl_torch.freeze
    mismatches = []
    for k in range(KERAS_BASE_LAYERS + 1):
        kmodel.set_phase(kbase, "fine_tuning", k)
        freeze(module.base, k)
        if kmodel.count_params(kmodel_) != count_params(module):
            mismatches.append((k, kmodel.count_params(kmodel_), count_params(module)))
    rows.append(verdict(group, f"(trainable, non-trainable) for every fine_tune_at in "
                               f"0..{KERAS_BASE_LAYERS}", f"{KERAS_BASE_LAYERS + 1} settings",
                        f"{KERAS_BASE_LAYERS + 1 - len(mismatches)} equal", not mismatches,
                        tolerance="exact",
                        note=f"first difference: {mismatches[0]}" if mismatches else ""))
    return rows


# ---- 3 preprocessing -------------------------------------------------------------------------

def check_preprocessing(size: int = 96) -> list[Row]:
    group = "3 preprocessing"
    module = _torch_module()
    kbase, kmodel_ = _keras_model(size)
    endpoints = np.array([0.0, 127.5, 255.0], np.float32).reshape(1, 1, 1, 3)
    kend = pairs.preprocess(endpoints).ravel()
    tend = module.base.preprocess(pairs.nchw(endpoints)).numpy().ravel()
    rows = [close(group, "0, 127.5, 255 -> -1, 0, 1", kend, tend, 0.0, tolerance_name="exact"),
            verdict(group, "endpoints are -1, 0, 1", str(kend.tolist()), str(tend.tolist()),
                    np.array_equal(kend, [-1, 0, 1]) and np.array_equal(tend, [-1, 0, 1]),
                    tolerance="exact")]
    images = pairs.demo_images(size)
    rows.append(close(group, "a batch of demo images", pairs.preprocess(images),
                      pairs.nhwc(module.base.preprocess(pairs.nchw(images))), 0.0,
                      tolerance_name="exact"))
    # What reaches the base: after augmentation (training) and without it (inference).
    augment = kmodel_.get_layer("data_augmentation")
    for training in (True, False):
        x = images if not training else keras.ops.convert_to_numpy(augment(images, training=True))
        kx = pairs.preprocess(x)
        module.train(training)
        t = module.augment(pairs.nchw(images), generator=torch.Generator().manual_seed(0)) \
            if training else pairs.nchw(images)
        tx = module.base.preprocess(t).numpy()
        mode = "training (augmented)" if training else "inference"
        inside = (-1 <= kx.min() and kx.max() <= 1 and -1 <= tx.min() and tx.max() <= 1)
        rows.append(verdict(group, f"range reaching the base, {mode}",
                            f"[{kx.min():.4f}, {kx.max():.4f}]", f"[{tx.min():.4f}, {tx.max():.4f}]",
                            inside, tolerance="within [-1, 1]"))
    return rows


# ---- 4 numerics ------------------------------------------------------------------------------

def _layer_bands(group: str, label: str, k64: dict, k32: dict, t32: dict) -> Row:
    """Every layer's float32 output, port and Keras, against Keras' float64: one row, the layer
    where the port comes closest to its limit."""
    missing = [name for name in k64 if name not in t32]
    found = {name: bands.against_exact(k64[name], k32[name], t32[name]) for name in k64
             if name not in missing}
    worst_name = max(found, key=lambda n: found[n].excess)
    worst = found[worst_name]
    failed = [name for name, band in found.items() if not band.passed]
    note = f"worst {worst_name} (|act| up to {bands.magnitude(k64[worst_name]):.3g})"
    if failed:
        note += f"; over the limit: {failed[:3]}"
    if missing:
        note += f"; missing in torch: {missing[:3]}"
    row = measured(group, f"{label}: every one of {len(k64)} layers", worst, keras="float32",
                   torch="float32", note=note)
    return row if not (missing or failed) else Row(**{**row.as_dict(), "passed": False})


def check_numerics(directory: Path, sizes=pairs.NUMERIC_SIZES,
                   only: tuple[str, ...] | None = None, float64: bool = True) -> list[Row]:
    """Same weights, same inputs (demo images): every layer, the base's output and the logits.

    Keras in float64 is the exact answer; the port's float32 error against it is held to a
    multiple of Keras' own float32 error against it (tl_common.bands), layer by layer, for the
    base's output and for the logits. The float64 rows compare the port in float64 with Keras in
    float64 (at the first size): what separates them there is rounding at ~1e-13, so they show
    that the two compute the same function. ``only`` restricts the weight sets (by label prefix);
    ``float64=False`` skips the port's float64 rows (Keras' float64 answer is always computed).
    """
    group = "4 numerics"
    rows = []
    for label, path in pairs.weight_sets(directory).items():
        if only and not label.startswith(only):
            continue
        # Random weights at the first size only: they are there for what trained weights do not
        # show (moving mean and variance far from each other); the odd size is the demo's.
        for size in sizes if not label.startswith("calibrated random") else sizes[:1]:
            where = f"{label} {size}px"
            keras_side = _keras_numerics(str(path), size)
            x, k32, k64 = keras_side.x, keras_side.k32, keras_side.k64
            x64 = x.astype(np.float64)
            tbase = pairs.torch_base(path, size)
            t32 = pairs.torch_layer_outputs(tbase, x)
            rows.append(verdict(group, f"{where}: activations not vanishing",
                                f"min layer std {keras_side.min_std:.3g}", "",
                                keras_side.min_std >= ACTIVATION_FLOOR,
                                tolerance=f">= {ACTIVATION_FLOOR:g}"))
            rows.append(_layer_bands(group, f"{where} float32", k64, k32, t32))
            # Layer by layer above runs the base's own modules (the folded base has no layer
            # boundaries to compare); what follows runs what training and prediction run.
            tout, tlogits = _torch_module_outputs(tbase, pairs.demo_images(size, NUMERIC_IMAGES))
            out = "out_relu"
            # The folded base rounds other numbers than Keras (its weights are w * gamma / sigma),
            # so its largest error over a few values is a noisy multiple of Keras' (measured up to
            # 4.3x on the logits under oneDNN limited to SSE4.1) while its rms stays steady: these
            # two rows judge the rms; the layer-by-layer row above, the largest error.
            rows.append(measured(group, f"{where} float32: base output (folded, as trained)",
                                 bands.against_exact(k64[out], k32[out], tout, norm="rms"),
                                 keras=summary(k32[out]), torch=summary(tout), note="rms"))
            rows.append(measured(group, f"{where} float32: logits (the module's head, eval)",
                                 bands.against_exact(keras_side.logits64, keras_side.logits,
                                                     tlogits, norm="rms"),
                                 keras=summary(keras_side.logits), torch=summary(tlogits),
                                 note="rms"))
            if float64 and size == sizes[0]:
                t64 = pairs.torch_layer_outputs(pairs.torch_base(path, size, float64=True), x64)
                rows += _layer_rows(group, f"{where} float64", k64, t64, FLOAT64_TOL)
    return rows


def _layer_rows(group: str, label: str, kouts: dict, touts: dict, tol: float) -> list[Row]:
    worst_name, worst = None, -1.0
    missing = [name for name in kouts if name not in touts]
    for name, k in kouts.items():
        if name in missing:
            continue
        diff = bands.max_error(k, touts[name])
        if diff > worst:
            worst_name, worst = name, diff
    return [Row(group, f"{label}: all {len(kouts)} layers", f"worst {worst_name}", "", worst,
                f"{tol:g}", bool(not missing and worst <= tol),
                note=f"missing in torch: {missing[:3]}" if missing else "")]


@functools.cache
def _head_weights(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A Keras Dense(1) initialisation (kernel (1280, 1), bias (1,)), float32."""
    init = keras.initializers.GlorotUniform(seed=seed)
    return keras.ops.convert_to_numpy(init((1280, 1))), np.zeros(1, np.float32)


@dataclass(frozen=True)
class KerasNumerics:
    """The Keras side of one numeric comparison: inputs, every layer's output in float32 and in
    float64 (the exact answer), and the recipe's head on the base's output in both."""

    x: np.ndarray
    k32: dict[str, np.ndarray]
    k64: dict[str, np.ndarray]
    logits: np.ndarray
    logits64: np.ndarray
    min_std: float


@functools.cache
def _keras_numerics(path: str, size: int) -> KerasNumerics:
    """Computed once per weights file and size in a test run: nothing on the Keras side depends
    on the port, so the checks (and the planted mistakes) share it."""
    x = pairs.preprocess(pairs.demo_images(size, NUMERIC_IMAGES))
    x64 = x.astype(np.float64)
    kbase = pairs.keras_base(path, size)
    kbase64 = pairs.keras_base(path, size, float64=True)
    k32 = pairs.keras_layer_outputs(kbase, x)
    k64 = pairs.keras_layer_outputs(kbase64, x64)
    return KerasNumerics(x=x, k32=k32, k64=k64, logits=_keras_logits(kbase, x),
                         logits64=_keras_logits(kbase64, x64),
                         min_std=min(float(np.std(v)) for v in k32.values()))


def _keras_logits(kbase, x: np.ndarray) -> np.ndarray:
    """The recipe's head (pooling, Dense(1) with :func:`_head_weights`) on Keras' base, in the
    input's precision."""
    dtype = "float64" if x.dtype == np.float64 else "float32"
    kernel, bias = (w.astype(dtype) for w in _head_weights())
    dense = keras.layers.Dense(1, dtype=dtype)
    kfeat = keras.layers.GlobalAveragePooling2D(dtype=dtype)(kbase(x, training=False))
    dense.build(kfeat.shape)
    dense.set_weights([kernel, bias])
    return keras.ops.convert_to_numpy(dense(kfeat))[:, 0]


def _torch_module_outputs(tbase, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The base's output (NHWC) and the logits as training and prediction compute them: through
    :class:`TransferModule` in eval mode, its folded base (tl_torch.fast), its own pooling,
    dropout and head, with the head set to :func:`_head_weights`. ``images``: [0, 255]."""
    kernel, bias = _head_weights()
    module = TransferModule(tbase, seed=0).eval()
    with torch.no_grad():
        module.classifier.weight.copy_(torch.from_numpy(kernel.T))
        module.classifier.bias.copy_(torch.from_numpy(bias))
        x = pairs.nchw(images).contiguous(memory_format=torch.channels_last)
        out = module.folded_base(module.base.preprocess(x))
        return pairs.nhwc(out), module(pairs.nchw(images)).numpy()


def check_degenerate_weights_are_detected(size: int = 96) -> list[Row]:
    """Keras' own random init gives vanishing features; the floor above must catch it."""
    group = "4 numerics"
    x = pairs.preprocess(pairs.demo_images(size, 4))
    kstd = float(np.std(keras.ops.convert_to_numpy(kmodel.build_base("none", size)(x, training=False))))
    with torch.no_grad():
        tstd = float(pairs.torch_base("none", size)(pairs.nchw(x)).std())
    return [verdict(group, "random init, BN at mean 0 / var 1: features vanish (not compared on)",
                    f"std {kstd:.2g}", f"std {tstd:.2g}",
                    kstd < ACTIVATION_FLOOR and tstd < ACTIVATION_FLOOR,
                    tolerance=f"< {ACTIVATION_FLOOR:g}")]


# ---- 10 head ---------------------------------------------------------------------------------

def check_head() -> list[Row]:
    group = "10 head"
    bound = float(np.sqrt(6.0 / (1280 + 1)))
    kbase, tbase = kmodel.build_base("none", 96), pairs.torch_base("none", 96)
    kweights, tweights = [], []
    for seed in range(20):  # 20 inits of each: 25,600 weights for the distribution tests
        kernel, kbias = kmodel.build_model(kbase, seed=seed).get_layer("dense").get_weights()
        kweights.append(kernel.ravel())
        module = TransferModule(tbase, seed=seed, fast=False)
        tweights.append(module.classifier.weight.detach().numpy().ravel())
        tbias = module.classifier.bias.detach().numpy()
    kw, tw = np.concatenate(kweights), np.concatenate(tweights)
    kp = stats.kstest(kw, stats.uniform(-bound, 2 * bound).cdf).pvalue
    tp = stats.kstest(tw, stats.uniform(-bound, 2 * bound).cdf).pvalue
    two = stats.ks_2samp(kw, tw).pvalue
    return [
        verdict(group, f"kernel max |w| within the Glorot bound {bound:.4f}",
                f"{np.abs(kw).max():.4f}", f"{np.abs(tw).max():.4f}",
                np.abs(kw).max() <= bound and np.abs(tw).max() <= bound, tolerance="<= bound"),
        verdict(group, "kernel ~ U(-bound, bound): KS p-value (20 inits)", f"p={kp:.3g}",
                f"p={tp:.3g}", kp > KS_P_MIN and tp > KS_P_MIN, tolerance=f"p > {KS_P_MIN:g}"),
        verdict(group, "Keras and torch kernels from one distribution: KS p-value", "",
                f"p={two:.3g}", two > KS_P_MIN, tolerance=f"p > {KS_P_MIN:g}"),
        verdict(group, "bias zeros", str(kbias.tolist()), str(tbias.tolist()),
                not kbias.any() and not tbias.any(), tolerance="exact"),
    ]
