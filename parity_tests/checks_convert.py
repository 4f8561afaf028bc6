"""Check 13: whole models across the border (``python -m tl_torch.convert``).

- from-keras, the reference's own model (``tl_keras.model.build_model``: augmentation,
  ``x / 127.5 - 1``, the base in its InferenceMode wrapper, GAP, Dropout, Dense(1)) and someone
  else's (``keras.applications.MobileNetV2`` nested in a model with ``Rescaling``, its own
  Dropout and a softmax ``Dense(3)``): the port's probabilities on the same images against the
  Keras model's in float64 (the same model built under a float64 dtype policy), within
  :data:`tl_common.bands.RATIO` times Keras' own float32 error plus
  :data:`tl_common.bands.FLOOR_ULPS` ulps; the same class names predicted;
- to-keras: the file ``keras.models.load_model`` opens (no layer of this project in it), its
  base's layers those of the reference, its probabilities against the port's in float64;
- to-onnx: onnxruntime's probabilities against the port's in float64;
- a round trip port -> Keras file -> port gives back every tensor bit for bit.

Both Keras models hold the demo weights' base (activations of order 1) and heads with
non-zero biases, scaled so that probabilities spread over (0, 1).
"""

from __future__ import annotations

import functools
import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import torch

from parity_tests import pairs
from parity_tests.rows import Row, equal, verdict
from tl_common import bands
from tl_common.bases import BASES, DEFAULT_BASE
from tl_common.keras_config import float64_config, inspect_keras_model
from tl_common.outputs import SCHEMA_VERSION
from tl_keras import model as kmodel
from tl_keras.export_config import with_imagenet_rescaling
from tl_torch import conversion_parity as cp
from tl_torch import keras_export, keras_interchange, onnx_export
from tl_torch.module import TransferModule

GROUP = "13 whole models across frameworks"
SIZE = 96
RECIPE_CLASSES = ("cats", "dogs")
OTHER_CLASSES = ("beagle", "husky", "poodle")
#: The heads' kernels are Glorot-uniform; scaled by this, the logits of the demo images differ
#: by a few units, so that their probabilities spread over (0, 1) and a wrong head shows.
HEAD_SCALE = 5.0


def keras_float64(model: keras.Model) -> keras.Model:
    """The same model and weights under a float64 dtype policy: the exact answer."""
    config = keras.saving.serialize_keras_object(model)
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model64 = keras.saving.deserialize_keras_object(float64_config(config))
    finally:
        keras.config.set_dtype_policy(policy)
        keras.config.set_floatx(floatx)
    model64.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return model64


def _head(model: keras.Model, name: str, seed: int, size: int = SIZE) -> None:
    """A Glorot-uniform kernel scaled by HEAD_SCALE, and a bias that centres its logits on the
    demo images, plus noise: probabilities spread over (0, 1), none saturated at 0 or 1, and a
    dropped bias shows."""
    dense = model.get_layer(name)
    kernel, _ = dense.get_weights()
    # Glorot-uniform like the layer's own init, from a seeded generator: the same heads, and so
    # the same margins, in every run.
    rng = np.random.default_rng(seed)
    bound = np.sqrt(6.0 / sum(kernel.shape))
    kernel = (rng.uniform(-bound, bound, kernel.shape) * HEAD_SCALE).astype(np.float32)
    features = keras.Model(model.inputs, dense.input)(pairs.demo_images(size), training=False)
    logits = keras.ops.convert_to_numpy(features) @ kernel
    bias = -logits.mean(axis=0) + rng.normal(0.0, 0.5, kernel.shape[1])
    dense.set_weights([kernel, bias.astype(np.float32)])


@functools.cache
def recipe_model(directory: Path) -> Path:
    """The reference's model as ``tl_keras.train`` saves it, with a metrics.json beside it that
    names the classes (as a tl_keras run folder has)."""
    from tl_keras.train import save_model

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.keras"
    base = kmodel.build_base("demo", SIZE)
    model = kmodel.build_model(base, seed=0)
    _head(model, "dense", 0)
    kmodel.set_phase(base, "fine_tuning")
    save_model(model, path)
    (directory / "metrics.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "data": {"class_names": list(RECIPE_CLASSES)}}))
    return path


@functools.cache
def other_model(directory: Path) -> Path:
    """Someone else's classifier: a plain ``keras.applications.MobileNetV2`` (the demo weights
    copied in) nested in their own model, ``Rescaling`` for the scaling, Dropout(0.3) and a
    softmax Dense(3); saved with Keras 3 as ``.keras``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "other.keras"
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False,
                                          weights=None)
    base.set_weights(kmodel.build_base("demo", SIZE).get_weights())
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(len(OTHER_CLASSES), activation="softmax", name="breeds")(x)
    model = keras.Model(inputs, outputs)
    _head(model, "breeds", 1)
    model.save(path)
    return path


def _images(size: int = SIZE) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pairs.demo_images(size))).permute(0, 3, 1, 2)


def _port(module: TransferModule, images: torch.Tensor, float64: bool = False) -> np.ndarray:
    """The port's probabilities: float32 as tl_torch.predict runs it, or float64 (unfolded)."""
    module = cp.unfolded_copy(module).double() if float64 else module.eval()
    with torch.no_grad():
        return cp.probabilities(module(images.to(torch.float64 if float64 else
                                                      torch.float32)).numpy())


def _band_row(check: str, parity: cp.Parity, note: str = "") -> Row:
    return Row(GROUP, check, f"own error {parity.source_error:.3g}",
               f"error {parity.result_error:.3g}", parity.result_error,
               f"band {bands.RATIO:g}x + {bands.FLOOR_ULPS:g} ulps = {parity.band:.3g}",
               bool(parity.result_error <= parity.band), note)


@functools.cache
def _keras_outputs(path: Path, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The Keras model's outputs on the demo images, float32 and float64: once per file in a
    run (nothing here depends on the port, so the planted mistakes share them)."""
    model = keras.models.load_model(path, compile=False)
    x = pairs.nhwc(_images(size))
    return (keras.ops.convert_to_numpy(model(x, training=False)),
            keras.ops.convert_to_numpy(keras_float64(model)(x.astype(np.float64),
                                                            training=False)))


def _from_keras(path: Path, label: str, class_names: tuple[str, ...],
                given: list[str] | None, size: int = SIZE) -> tuple[list[Row], TransferModule]:
    found = inspect_keras_model(path)
    module, _ = keras_interchange.module_from_keras(path, class_names=given)
    images = _images(size)
    x = pairs.nhwc(images)
    outputs32, outputs64 = _keras_outputs(path, size)
    source32 = cp.probabilities(outputs32, found.activation)
    exact = cp.probabilities(outputs64, found.activation)
    result32 = _port(module, images)
    parity = cp.compare("from-keras", str(path), "port", source32, result32, exact)
    keras_names = [class_names[i] for i in cp.predicted_classes(source32)]
    port_names = [module.hparams.class_names[i] for i in cp.predicted_classes(result32)]
    rows = [
        equal(GROUP, f"from-keras, {label}: classes, image size",
              (len(class_names), size), (module.hparams.num_classes, module.hparams.image_size)),
        _band_row(f"from-keras, {label}: probabilities against Keras in float64", parity,
                  note=f"{len(x)} demo images, max |keras - port| "
                       f"{parity.max_abs_probability_difference:.3g}"),
        equal(GROUP, f"from-keras, {label}: class names predicted", str(keras_names),
              str(port_names)),
    ]
    return rows, module


def _to_keras(module: TransferModule, directory: Path, base_name: str = DEFAULT_BASE,
              size: int = SIZE) -> list[Row]:
    label = "to-keras" if base_name == DEFAULT_BASE else f"to-keras, {base_name}"
    path = keras_export.write_keras_model(module, size, directory / "exported.keras")
    with zipfile.ZipFile(path) as zf:
        config_text = zf.read("config.json").decode()
    model = keras.models.load_model(path, compile=False)
    # The nested base: the model's one Functional (the augmentation is a Sequential).
    base = next(layer for layer in model.layers
                if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential))
    reference = kmodel.build_base("none", size, base=base_name)
    if getattr(module.base, "imagenet_rescaling", False):
        reference = with_imagenet_rescaling(reference)
    images = _images(size)
    source32, exact = _port(module, images), _port(module, images, float64=True)
    result32 = cp.probabilities(keras.ops.convert_to_numpy(
        model(pairs.nhwc(images), training=False)))
    parity = cp.compare("to-keras", "port", str(path), source32, result32, exact,
                             variants=cp.port_variants(module, images))
    back, _ = keras_interchange.module_from_keras(path, class_names=list(module.hparams.class_names))
    same = {k: torch.equal(v, back.state_dict()[k]) for k, v in module.state_dict().items()}
    return [
        verdict(GROUP, f"{label}: keras.models.load_model opens it; no layer of this project",
                "tl_keras-free", "tl_keras" not in config_text and "tl_torch" not in config_text,
                "tl_keras" not in config_text and "tl_torch" not in config_text,
                tolerance="exact"),
        equal(GROUP, f"{label}: the base's {len(reference.layers)} layers (type, name)",
              str([(type(x).__name__, x.name) for x in reference.layers[1:]]),
              str([(type(x).__name__, x.name) for x in base.layers[1:]])),
        _band_row(f"{label}: Keras' probabilities against the port's in float64", parity),
        equal(GROUP, f"{label}: class predicted", str(cp.predicted_classes(source32)),
              str(cp.predicted_classes(result32))),
        verdict(GROUP, f"{label}: port -> Keras file -> port, every tensor bit for bit"
                if base_name != DEFAULT_BASE else
                "port -> Keras file -> port: every tensor bit for bit",
                f"{len(same)} tensors", f"{sum(same.values())} equal", all(same.values()),
                tolerance="exact"),
    ]


def _to_onnx(module: TransferModule, directory: Path, base_name: str = DEFAULT_BASE,
             size: int = SIZE) -> list[Row]:
    label = "to-onnx" if base_name == DEFAULT_BASE else f"to-onnx, {base_name}"
    path = onnx_export.write_onnx(module, size, directory / "exported.onnx")
    parity = onnx_export.check_onnx(module.eval(), path, _images(size))
    if parity.passed is None:
        return [verdict(GROUP, f"{label}: onnxruntime", "-", "not installed", False)]
    return [_band_row(f"{label} (opset {onnx_export.ONNX_OPSET}): onnxruntime's probabilities "
                      "against the port's in float64", parity)]


def check_convert(directory: Path, parts: tuple[str, ...] = ("recipe", "other", "to-keras",
                                                             "to-onnx")) -> list[Row]:
    """Rows of check 13; ``parts`` picks some (the planted-mistake tests run one or two)."""
    directory = Path(directory)
    rows: list[Row] = []
    if "recipe" in parts:
        rows += _from_keras(recipe_model(directory / "recipe"), "the reference's model",
                            RECIPE_CLASSES, None)[0]
    if {"other", "to-keras", "to-onnx"} & set(parts):
        other_rows, module = _from_keras(other_model(directory / "other"),
                                         "someone else's 3 classes", OTHER_CLASSES,
                                         list(OTHER_CLASSES))
        rows += other_rows if "other" in parts else []
        if "to-keras" in parts:
            rows += _to_keras(module, directory)
        if "to-onnx" in parts:
            rows += _to_onnx(module, directory)
    return rows


# ---- the other bases ------------------------------------------------------------------------------

#: The other bases' models: small (float64 runs of three networks), every stride-2 input even.
BASE_SIZE = 64


def _calibrated_keras_base(name: str, seed: int) -> keras.Model:
    """``keras.applications.<App>(weights=None)`` with random gamma/beta and every BatchNorm's
    moving statistics set, in Keras, to its input's batch statistics on the demo images (one
    pass in training mode with momentum 0): activations of order 1 at every layer."""
    keras.utils.set_random_seed(seed)
    base = kmodel.build_base("none", BASE_SIZE, base=name)
    rng = np.random.default_rng(seed)
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in bns]
    for layer in bns:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                           rng.uniform(-0.3, 0.3, beta.shape).astype(np.float32), mean, var])
        layer.momentum = 0.0
    x = kmodel.preprocess_input(base, keras.ops.convert_to_tensor(pairs.demo_images(BASE_SIZE)))
    base(x, training=True)  # moving stats := this batch's
    for layer, momentum in zip(bns, momenta, strict=True):
        layer.momentum = momentum
    return base


@functools.cache
def base_model(name: str, directory: Path) -> Path:
    """The reference's model around ``name`` as ``tl_keras.train --base`` saves it for three
    classes (augmentation, preprocess_input, the base in its InferenceMode wrapper, GAP, Dropout,
    Dense(3): a kernel whose transpose differs from its reshape), the base's weights calibrated,
    a metrics.json beside it naming the classes."""
    from tl_keras.train import save_model

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.keras"
    base = _calibrated_keras_base(name, seed=len(name))
    model = kmodel.build_model(base, seed=0, num_classes=len(OTHER_CLASSES))
    _head(model, "dense", 0, BASE_SIZE)
    kmodel.set_phase(base, "fine_tuning", BASES[name].fine_tune_at)
    save_model(model, path)
    (directory / "metrics.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "data": {"class_names": list(OTHER_CLASSES)}}))
    return path


def check_base_conversions(name: str, directory: Path,
                           parts: tuple[str, ...] = ("from-keras", "to-onnx", "to-keras")
                           ) -> list[Row]:
    """Rows of check 13 for another base (``--base name``): from-keras of the reference's model
    around it, then to-onnx and to-keras of the converted run; ``parts`` picks some."""
    directory = Path(directory) / name
    path = base_model(name, directory / "keras")
    rows, module = _from_keras(path, f"{name}", OTHER_CLASSES, None, BASE_SIZE)
    found = inspect_keras_model(path)
    rows.insert(0, equal(GROUP, f"from-keras, {name}: the base found, its features' width",
                         (name, BASES[name].features),
                         (found.base, module.classifier.in_features)))
    rows = rows if "from-keras" in parts else []
    if "to-onnx" in parts:
        rows += _to_onnx(module, directory, name, BASE_SIZE)
    if "to-keras" in parts:
        rows += _to_keras(module, directory, name, BASE_SIZE)
    return rows
