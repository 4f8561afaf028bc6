"""Keras model configurations as JSON, framework-free: reading the recipe's classifier out of a
whole Keras model's ``config.json`` (or a ``.h5``'s ``model_config``): which of the bases it holds
(:data:`tl_common.keras_inputs.BASE_MARKERS`), the preprocessing before it
(:mod:`tl_common.keras_inputs`) and the head after it. :mod:`tl_common.keras_writer` writes them
(its names are importable from here too).

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

from tl_common.bases import BASES
from tl_common.errors import UserError
from tl_common.keras_inputs import BASE_MARKERS, application, base_of_layers, read_input
from tl_common.keras_writer import (  # noqa: F401  (importable from here, as before)
    HeadSpec,
    classifier_config,
    functional,
    input_layer,
    keras_layer,
    keras_tensor,
)

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


def base_name(layer: dict[str, Any]) -> str | None:
    """Which of the bases a layer is (a nested model, or one wrapped by the reference's
    InferenceMode layer), by the layers only that base holds; None for any other layer."""
    inner = inner_model(layer)
    if inner is None:
        return None
    return base_of_layers({layer_name(x) for x in inner["config"].get("layers", [])})


def is_base(layer: dict[str, Any]) -> bool:
    return base_name(layer) is not None


def _accepted_bases() -> str:
    return ", ".join(f"{BASES[b].keras_application}(include_top=False)" for b in BASE_MARKERS)


def _ancestors(by_name: dict[str, dict], start: list[str]) -> set[str]:
    """The layers a tensor depends on (``start`` included)."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen and name in by_name:
            seen.add(name)
            todo += inbound_names(by_name[name])
    return seen


def chain(config: dict[str, Any], path: Path) -> tuple[list[dict], dict, list[dict], str]:
    """(layers from the input to the base, in the model's order; the base; layers from the base
    to the output; the name of the tensor the base takes)."""
    layers = config["config"]["layers"]
    if config["class_name"] == "Sequential":
        found = [i for i, layer in enumerate(layers) if is_base(layer)]
        if not found:
            raise UserError(f"{path}: none of the bases in the model: expected one of "
                            f"{_accepted_bases()}")
        i = found[0]
        return layers[:i], layers[i], layers[i + 1:], layer_name(layers[i - 1]) if i else ""
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
                            f"fit the recipe's head {RECIPE_HEAD} (none of the bases before it: "
                            f"expected one of {_accepted_bases()})")
        head.insert(0, layer)
        layer = by_name[inbound[0]]
    base = layer
    # An inline MobileNetV2 (its layers in the outer model) starts at its first conv.
    start = by_name["Conv1"] if layer_name(layer) == "out_relu" else layer
    base_input = inbound_names(start)[0]
    ancestors = _ancestors(by_name, [base_input])
    return [x for x in layers if layer_name(x) in ancestors], base, head, base_input


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
    base: str = "mobilenet_v2"
    # The base's layout where Keras builds it in more than one (EfficientNet's extra Rescaling
    # of weights="imagenet"): keyword arguments of the port's base.
    base_layout: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Head:
    units: int
    activation: str
    dense: str
    dropout: float


def _misfit(path: Path, layer: dict[str, Any], expected: str, app: str) -> UserError:
    return UserError(f"{path}: layer {layer_name(layer)!r} ({layer['class_name']}) after the "
                     f"{app} base does not fit the recipe's head {RECIPE_HEAD}: "
                     f"expected {expected}")


def _read_head(head: list[dict], path: Path, app: str) -> _Head:
    """Pooling -> [Dropout] -> Dense [-> Activation], or a one-line error naming the misfit."""
    rest = list(head)
    if not rest:
        raise UserError(f"{path}: the model ends with the {app} base; expected the "
                        f"recipe's head {RECIPE_HEAD} after it")
    if rest[0]["class_name"] != "GlobalAveragePooling2D" or \
            rest[0]["config"].get("keepdims", False):
        raise _misfit(path, rest[0], "GlobalAveragePooling2D", app)
    rest.pop(0)
    dropout = 0.0
    if rest and rest[0]["class_name"] == "Dropout":
        dropout = float(rest.pop(0)["config"]["rate"])
    if not rest:
        raise UserError(f"{path}: no Dense layer after the pooling; expected {RECIPE_HEAD}")
    if rest[0]["class_name"] != "Dense":
        raise _misfit(path, rest[0], "Dropout or Dense", app)
    dense = rest.pop(0)
    units = int(dense["config"]["units"])
    activation = dense["config"].get("activation", "linear")
    if rest and rest[0]["class_name"] == "Activation" and activation == "linear":
        activation = rest.pop(0)["config"]["activation"]
    if rest:
        raise _misfit(path, rest[0],
                      "nothing after the Dense layer (or one softmax/sigmoid Activation)", app)
    if activation not in HEAD_ACTIVATIONS or (activation == "sigmoid" and units != 1) or (
            activation == "softmax" and units == 1):
        raise _misfit(path, dense, f"a Dense of 1 unit (linear or sigmoid) or N units (linear "
                                   f"or softmax), not {units} units with {activation!r}", app)
    return _Head(units, activation, layer_name(dense), dropout)


def base_layout(name: str, base: dict[str, Any]) -> dict[str, Any]:
    """The layout of the base's own layers that the port must build to match: EfficientNet's
    Rescaling after its Normalization, present when Keras built it for ImageNet weights."""
    if name != "efficientnet_b0":
        return {}
    inner = inner_model(base) or base
    kinds = [x["class_name"] for x in inner["config"]["layers"]]
    return {"imagenet_rescaling": kinds.count("Rescaling") > 1}


def inspect_keras_model(path: Path, *, inputs_scaled: bool = False) -> KerasClassifier:
    """The recipe's structure in a Keras model, or a one-line error naming the layer that does
    not fit."""
    config = read_model_config(path)
    if config.get("class_name") not in MODEL_CLASSES:
        raise UserError(f"{path} holds a {config.get('class_name')}, expected a Keras model")
    before, base, head, base_input = chain(config, path)
    name = base_name(base) or "mobilenet_v2"  # no name: an inline MobileNetV2
    found = _read_head(head, path, application(name))
    size, augmentation, scaling = read_input(before, base_input, name, path, inputs_scaled)
    return KerasClassifier(size, found.units, found.activation, found.dense, found.dropout,
                           augmentation, scaling, name, base_layout(name, base))
