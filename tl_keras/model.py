"""The Keras reference model: the MobileNetV2 base and its weights, the recipe's head, freezing.

``build_base`` makes ``keras.applications.MobileNetV2(include_top=False)`` and fills it from
ImageNet (Keras' own download), the offline demo file, or any Keras weights or model file;
``build_model`` puts the recipe's augmentation, preprocessing and one-logit head around it (or a
head of N logits for N > 2 classes);
``set_phase`` freezes it for feature extraction or fine-tuning; ``compile_for`` picks each phase's
optimizer. Used by ``python -m tl_keras.train``; the PyTorch port mirrors it in tl_torch/model.py.
"""

from __future__ import annotations

import socket
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import keras
import numpy as np
from keras import layers
from keras.src.utils.naming import to_snake_case

from tl_common import keras_files, recipe
from tl_common.bases import DEFAULT_BASE, base_facts
from tl_common.download import DOWNLOAD_TIMEOUT_S, IMAGENET_WAY_OUT
from tl_common.errors import UserError
from tl_common.head import head_units
from tl_common.mobilenet_v2 import KERAS_BASE_LAYERS
from tl_common.outputs import PHASES
from tl_common.weights import weights_file
from tl_keras.bases import facts_of, keras_application, preprocess_input

#: The recipe's fine_tune_at layer, a check that Keras still builds the base the recipe knows.
RECIPE_FINE_TUNE_AT = recipe.FINE_TUNE_AT
RECIPE_FINE_TUNE_LAYER = recipe.FINE_TUNE_LAYER

#: What a weights or model file must hold to fill the base.
EXPECTED_BASE = "a MobileNetV2 with alpha=1.0 and include_top=False (any input size)"

Shapes = list[tuple[int, ...]]


def expected_base(base: keras.Model) -> str:
    """What a weights or model file must hold to fill ``base``, for messages."""
    app = facts_of(base).keras_application
    return EXPECTED_BASE if app == "MobileNetV2" else f"a {app} with include_top=False"


# ---- the base --------------------------------------------------------------------------------

def keras_mobilenet_v2(image_size: int, weights: str | None, alpha: float = 1.0) -> keras.Model:
    """``keras.applications.MobileNetV2(include_top=False)`` as the recipe builds it, weights as
    Keras loads them (``"imagenet"`` or None)."""
    s = image_size
    return keras.applications.MobileNetV2(
        input_shape=(s, s, 3), alpha=alpha, include_top=False, weights=weights,
        # Named, because Keras numbers unnamed inputs per session (input_layer_1, _2 ...) and the
        # layer list must not depend on how many models were built before.
        input_tensor=keras.Input((s, s, 3), name="input_layer"))


def build_base(weights: str | Path | None = "imagenet", image_size: int = 160,
               base: str = DEFAULT_BASE) -> keras.Model:
    """``MobileNetV2(include_top=False, alpha=1.0)`` for ``image_size`` inputs, 154 layers; or
    the application ``base`` names (:mod:`tl_keras.bases`), with the same ``weights``, except
    ``demo`` (a MobileNetV2 file).

    ``weights``: ``"imagenet"`` (Keras downloads them; sizes other than 96/128/160/192/224 get the
    224 file, as in Keras), ``"demo"`` (the offline demo's pretrained file, made for 160 but valid
    at any size: every layer is a convolution), ``"none"``/``None`` (random init), or a path to a
    Keras weights file of the base or a whole model file that contains one.
    """
    if base != DEFAULT_BASE:
        return _other_base(base, weights, image_size)
    model = _imagenet_base(image_size) if weights == "imagenet" else keras_mobilenet_v2(image_size, None)
    if len(model.layers) != KERAS_BASE_LAYERS or \
            model.layers[RECIPE_FINE_TUNE_AT].name != RECIPE_FINE_TUNE_LAYER:
        raise RuntimeError(f"this Keras builds a MobileNetV2 of {len(model.layers)} layers with "
                           f"{model.layers[RECIPE_FINE_TUNE_AT].name!r} at {RECIPE_FINE_TUNE_AT}; "
                           f"the recipe's layer indices need {KERAS_BASE_LAYERS} and "
                           f"{RECIPE_FINE_TUNE_LAYER!r}")
    if weights not in (None, "none", "imagenet"):
        load_weights_file(model, weights_file(weights, image_size))
    return model


def _other_base(name: str, weights: str | Path | None, image_size: int) -> keras.Model:
    """A base other than the recipe's, checked against the layer count its facts give."""
    facts = base_facts(name)
    source = "none" if weights is None else str(weights)
    if source == "demo":
        raise UserError(f"demo weights are a MobileNetV2's: --base={name} takes imagenet, none "
                        "or a Keras weights file of the base")
    base = (_imagenet_base(image_size, name) if source == "imagenet"
            else keras_application(name, image_size, None))
    if len(base.layers) != facts.layer_count(source):
        raise RuntimeError(f"this Keras builds a {facts.keras_application} of {len(base.layers)} "
                           f"layers; the layer indices here need {facts.layer_count(source)}")
    if source not in ("none", "imagenet"):
        load_weights_file(base, weights_file(weights, image_size, name))
    return base


def _imagenet_base(image_size: int, name: str = DEFAULT_BASE) -> keras.Model:
    facts = base_facts(name)
    url = facts.imagenet_url + facts.imagenet_weights_name(image_size)
    # Keras downloads with urlretrieve, which has no timeout: on a network that drops packets
    # it would hang instead of failing.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        if name == DEFAULT_BASE:
            return keras_mobilenet_v2(image_size, "imagenet")
        return keras_application(name, image_size, "imagenet")
    except Exception as err:  # keras.utils.get_file raises a bare Exception
        if "URL fetch failure" not in str(err):
            raise
        reason = str(err).rsplit(" -- ", 1)[-1]
        raise UserError(f"could not download the ImageNet weights from {url} ({reason}); "
                        f"{IMAGENET_WAY_OUT}") from None
    finally:
        socket.setdefaulttimeout(previous)


# ---- loading a weights or model file ---------------------------------------------------------

def load_weights_file(base: keras.Model, path: Path) -> None:
    """Fill ``base`` from a Keras file, checking every layer's weight shapes first.

    A weights file of the base itself (legacy ``.h5``, Keras 3 ``.weights.h5``) is loaded by
    ``base.load_weights``. A whole model (``.keras``, ``.h5`` with a ``model_config``) is loaded
    by Keras and the base is found in it by its layers, not its name: a model, or a model nested
    at any depth, whose first 154 layers have the base's types and names; its weights are copied
    layer by layer and any layers after those (a classifier head) are ignored.
    """
    kind = _file_kind(path)
    if kind == "model":
        _copy_from_model(base, path)
        return
    with keras_files.open_keras_file(path) as kfile:
        top = kfile.top
        if kind == "legacy_weights":  # loaded by order, layer by layer, weightless layers skipped
            _check_shapes(path, _shapes(layer for layer in base.layers if layer.weights),
                          [(name, top.shapes(name)) for name in top.layers], expected_base(base))
        else:
            _check_shapes(path, _shapes(base.layers), _weights_h5_shapes(top, base),
                          expected_base(base))
    base.load_weights(path)


def _file_kind(path: Path) -> str:
    """``model``, ``legacy_weights`` or ``weights`` (Keras 3): read from the content
    (:func:`tl_common.keras_files.file_kind`), and the name Keras needs for that kind."""
    if not path.is_file():
        raise UserError(f"--weights={str(path)!r}: no such file; expected imagenet, demo, none, or "
                        "a Keras .h5, .weights.h5 or .keras file")
    kind = keras_files.file_kind(path)
    endings = {"model": (".keras",) if zipfile.is_zipfile(path) else (".h5", ".hdf5"),
               "legacy_weights": (".h5", ".hdf5"), "weights": (".weights.h5",)}[kind]
    # Keras chooses its reader by the file's name, not its content.
    if not path.name.endswith(endings) or (kind == "legacy_weights"
                                           and path.name.endswith(".weights.h5")):
        raise UserError(f"{path} holds a Keras {kind.replace('_', ' ')} file, which Keras reads "
                        f"only under a name ending in {endings[0]}: rename it")
    return kind


def _shapes(layer_list: Iterable[keras.Layer]) -> list[tuple[str, Shapes]]:
    return [(layer.name, [tuple(w.shape) for w in layer.weights]) for layer in layer_list]


def _weights_h5_shapes(top: keras_files.Container, base: keras.Model
                       ) -> list[tuple[str, Shapes]]:
    """(layer name, weight shapes) per base layer, then the file's layers the base lacks.

    Keras 3 keys a model's layers by class and rank (``conv2d``, ``conv2d_1`` ...), not by name;
    follow the same rule over the base's layers.
    """
    names = top.keys  # group key -> the name of the layer stored under it
    ranks: dict[str, int] = {}
    found, used = [], set()
    for layer in base.layers:
        kind = to_snake_case(type(layer).__name__)
        ranks[kind] = ranks.get(kind, -1) + 1
        key = kind if ranks[kind] == 0 else f"{kind}_{ranks[kind]}"
        used.add(key)
        found.append((layer.name, top.shapes(names[key]) if key in names else []))
    found += [(key, top.shapes(name)) for key, name in names.items() if key not in used]
    return found


def _check_shapes(path: Path, expected: list[tuple[str, Shapes]],
                  found: list[tuple[str, Shapes]], what: str = EXPECTED_BASE) -> None:
    """Name the first layer whose weights do not fit, before Keras assigns anything."""
    for (name, want), (_, got) in zip(expected, found, strict=False):
        if got != want:
            held = f"weights of shape {got}" if got else "no weights"
            raise UserError(f"{path} does not fit the base: it has {held} for layer {name!r}, "
                            f"the base needs {want}; expected {what}")
    if len(found) > len(expected):
        raise UserError(f"{path} has weights for layers the base lacks, from "
                        f"{found[len(expected)][0]!r} on (include_top=True?); "
                        f"expected {what}")
    if len(found) < len(expected):
        raise UserError(f"{path} has no weights for layer {expected[len(found)][0]!r} and the "
                        f"layers after it; expected {what}")


def _signature(layer_list: Sequence[keras.Layer]) -> list[tuple[str, str]]:
    # The InputLayer's name depends on how the model was built; every other name is Keras'.
    return [(type(layer).__name__, "" if isinstance(layer, layers.InputLayer) else layer.name)
            for layer in layer_list]


def _find_base_layers(model: keras.Model, reference: list[tuple[str, str]]) -> list | None:
    """The first 154 layers of the model, or of a model nested in it, that match the base's."""
    if _signature(model.layers[:len(reference)]) == reference:
        return model.layers[:len(reference)]
    for layer in model.layers:
        inner = layer.model if isinstance(layer, InferenceMode) else layer
        if isinstance(inner, keras.Model):
            found = _find_base_layers(inner, reference)
            if found is not None:
                return found
    return None


def _copy_from_model(base: keras.Model, path: Path) -> None:
    try:
        # safe_mode: a Lambda layer in a file from elsewhere would run its code when loaded.
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras raises ValueError, TypeError, OSError ... on a bad file
        message = " ".join(str(err).split())[:300]
        raise UserError(f"Keras could not load the model in {path}: {message}") from None
    found = _find_base_layers(model, _signature(base.layers))
    if found is None:
        first, second, last = (base.layers[i].name for i in (1, 2, -1))
        raise UserError(f"{path} holds a Keras model without a {facts_of(base).keras_application} "
                        f"base in it: expected a model or nested model whose layers are those "
                        f"of {expected_base(base)} (InputLayer, {first}, {second}, ... {last})")
    _check_shapes(path, _shapes(base.layers), _shapes(found), expected_base(base))
    for target, source in zip(base.layers, found, strict=True):
        target.set_weights(source.get_weights())


# ---- the model around it ---------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="tl_keras")
class InferenceMode(keras.layers.Layer):
    """Calls a model with ``training=False`` always: the recipe's ``base(x, training=False)``.

    In a Keras 3 functional model that call does not hold: during ``fit`` the outer model's
    ``training=True`` replaces the ``training=False`` recorded for the nested call
    (``keras.src.models.functional.operation_fn``; keras-team/keras#20285), so once the base is
    unfrozen its trainable BatchNormalization layers normalise with batch statistics and update
    their moving statistics, which the recipe says they must not. Inside a layer's ``call`` an
    explicit ``training=False`` is kept: BatchNorm stays in inference mode in both phases, and
    the unfrozen gamma/beta still train.
    """

    def __init__(self, model: keras.Model, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs):
        return self.model(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.model.compute_output_shape(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "model": keras.saving.serialize_keras_object(self.model)}

    @classmethod
    def from_config(cls, config: dict) -> InferenceMode:
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def data_augmentation(seed: int) -> keras.Sequential:
    """Flip left-right with probability 1/2, then rotate by up to ±0.2 turns (reflect fill)."""
    return keras.Sequential([
        layers.RandomFlip(recipe.FLIP_MODE, seed=seed + recipe.FLIP_SEED_OFFSET),
        # Another seed: the same one would tie each image's rotation to its flip.
        layers.RandomRotation(recipe.ROTATION_FACTOR, fill_mode=recipe.ROTATION_FILL_MODE,
                              seed=seed + recipe.ROTATION_SEED_OFFSET),
    ], name="data_augmentation")


def build_model(base: keras.Model, *, dropout: float = recipe.DROPOUT, seed: int,
                augment: bool = True, num_classes: int = 2) -> keras.Model:
    """augmentation → ``x / 127.5 − 1`` (the base's ``preprocess_input``) → base (inference
    mode) → pooling → dropout → logits.

    Two classes: one logit, positive for class 1 (dogs), as in the recipe; N > 2 classes:
    ``Dense(N)``, one logit per class. ``base`` is called with ``training=False`` in both
    phases (through :class:`InferenceMode`: Keras 3 would override a plain nested call), so its
    BatchNormalization layers always normalise with their moving statistics.
    ``augment=False`` leaves the augmentation out (comparisons of training trajectories).
    """
    size = base.input_shape[1]
    inputs = keras.Input((size, size, 3))
    x = data_augmentation(seed)(inputs) if augment else inputs
    x = preprocess_input(base, x)   # MobileNetV2's: x / 127.5 - 1 (tl_keras.bases)
    x = InferenceMode(base, name="base_inference_mode")(x)          # (N, s/32, s/32, C)
    x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)   # (N, C)
    x = layers.Dropout(dropout, seed=seed + recipe.DROPOUT_SEED_OFFSET, name="dropout")(x)
    outputs = layers.Dense(head_units(num_classes),
                           kernel_initializer=keras.initializers.GlorotUniform(
                               seed=seed + recipe.HEAD_INIT_SEED_OFFSET),
                           name="dense")(x)                         # (N, 1) or (N, classes)
    return keras.Model(inputs, outputs)


# ---- phases ----------------------------------------------------------------------------------

def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")


def set_phase(base: keras.Model, phase: str, fine_tune_at: int = RECIPE_FINE_TUNE_AT) -> None:
    """Freeze the whole base (feature extraction), or its layers before ``fine_tune_at``."""
    _check_phase(phase)
    if phase == "feature_extraction":
        base.trainable = False
    else:
        base.trainable = True
        # The recipe only freezes layers[:fine_tune_at]; every layer is set here because with the
        # TF backend `x.trainable = True` is a no-op when x is already trainable (Keras'
        # KerasAutoTrackable skips `self.a = value` when `self.a is value`), so the line above
        # would not unfreeze what an earlier fine_tune_at froze.
        for index, layer in enumerate(base.layers):
            layer.trainable = index >= fine_tune_at


def compile_for(model: keras.Model, phase: str, learning_rate: float) -> None:
    """Adam for feature extraction, RMSprop for fine-tuning. One logit: binary cross-entropy
    and accuracy of ``logit > 0``; N logits: sparse categorical cross-entropy and accuracy of
    the largest logit."""
    _check_phase(phase)
    optimizer = (keras.optimizers.Adam if phase == "feature_extraction"
                 else keras.optimizers.RMSprop)(learning_rate=learning_rate)
    if model.output_shape[-1] == 1:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        # The recipe's metrics=["accuracy"] would threshold the logit at 0.5.
        accuracy = keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, non-trainable) numbers of weights; BatchNorm moving statistics are non-trainable."""
    def size(weights: list) -> int:
        return sum(int(np.prod(w.shape)) for w in weights)

    return size(model.trainable_weights), size(model.non_trainable_weights)


def layer_table(base: keras.Model) -> list[tuple[int, str, str, bool]]:
    """(index, layer type, name, trainable) for every layer of the base, as the recipe lists them."""
    return [(i, type(layer).__name__, layer.name, bool(layer.trainable))
            for i, layer in enumerate(base.layers)]
