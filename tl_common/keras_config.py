"""Keras model configurations as JSON, framework-free: reading the recipe's classifier out of a
whole Keras model's ``config.json`` (or a ``.h5``'s ``model_config``), and the pieces that write
one (layers, their inbound tensors, the reference's classifier around a base).

Used by ``tl_torch.convert`` (from-keras reads, to-keras writes) and by ``tl_keras.runner``.
No TensorFlow, no torch: json, zipfile, h5py and numpy only.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tl_common.errors import UserError
from tl_common.mobilenet_v2 import LAST_FILTERS
from tl_common.recipe import PIXEL_OFFSET, PIXEL_SCALE

#: What from-keras accepts after the base, in the recipe's words.
RECIPE_HEAD = "GlobalAveragePooling2D -> [Dropout] -> Dense(1 or N)"
HEAD_ACTIVATIONS = ("linear", "sigmoid", "softmax")
MODEL_CLASSES = ("Functional", "Model", "Sequential")


def read_model_config(path: Path) -> dict[str, Any]:
    """The model's Keras configuration: ``config.json`` of a ``.keras`` zip, or the
    ``model_config`` attribute of a whole-model ``.h5``."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: expected a Keras model file (.keras or .h5)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if "config.json" not in zf.namelist():
                raise UserError(f"{path} is a zip without config.json: expected a .keras model")
            return json.loads(zf.read("config.json"))
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config")
        if config is None:
            raise UserError(f"{path} holds weights only (no model_config): expected a whole "
                            "Keras model (.keras, or .h5 written by model.save)")
        return json.loads(config.decode() if isinstance(config, bytes) else config)
    raise UserError(f"{path} is neither a .keras zip nor an HDF5 file: expected a Keras model")


def float64_config(value: Any) -> Any:
    """A configuration with every float32 dtype and dtype policy made float64 (the same model,
    the exact answer)."""
    if isinstance(value, dict):
        return {k: float64_config(v) for k, v in value.items()}
    if isinstance(value, list):
        return [float64_config(v) for v in value]
    return "float64" if value == "float32" else value


# ---- reading ---------------------------------------------------------------------------------

def inbound_names(layer: dict[str, Any]) -> list[str]:
    """Names of the layers whose outputs a layer takes (Keras 3 and legacy Keras 2 configs)."""
    names: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            history = value.get("config", {}).get("keras_history") if value.get(
                "class_name") == "__keras_tensor__" else None
            if history:
                names.append(history[0])
            else:
                for v in value.values():
                    visit(v)
        elif isinstance(value, list):
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                names.append(value[0])  # legacy [name, node, tensor, kwargs]
            else:
                for v in value:
                    visit(v)

    for node in layer.get("inbound_nodes", []):
        visit(node.get("args", []) if isinstance(node, dict) else node)
    return names


def inner_model(layer: dict[str, Any]) -> dict[str, Any] | None:
    """The model a layer is or wraps (a nested model, or the reference's InferenceMode layer)."""
    if layer["class_name"] in MODEL_CLASSES:
        return layer
    inner = layer.get("config", {}).get("model")
    return inner if isinstance(inner, dict) and "class_name" in inner else None


def layer_name(layer: dict[str, Any]) -> str:
    return layer.get("name") or layer["config"]["name"]


def is_base(layer: dict[str, Any]) -> bool:
    """A MobileNetV2 base (nested or wrapped): a model with its first conv and last ReLU."""
    inner = inner_model(layer)
    return inner is not None and {"Conv1", "out_relu"} <= {
        x.get("config", {}).get("name", x.get("name")) for x in inner["config"].get("layers", [])}


def chain(config: dict[str, Any], path: Path) -> tuple[list[dict], dict, list[dict]]:
    """(layers from the input to the base, the base, layers from the base to the output)."""
    layers = config["config"]["layers"]
    if config["class_name"] == "Sequential":
        found = [i for i, layer in enumerate(layers) if is_base(layer)]
        if not found:
            raise UserError(f"{path}: no MobileNetV2 base (alpha 1.0, no top) in the model")
        i = found[0]
        return layers[:i], layers[i], layers[i + 1:]
    by_name = {layer_name(layer): layer for layer in layers}
    outputs = config["config"]["output_layers"]
    output = outputs[0] if isinstance(outputs[0], list) else outputs
    if len(outputs) != 1 and isinstance(outputs[0], list):
        raise UserError(f"{path}: the model has {len(outputs)} outputs; expected one")
    head: list[dict] = []
    layer = by_name[output[0]]
    while not is_base(layer) and layer_name(layer) != "out_relu":
        inbound = inbound_names(layer)
        if len(inbound) != 1:
            raise UserError(f"{path}: layer {layer_name(layer)!r} ({layer['class_name']}) does not "
                            f"fit the recipe's head {RECIPE_HEAD} (no MobileNetV2 base before it)")
        head.insert(0, layer)
        layer = by_name[inbound[0]]
    base = layer
    # An inline base (its layers in the outer model) starts at its first conv.
    start = by_name["Conv1"] if layer_name(layer) == "out_relu" else layer
    before: list[dict] = []
    layer = by_name[inbound_names(start)[0]]
    while inbound_names(layer):
        inbound = inbound_names(layer)
        if len(inbound) != 1:
            raise UserError(f"{path}: layer {layer_name(layer)!r} ({layer['class_name']}) before "
                            "the base takes several inputs; expected augmentation and "
                            "preprocessing")
        before.insert(0, layer)
        layer = by_name[inbound[0]]
    return [layer, *before], base, head


def operation_constant(layer: dict[str, Any]) -> float | None:
    """The number a TrueDivide/Subtract operation layer applies (its second argument)."""
    for node in layer.get("inbound_nodes", []):
        args = node.get("args", []) if isinstance(node, dict) else []
        numbers = [a for a in args if isinstance(a, int | float)]
        if numbers:
            return float(numbers[0])
    return None


@dataclass
class KerasClassifier:
    """What from-keras found in a Keras model."""

    image_size: int
    units: int
    activation: str
    dense: str
    dropout: float
    augmentation: list[str] = field(default_factory=list)
    scaling: str | None = None


@dataclass
class _Head:
    units: int
    activation: str
    dense: str
    dropout: float


def _misfit(path: Path, layer: dict[str, Any], expected: str) -> UserError:
    return UserError(f"{path}: layer {layer_name(layer)!r} ({layer['class_name']}) after the "
                     f"MobileNetV2 base does not fit the recipe's head {RECIPE_HEAD}: "
                     f"expected {expected}")


def _read_head(head: list[dict], path: Path) -> _Head:
    """Pooling -> [Dropout] -> Dense [-> Activation], or a one-line error naming the misfit."""
    rest = list(head)
    if not rest:
        raise UserError(f"{path}: the model ends with the MobileNetV2 base; expected the "
                        f"recipe's head {RECIPE_HEAD} after it")
    if rest[0]["class_name"] != "GlobalAveragePooling2D" or \
            rest[0]["config"].get("keepdims", False):
        raise _misfit(path, rest[0], "GlobalAveragePooling2D")
    rest.pop(0)
    dropout = 0.0
    if rest and rest[0]["class_name"] == "Dropout":
        dropout = float(rest.pop(0)["config"]["rate"])
    if not rest:
        raise UserError(f"{path}: no Dense layer after the pooling; expected {RECIPE_HEAD}")
    if rest[0]["class_name"] != "Dense":
        raise _misfit(path, rest[0], "Dropout or Dense")
    dense = rest.pop(0)
    units = int(dense["config"]["units"])
    activation = dense["config"].get("activation", "linear")
    if rest and rest[0]["class_name"] == "Activation" and activation == "linear":
        activation = rest.pop(0)["config"]["activation"]
    if rest:
        raise _misfit(path, rest[0],
                      "nothing after the Dense layer (or one softmax/sigmoid Activation)")
    if activation not in HEAD_ACTIVATIONS or (activation == "sigmoid" and units != 1) or (
            activation == "softmax" and units == 1):
        raise _misfit(path, dense, f"a Dense of 1 unit (linear or sigmoid) or N units (linear "
                                   f"or softmax), not {units} units with {activation!r}")
    return _Head(units, activation, layer_name(dense), dropout)


def _is_rescaling_to_unit_range(layer: dict[str, Any]) -> bool:
    return layer["class_name"] == "Rescaling" and np.isclose(
        float(layer["config"]["scale"]), 1 / PIXEL_SCALE, rtol=1e-6, atol=0) and \
        float(layer["config"]["offset"]) == -PIXEL_OFFSET


def _read_input(before: list[dict], path: Path, inputs_scaled: bool
                ) -> tuple[int, list[str], str | None]:
    """(image size, augmentation layers, the scaling found) between the input and the base."""
    size = None
    augmentation, scaling, pending = [], None, None
    for layer in before:
        kind, name = layer["class_name"], layer_name(layer)
        inner = [x for x in layer.get("config", {}).get("layers", [])
                 if x["class_name"] != "InputLayer"] if kind == "Sequential" else [layer]
        if kind == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if shape and shape[1] is not None and shape[1] == shape[2]:
                size = int(shape[1])
        elif all(x["class_name"].startswith("Random") for x in inner) and inner:
            augmentation += [x["class_name"] for x in inner]
        elif _is_rescaling_to_unit_range(layer) and scaling is None:
            scaling = "Rescaling(1/127.5, offset=-1)"
        elif kind == "TrueDivide" and operation_constant(layer) == PIXEL_SCALE and scaling is None:
            pending = "x / 127.5"
        elif kind == "Subtract" and pending and operation_constant(layer) == PIXEL_OFFSET:
            scaling, pending = "x / 127.5 - 1", None
        else:
            raise UserError(f"{path}: layer {name!r} ({kind}) before the MobileNetV2 base is "
                            "neither augmentation (Random*) nor the [0, 255] -> [-1, 1] scaling "
                            "(x / 127.5 - 1, Rescaling(1/127.5, offset=-1))")
    if pending or (scaling is None and not inputs_scaled):
        raise UserError(f"{path}: the model does not scale [0, 255] pixels to [-1, 1] before its "
                        "base; if it expects inputs scaled already (mobilenet_v2."
                        "preprocess_input), pass --inputs-scaled")
    if size is None:
        raise UserError(f"{path}: the model's input is not square with a fixed size; expected "
                        "Input((size, size, 3))")
    return size, augmentation, scaling


def inspect_keras_model(path: Path, *, inputs_scaled: bool = False) -> KerasClassifier:
    """The recipe's structure in a Keras model, or a one-line error naming the layer that does
    not fit."""
    config = read_model_config(path)
    if config.get("class_name") not in MODEL_CLASSES:
        raise UserError(f"{path} holds a {config.get('class_name')}, expected a Keras model")
    before, _, head = chain(config, path)
    found = _read_head(head, path)
    size, augmentation, scaling = _read_input(before, path, inputs_scaled)
    return KerasClassifier(size, found.units, found.activation, found.dense, found.dropout,
                           augmentation, scaling)


# ---- writing ---------------------------------------------------------------------------------

def keras_tensor(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The output of layer ``name`` as another layer's inbound argument (batch dimension free)."""
    return {"class_name": "__keras_tensor__",
            "config": {"shape": [None, *shape], "dtype": "float32", "keras_history": [name, 0, 0]}}


def keras_layer(class_name: str, name: str, config: dict[str, Any], args: list[Any] | None,
                kwargs: dict[str, Any] | None = None, module: str = "keras.layers",
                registered_name: str | None = None) -> dict[str, Any]:
    """One layer of a functional model's configuration, called on ``args`` (None: an input)."""
    layer = {"module": module, "class_name": class_name, "config": {"name": name, **config},
             "registered_name": registered_name, "name": name}
    layer["inbound_nodes"] = [] if args is None else [{"args": args, "kwargs": kwargs or {}}]
    return layer


def input_layer(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return keras_layer("InputLayer", name, {"batch_shape": [None, *shape], "dtype": "float32",
                                            "sparse": False}, None)


def functional(name: str, layers: list[dict[str, Any]], inputs: str, output: str
               ) -> dict[str, Any]:
    """A functional model's configuration from its layers."""
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "registered_name": "Functional",
            "config": {"name": name, "trainable": True, "layers": layers,
                       "input_layers": [[inputs, 0, 0]], "output_layers": [[output, 0, 0]]}}


@dataclass
class HeadSpec:
    """The reference classifier's settings around its base (``tl_keras.model.build_model``)."""

    image_size: int
    units: int
    dropout: float
    augment: bool
    flip_seed: int
    rotation_seed: int
    dropout_seed: int
    rotation_factor: float


def _augmentation(spec: HeadSpec, previous: str) -> dict[str, Any]:
    image = (spec.image_size, spec.image_size, 3)
    factor = spec.rotation_factor
    inner = [{"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
              "config": {"name": "input_layer_1", "batch_shape": [None, *image],
                         "dtype": "float32", "sparse": False}},
             {"module": "keras.layers", "class_name": "RandomFlip", "registered_name": None,
              "config": {"name": "random_flip", "mode": "horizontal", "seed": spec.flip_seed}},
             {"module": "keras.layers", "class_name": "RandomRotation", "registered_name": None,
              "config": {"name": "random_rotation", "factor": [-factor, factor],
                         "fill_mode": "reflect", "interpolation": "bilinear",
                         "seed": spec.rotation_seed}}]
    return keras_layer("Sequential", "data_augmentation",
                       {"layers": inner, "build_input_shape": [None, *image]},
                       [keras_tensor(previous, image)], module="keras")


def classifier_config(spec: HeadSpec, base: dict[str, Any]) -> dict[str, Any]:
    """The reference's model (augmentation, ``x / 127.5 - 1``, the base as a nested model called
    with ``training=False``, pooling, dropout, dense) around a base's configuration, without the
    reference's own InferenceMode layer."""
    image = (spec.image_size, spec.image_size, 3)
    layers, previous = [input_layer("input_layer", image)], "input_layer"
    if spec.augment:  # the recipe's augmentation, active in training only
        layers.append(_augmentation(spec, previous))
        previous = "data_augmentation"
    layers.append(keras_layer("TrueDivide", "true_divide", {},
                              [keras_tensor(previous, image), PIXEL_SCALE],
                              module="keras.src.ops.numpy", registered_name="TrueDivide"))
    layers.append(keras_layer("Subtract", "subtract", {},
                              [keras_tensor("true_divide", image), PIXEL_OFFSET],
                              module="keras.src.ops.numpy", registered_name="Subtract"))
    base_name = base["config"]["name"]
    base = {**base, "name": base_name, "inbound_nodes": [
        {"args": [keras_tensor("subtract", image)], "kwargs": {"training": False}}]}
    layers.append(base)
    last = base["config"]["layers"][-1]["inbound_nodes"][0]["args"][0]["config"]["shape"]
    features = (*last[1:3], LAST_FILTERS)
    layers += [
        keras_layer("GlobalAveragePooling2D", "global_average_pooling2d",
                    {"data_format": "channels_last", "keepdims": False},
                    [keras_tensor(base_name, features)]),
        keras_layer("Dropout", "dropout", {"rate": float(spec.dropout), "seed": spec.dropout_seed},
                    [keras_tensor("global_average_pooling2d", (LAST_FILTERS,))]),
        keras_layer("Dense", "dense", {"units": spec.units, "activation": "linear",
                                       "use_bias": True},
                    [keras_tensor("dropout", (LAST_FILTERS,))]),
    ]
    return {**functional("functional", layers, "input_layer", "dense"),
            "build_config": {"input_shape": None}}
