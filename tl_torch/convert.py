"""Whole trained classifiers across the border: Keras model -> port run folder, port run -> Keras
model, port run -> ONNX.

Run::

    python -m tl_torch.convert from-keras MODEL.keras|MODEL.h5 OUT_DIR [--class-names a,b]
    python -m tl_torch.convert to-keras RUN_DIR OUT.keras
    python -m tl_torch.convert to-onnx RUN_DIR OUT.onnx

``from-keras`` takes a whole Keras model with a MobileNetV2 base (alpha 1.0, no top) and the
recipe's head, GlobalAveragePooling2D -> [Dropout] -> Dense(1 or N) (a linear, sigmoid or softmax
Dense), as ``tl_keras.train`` writes it or as someone else built it (found by structure: a nested
base, the reference's ``InferenceMode`` wrapper, or the base's layers inline), and writes
``OUT_DIR/model.ckpt``, which ``python -m tl_torch.predict OUT_DIR`` and
``TransferModule.load_from_checkpoint`` use alone. Between the input and the base it accepts
augmentation layers (``Random*``, inactive at inference) and the [0, 255] -> [-1, 1] scaling
(``preprocess_input``'s divide and subtract, or ``Rescaling(1/127.5, offset=-1)``); a model without
that scaling takes inputs already scaled: say so with ``--inputs-scaled``. The class names come
from ``--class-names``, else from the ``metrics.json`` of a ``tl_keras.train`` run beside the
model, else ``class_0``... A layer that does not fit is named in a one-line error.

``to-keras`` writes the reference's architecture (augmentation, ``x / 127.5 - 1``, the base as a
nested model called with ``training=False``, pooling, dropout, dense) as a Keras 3 ``.keras`` zip
(``config.json``, ``metadata.json``, ``model.weights.h5``) with json and h5py: no TensorFlow here,
and no layer of this project in it, so ``keras.models.load_model`` opens it anywhere. The base's
``trainable`` flags are those of fine-tuning from ``fine_tune_at``; Keras' own ``fit`` would run
the unfrozen BatchNorm layers in training mode (keras-team/keras#20285, which the reference avoids
with its ``InferenceMode`` wrapper), so the file is for inference and for Keras users' own
recompiling.

``to-onnx`` exports the inference graph with ``torch.onnx.export`` (TorchScript exporter, opset
:data:`ONNX_OPSET`): input ``images``, float32 NCHW RGB pixels in [0, 255] of the run's image size,
any batch size; outputs ``logits`` and ``probabilities`` (two classes: the probability of class 1,
(N,); N classes: softmax, (N, classes)).

Each conversion runs the same images (``--images``, or generated demo images) through the source
and the result and prints and writes a parity summary (``OUT_DIR/conversion.json``,
``OUT.keras.parity.json``, ``OUT.onnx.parity.json``): max |probability difference|, and the band
it is judged against, measured in the same run: the float64 run of the source model is the exact
answer, and the result's float32 error against it must stay within :data:`tl_common.bands.RATIO` times the
source's own float32 error (the port's: the larger of its folded and unfolded runs) plus
:data:`tl_common.bands.FLOOR_ULPS` float32 ulps. Keras models are run in a
separate Python process with Keras imported there (skipped, and said so, where Keras is not
installed); onnxruntime runs the ONNX file where it is installed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from tl_common import bands
from tl_common.errors import UserError, run_main
from tl_common.mobilenet_v2 import LAST_FILTERS
from tl_common.outputs import atomic_write_bytes, read_metrics, replaced_atomically, write_json
from tl_torch.checkpoint import MODEL_FILE, load_run, save_module
from tl_torch.data import load_images
from tl_torch.keras_weights import EXPORT_KERAS_VERSION, load_keras_weights, open_keras_file
from tl_torch.model import KERAS_BN_MOMENTUM, MobileNetV2Base
from tl_torch.module import TransferModule
from tl_torch.padding import pad_amounts
from tl_torch.predict import image_paths
from tl_torch.weights import base_config

#: The ONNX opset of to-onnx (the TorchScript exporter's well-tested range).
ONNX_OPSET = 17
#: Images a conversion compares on when none are given: generated demo images, half of each kind.
DEFAULT_IMAGES = 8
#: ``preprocess_input`` of MobileNetV2: x / SCALE - OFFSET.
PIXEL_SCALE, PIXEL_OFFSET = 127.5, 1.0
#: What from-keras accepts after the base, in the recipe's words.
RECIPE_HEAD = "GlobalAveragePooling2D -> [Dropout] -> Dense(1 or N)"
HEAD_ACTIVATIONS = ("linear", "sigmoid", "softmax")


# ---- head weights: the one place where the layouts meet -----------------------------------------

def dense_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Keras ``Dense`` kernel (in, out) -> ``nn.Linear`` weight (out, in): a transpose (a reshape
    keeps the shape of a (1280, N) kernel and scrambles it)."""
    return np.ascontiguousarray(kernel.T)


def torch_to_dense_kernel(weight: np.ndarray) -> np.ndarray:
    """``nn.Linear`` weight (out, in) -> Keras ``Dense`` kernel (in, out)."""
    return np.ascontiguousarray(weight.T)


def dense_bias(bias: np.ndarray | None, units: int) -> np.ndarray:
    """The Dense bias, zeros where the layer has none (``use_bias=False``)."""
    return np.zeros(units, np.float32) if bias is None else np.asarray(bias, np.float32)


def class_names_for(model_path: Path, units: int, given: list[str] | None) -> list[str]:
    """``--class-names``, else the class folders of the tl_keras run beside the model (sorted, as
    the labels were numbered), else ``class_0``..."""
    count = 2 if units == 1 else units
    if given is None and (model_path.parent / "metrics.json").is_file():
        given = list(read_metrics(model_path.parent)["data"]["class_names"])
    if given is None:
        return [f"class_{i}" for i in range(count)]
    if len(given) != count:
        raise UserError(f"--class-names {','.join(given)} names {len(given)} classes; the model's "
                        f"head has {count}")
    return [str(name) for name in given]


# ---- reading a Keras model's structure -------------------------------------------------------

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


def _inbound_names(layer: dict[str, Any]) -> list[str]:
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


def _inner_model(layer: dict[str, Any]) -> dict[str, Any] | None:
    """The model a layer is or wraps (a nested model, or the reference's InferenceMode layer)."""
    if layer["class_name"] in ("Functional", "Model", "Sequential"):
        return layer
    inner = layer.get("config", {}).get("model")
    return inner if isinstance(inner, dict) and "class_name" in inner else None


def _layer_names(model: dict[str, Any]) -> set[str]:
    return {layer.get("config", {}).get("name", layer.get("name")) for layer in
            model.get("config", {}).get("layers", [])}


def _is_base(layer: dict[str, Any]) -> bool:
    inner = _inner_model(layer)
    return inner is not None and {"Conv1", "out_relu"} <= _layer_names(inner)


def _name(layer: dict[str, Any]) -> str:
    return layer.get("name") or layer["config"]["name"]


def _chain(config: dict[str, Any], path: Path) -> tuple[list[dict], dict, list[dict]]:
    """(layers from the input to the base, the base, layers from the base to the output)."""
    layers = config["config"]["layers"]
    if config["class_name"] == "Sequential":
        found = [i for i, layer in enumerate(layers) if _is_base(layer)]
        if not found:
            raise UserError(f"{path}: no MobileNetV2 base (alpha 1.0, no top) in the model")
        i = found[0]
        return layers[:i], layers[i], layers[i + 1:]
    by_name = {_name(layer): layer for layer in layers}
    outputs = config["config"]["output_layers"]
    output = outputs[0] if isinstance(outputs[0], list) else outputs
    if len(config["config"]["output_layers"]) != 1 and isinstance(outputs[0], list):
        raise UserError(f"{path}: the model has {len(outputs)} outputs; expected one")
    head: list[dict] = []
    layer = by_name[output[0]]
    while not _is_base(layer) and _name(layer) != "out_relu":
        inbound = _inbound_names(layer)
        if len(inbound) != 1:
            raise UserError(f"{path}: layer {_name(layer)!r} ({layer['class_name']}) does not fit "
                            f"the recipe's head {RECIPE_HEAD} (no MobileNetV2 base before it)")
        head.insert(0, layer)
        layer = by_name[inbound[0]]
    base = layer
    start = by_name["Conv1"] if _name(layer) == "out_relu" else layer  # inline base: its first conv
    before: list[dict] = []
    layer = by_name[_inbound_names(start)[0]]
    while _inbound_names(layer):
        inbound = _inbound_names(layer)
        if len(inbound) != 1:
            raise UserError(f"{path}: layer {_name(layer)!r} ({layer['class_name']}) before the "
                            "base takes several inputs; expected augmentation and preprocessing")
        before.insert(0, layer)
        layer = by_name[inbound[0]]
    return [layer, *before], base, head


def _constant(layer: dict[str, Any]) -> float | None:
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


def inspect_keras_model(path: Path, *, inputs_scaled: bool = False) -> KerasClassifier:
    """The recipe's structure in a Keras model, or a one-line error naming the layer that does
    not fit."""
    config = read_model_config(path)
    if config.get("class_name") not in ("Functional", "Model", "Sequential"):
        raise UserError(f"{path} holds a {config.get('class_name')}, expected a Keras model")
    before, _, head = _chain(config, path)

    def misfit(layer: dict[str, Any], expected: str) -> UserError:
        return UserError(f"{path}: layer {_name(layer)!r} ({layer['class_name']}) after the "
                         f"MobileNetV2 base does not fit the recipe's head {RECIPE_HEAD}: "
                         f"expected {expected}")

    rest = list(head)
    if not rest or rest[0]["class_name"] != "GlobalAveragePooling2D" or \
            rest[0]["config"].get("keepdims", False):
        if not rest:
            raise UserError(f"{path}: the model ends with the MobileNetV2 base; expected the "
                            f"recipe's head {RECIPE_HEAD} after it")
        raise misfit(rest[0], "GlobalAveragePooling2D")
    rest.pop(0)
    dropout = 0.0
    if rest and rest[0]["class_name"] == "Dropout":
        dropout = float(rest.pop(0)["config"]["rate"])
    if not rest or rest[0]["class_name"] != "Dense":
        if not rest:
            raise UserError(f"{path}: no Dense layer after the pooling; expected {RECIPE_HEAD}")
        raise misfit(rest[0], "Dropout or Dense")
    dense = rest.pop(0)
    units = int(dense["config"]["units"])
    activation = dense["config"].get("activation", "linear")
    if rest and rest[0]["class_name"] == "Activation" and activation == "linear":
        activation = rest.pop(0)["config"]["activation"]
    if rest:
        raise misfit(rest[0], "nothing after the Dense layer (or one softmax/sigmoid Activation)")
    if activation not in HEAD_ACTIVATIONS or (activation == "sigmoid" and units != 1) or (
            activation == "softmax" and units == 1):
        raise misfit(dense, f"a Dense of 1 unit (linear or sigmoid) or N units (linear or "
                            f"softmax), not {units} units with {activation!r}")

    size = None
    augmentation, scaling, pending = [], None, None
    for layer in before:
        kind, name = layer["class_name"], _name(layer)
        inner = [x for x in layer.get("config", {}).get("layers", [])
                 if x["class_name"] != "InputLayer"] if kind == "Sequential" else [layer]
        if kind == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if shape and shape[1] is not None and shape[1] == shape[2]:
                size = int(shape[1])
        elif all(x["class_name"].startswith("Random") for x in inner) and inner:
            augmentation += [x["class_name"] for x in inner]
        elif kind == "Rescaling" and np.isclose(float(layer["config"]["scale"]), 1 / PIXEL_SCALE,
                                                rtol=1e-6, atol=0) \
                and float(layer["config"]["offset"]) == -PIXEL_OFFSET and scaling is None:
            scaling = "Rescaling(1/127.5, offset=-1)"
        elif kind == "TrueDivide" and _constant(layer) == PIXEL_SCALE and scaling is None:
            pending = "x / 127.5"
        elif kind == "Subtract" and pending and _constant(layer) == PIXEL_OFFSET:
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
    return KerasClassifier(size, units, activation, _name(dense), dropout, augmentation, scaling)


def read_dense(path: Path, name: str, units: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The Dense layer's kernel (1280, units) and bias, from the outermost model holding it."""
    kfile = open_keras_file(path)
    try:
        for container in sorted(kfile.containers, key=lambda c: len(c.where)):
            found = container.layers.get(name)
            if found is None:
                continue
            keys = ("0", "1") if kfile.keras3 else ("kernel", "bias")
            kernel = np.asarray(found[keys[0]], np.float32)
            bias = np.asarray(found[keys[1]], np.float32) if keys[1] in found else None
            if kernel.shape != (LAST_FILTERS, units):
                raise UserError(f"{path}: Dense {name!r} has a kernel of shape {kernel.shape}; "
                                f"expected ({LAST_FILTERS}, {units}) after MobileNetV2's pooling")
            return kernel, bias
    finally:
        kfile.close()
    raise UserError(f"{path} holds no weights for its Dense layer {name!r}")


def module_from_keras(path: Path, *, class_names: list[str] | None = None,
                      inputs_scaled: bool = False) -> tuple[TransferModule, KerasClassifier]:
    """The port's module holding a whole Keras model's weights."""
    found = inspect_keras_model(path, inputs_scaled=inputs_scaled)
    names = class_names_for(path, found.units, class_names)
    kernel, bias = read_dense(path, found.dense, found.units)
    weight, bias = dense_kernel_to_torch(kernel), dense_bias(bias, found.units)
    if found.units == 2:  # softmax over 2 = sigmoid of the difference: the port's one logit
        weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
    base = MobileNetV2Base(**base_config(str(path)))
    load_keras_weights(base, path)
    base.weights_source = str(path)
    module = TransferModule(base, dropout=found.dropout, augment=bool(found.augmentation),
                            num_classes=len(names), class_names=names,
                            image_size=found.image_size)
    with torch.no_grad():
        module.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        module.classifier.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return module, found


# ---- writing a Keras model --------------------------------------------------------------------

def _tensor(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"class_name": "__keras_tensor__",
            "config": {"shape": [None, *shape], "dtype": "float32", "keras_history": [name, 0, 0]}}


def _keras_layer(class_name: str, name: str, config: dict[str, Any], args: list[Any] | None,
                 kwargs: dict[str, Any] | None = None, module: str = "keras.layers",
                 registered_name: str | None = None) -> dict[str, Any]:
    layer = {"module": module, "class_name": class_name, "config": {"name": name, **config},
             "registered_name": registered_name, "name": name}
    layer["inbound_nodes"] = [] if args is None else [{"args": args, "kwargs": kwargs or {}}]
    return layer


_BLOCK = re.compile(r"^(expanded_conv|block_\d+)_")


def base_config_json(base: MobileNetV2Base, image_size: int, fine_tune_at: int) -> dict[str, Any]:
    """``keras.applications.MobileNetV2(include_top=False)`` as a Keras 3 configuration: the same
    154 layers, names and settings, with the padding and shapes the port computes."""
    from tl_torch.features import all_layer_outputs

    with torch.no_grad():
        x = torch.zeros(1, 3, image_size, image_size)
        shapes = {name: tuple(v.shape[2:]) + (v.shape[1],)      # NCHW -> (H, W, C)
                  for name, v in all_layer_outputs(base, x).items()}
    shapes[base.input_layer_name] = (image_size, image_size, 3)
    layers, previous, block, block_input = [], None, None, None
    for layer in base.keras_layers:
        name, kind, m = layer.name, layer.type, layer.module
        trainable = layer.index >= fine_tune_at
        match = _BLOCK.match(name)
        if match and match.group(1) != block:
            block, block_input = match.group(1), previous
        args = None if previous is None else [_tensor(previous, shapes[previous])]
        if kind == "InputLayer":
            layers.append(_keras_layer(kind, name, {"batch_shape": [None, *shapes[name]],
                                                    "dtype": "float32", "sparse": False}, None))
        elif kind == "Conv2D":
            k, s = m.kernel_size[0], m.stride[0]
            layers.append(_keras_layer(kind, name, {
                "trainable": trainable, "filters": m.out_channels, "kernel_size": [k, k],
                "strides": [s, s], "padding": "same", "use_bias": False, "activation": "linear"},
                args))
        elif kind == "DepthwiseConv2D":
            s = m.stride[0]
            layers.append(_keras_layer(kind, name, {
                "trainable": trainable, "kernel_size": list(m.kernel_size), "strides": [s, s],
                "padding": "same" if s == 1 else "valid", "depth_multiplier": 1,
                "use_bias": False, "activation": "linear"}, args))
        elif kind == "BatchNormalization":
            layers.append(_keras_layer(kind, name, {
                "trainable": trainable, "axis": -1, "momentum": KERAS_BN_MOMENTUM,
                "epsilon": float(m.eps)}, args))
        elif kind == "ReLU":
            layers.append(_keras_layer(kind, name, {"trainable": trainable, "max_value": 6.0},
                                       args))
        elif kind == "ZeroPadding2D":
            h, w, _ = shapes[previous]
            left, right, top, bottom = pad_amounts(h, w, 3, 2, base.pad_type)
            layers.append(_keras_layer(kind, name, {"trainable": trainable,
                                                    "padding": [[top, bottom], [left, right]]},
                                       args))
        elif kind == "Add":
            layers.append(_keras_layer(kind, name, {"trainable": trainable}, [[
                _tensor(block_input, shapes[block_input]), _tensor(previous, shapes[previous])]]))
        else:
            raise ValueError(f"no Keras configuration for layer {name} of type {kind}")
        previous = name
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "registered_name": "Functional",
            "config": {"name": f"mobilenetv2_1.00_{image_size}", "trainable": True,
                       "layers": layers, "input_layers": [[base.input_layer_name, 0, 0]],
                       "output_layers": [[previous, 0, 0]]}}


def keras_model_config(module: TransferModule, image_size: int) -> dict[str, Any]:
    """The reference's model (``tl_keras.model.build_model``) as a Keras 3 configuration, without
    the reference's own InferenceMode layer: the base is a nested model called with
    ``training=False``."""
    hp, s = module.hparams, image_size
    image = (s, s, 3)
    layers = [_keras_layer("InputLayer", "input_layer", {"batch_shape": [None, *image],
                                                         "dtype": "float32", "sparse": False},
                           None)]
    previous = "input_layer"
    if module.augment is not None:  # the recipe's augmentation, active in training only
        inner = [{"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
                  "config": {"name": "input_layer_1", "batch_shape": [None, *image],
                             "dtype": "float32", "sparse": False}},
                 {"module": "keras.layers", "class_name": "RandomFlip", "registered_name": None,
                  "config": {"name": "random_flip", "mode": "horizontal", "seed": hp.seed}},
                 {"module": "keras.layers", "class_name": "RandomRotation",
                  "registered_name": None,
                  "config": {"name": "random_rotation", "factor": [-0.2, 0.2],
                             "fill_mode": "reflect", "interpolation": "bilinear",
                             "seed": hp.seed + 1}}]
        layers.append(_keras_layer("Sequential", "data_augmentation",
                                   {"layers": inner, "build_input_shape": [None, *image]},
                                   [_tensor(previous, image)], module="keras"))
        previous = "data_augmentation"
    layers.append(_keras_layer("TrueDivide", "true_divide", {},
                               [_tensor(previous, image), PIXEL_SCALE],
                               module="keras.src.ops.numpy", registered_name="TrueDivide"))
    layers.append(_keras_layer("Subtract", "subtract", {},
                               [_tensor("true_divide", image), PIXEL_OFFSET],
                               module="keras.src.ops.numpy", registered_name="Subtract"))
    base = base_config_json(module.base, s, hp.fine_tune_at)
    base_name = base["config"]["name"]
    base.update(name=base_name, inbound_nodes=[{"args": [_tensor("subtract", image)],
                                                "kwargs": {"training": False}}])
    layers.append(base)
    last = base["config"]["layers"][-1]["inbound_nodes"][0]["args"][0]["config"]["shape"]
    features = tuple(last[1:3]) + (LAST_FILTERS,)
    units = module.classifier.out_features
    layers += [
        _keras_layer("GlobalAveragePooling2D", "global_average_pooling2d",
                     {"data_format": "channels_last", "keepdims": False},
                     [_tensor(base_name, features)]),
        _keras_layer("Dropout", "dropout", {"rate": float(hp.dropout), "seed": hp.seed + 2},
                     [_tensor("global_average_pooling2d", (LAST_FILTERS,))]),
        _keras_layer("Dense", "dense", {"units": units, "activation": "linear",
                                        "use_bias": True},
                     [_tensor("dropout", (LAST_FILTERS,))]),
    ]
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "registered_name": "Functional", "build_config": {"input_shape": None},
            "config": {"name": "functional", "trainable": True, "layers": layers,
                       "input_layers": [["input_layer", 0, 0]],
                       "output_layers": [["dense", 0, 0]]}}


def _empty_layer(group: h5py.Group, key: str, name: str) -> h5py.Group:
    layer = group.create_group(key)
    layer.create_group("vars").attrs["name"] = name
    return layer


def write_keras_weights(module: TransferModule, h5: h5py.File, base_name: str) -> None:
    """``model.weights.h5`` as Keras 3 saves this model: each layer of ``model.layers`` under
    ``layers/<class name in snake case, numbered>/vars/<i>``, nested models under their own
    ``layers``."""
    from tl_torch.keras_weights import save_keras_weights

    layers = h5.create_group("layers")
    _empty_layer(layers, "input_layer", "input_layer")
    if module.augment is not None:
        sequential = _empty_layer(layers, "sequential", "data_augmentation")
        inner = sequential.create_group("layers")
        _empty_layer(inner, "random_flip", "random_flip")
        _empty_layer(inner, "random_rotation", "random_rotation")
    base = _empty_layer(layers, "functional", base_name)
    with tempfile.TemporaryDirectory() as tmp:  # the base's own layout, written by keras_weights
        path = save_keras_weights(module.base, Path(tmp) / "base.weights.h5")
        with h5py.File(path, "r") as f:
            f.copy(f["layers"], base, "layers")
    _empty_layer(layers, "global_average_pooling2d", "global_average_pooling2d")
    _empty_layer(layers, "dropout", "dropout")
    dense = _empty_layer(layers, "dense", "dense")["vars"]
    dense.create_dataset("0", data=torch_to_dense_kernel(
        module.classifier.weight.detach().cpu().numpy().astype(np.float32)))
    dense.create_dataset("1", data=module.classifier.bias.detach().cpu().numpy().astype(np.float32))
    h5.create_group("vars").attrs["name"] = "functional"


def write_keras_model(module: TransferModule, image_size: int, path: Path) -> Path:
    """The module as a Keras 3 ``.keras`` file (a zip of config.json, metadata.json and
    model.weights.h5), written beside its name and renamed over it."""
    if path.suffix != ".keras":
        raise UserError(f"cannot write {path}: Keras reads whole models only from a name ending "
                        "in .keras")
    if module.base.preprocessing != "keras" or module.base.pad_type != "same":
        raise UserError(f"the run's base has {module.base.pad_type!r} padding and "
                        f"{module.base.preprocessing!r} preprocessing (torchvision weights); "
                        "Keras' MobileNetV2 has TF 'same' padding and x / 127.5 - 1: only runs "
                        "with Keras weights convert to Keras")
    config = keras_model_config(module, image_size)
    metadata = {"keras_version": EXPORT_KERAS_VERSION,
                "date_saved": time.strftime("%Y-%m-%d@%H:%M:%S")}
    weights = io.BytesIO()
    with h5py.File(weights, "w") as h5:
        base_name = next(layer["name"] for layer in config["config"]["layers"]
                         if layer["class_name"] == "Functional")
        write_keras_weights(module, h5, base_name)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("metadata.json", json.dumps(metadata))
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("model.weights.h5", weights.getvalue())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, archive.getvalue())
    return path


# ---- ONNX --------------------------------------------------------------------------------------

class _Probabilities(nn.Module):
    """The inference graph: [0, 255] NCHW images -> (logits, probabilities)."""

    def __init__(self, module: TransferModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(images)
        probs = torch.sigmoid(logits) if self.module.binary else torch.softmax(logits, dim=-1)
        return logits, probs


def unfolded_copy(module: TransferModule) -> TransferModule:
    """A copy of the module that runs its base's own modules, not the folded speed path: what
    exports trace and what float64 runs (the fold is float32 oneDNN code)."""
    plain = copy.deepcopy(module)
    plain.fast = False
    plain.hparams.fast = False
    return plain.eval()


def write_onnx(module: TransferModule, image_size: int, path: Path) -> Path:
    """``torch.onnx.export`` of the inference graph (opset :data:`ONNX_OPSET`, dynamic batch);
    the module's own weights, traced through its unfolded base."""
    if path.suffix != ".onnx":
        raise UserError(f"cannot write {path}: expected a name ending in .onnx")
    if importlib.util.find_spec("onnx") is None:
        raise UserError("torch.onnx.export needs the onnx package: pip install onnx")
    example = torch.zeros(1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, f".{path.name}.tmp") as tmp:
        torch.onnx.export(_Probabilities(unfolded_copy(module)), (example,), str(tmp),
                          dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["images"],
                          output_names=["logits", "probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"},
                                        "probabilities": {0: "batch"}})
    return path


def onnx_outputs(path: Path, images: np.ndarray) -> np.ndarray | None:
    """The ONNX file's logits on NCHW images (onnxruntime, CPU), or None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.astype(np.float32)})[0]


# ---- running Keras models (in another process: tl_torch imports no TensorFlow) -----------------

KERAS_RUNNER = r'''
import io, json, os, sys, tempfile, zipfile
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
model_path, images_path, out_path, dtype, scaled, project = sys.argv[1:7]
if project == "1":
    import tl_keras  # noqa: F401  registers the reference's InferenceMode layer
import keras


def retype(value):
    """Every float32 dtype and dtype policy of a configuration -> float64."""
    if isinstance(value, dict):
        return {k: retype(v) for k, v in value.items()}
    if isinstance(value, list):
        return [retype(v) for v in value]
    return "float64" if value == "float32" else value


if dtype == "float32":
    model = keras.models.load_model(model_path, compile=False, safe_mode=True)
else:
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    if zipfile.is_zipfile(model_path):
        with zipfile.ZipFile(model_path) as zf:
            config = json.loads(zf.read("config.json"))
            weights = zf.read("model.weights.h5")
        model = keras.saving.deserialize_keras_object(retype(config))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.weights.h5")
            with open(path, "wb") as f:
                f.write(weights)
            model.load_weights(path)
    else:
        import h5py
        with h5py.File(model_path, "r") as f:
            config = f.attrs["model_config"]
        config = json.loads(config.decode() if isinstance(config, bytes) else config)
        model = keras.models.model_from_json(json.dumps(retype(config)))
        model.load_weights(model_path)
x = np.load(images_path).astype(dtype)
if scaled == "1":
    x = x / 127.5 - 1.0
np.save(out_path, np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64))
'''


def keras_available() -> bool:
    return importlib.util.find_spec("keras") is not None


def run_keras(path: Path, images_nhwc: np.ndarray, *, float64: bool = False,
              inputs_scaled: bool = False, project: bool = False) -> np.ndarray:
    """A Keras model file's outputs on images, computed by Keras in a fresh Python process
    (``project``: with tl_keras imported, for the reference's own layers)."""
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "images.npy", Path(tmp) / "out.npy"
        np.save(images, images_nhwc.astype(np.float32))
        result = subprocess.run(
            [sys.executable, "-c", KERAS_RUNNER, str(path), str(images), str(out),
             "float64" if float64 else "float32", str(int(inputs_scaled)), str(int(project))],
            capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise UserError(f"Keras could not run {path}: {lines[-1] if lines else 'no message'}")
        return np.load(out)


# ---- the parity summary ----------------------------------------------------------------------

def probabilities(outputs: np.ndarray, activation: str = "linear") -> np.ndarray:
    """Class probabilities from a head's outputs, in float64: one logit -> the probability of
    class 1; N logits -> softmax; outputs of a sigmoid/softmax Dense are probabilities already."""
    z = np.asarray(outputs, np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if activation != "linear":
        return z
    if z.ndim == 1:
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    return (probs > 0.5).astype(int) if probs.ndim == 1 else probs.argmax(axis=1)


@dataclass
class Parity:
    """The same images through source and result, against the exact (float64) answer."""

    direction: str
    source: str
    result: str
    images: int
    max_abs_probability_difference: float | None
    source_error: float | None       # rms |source float32 - exact| over the probabilities
    result_error: float | None       # rms |result float32 - exact|
    band: float | None               # bands.RATIO * source_error + floor (tl_common.bands)
    same_classes: bool | None
    passed: bool | None
    note: str = ""

    def line(self) -> str:
        if self.passed is None:
            return f"parity ({self.direction}): not measured: {self.note}"
        return (f"parity ({self.direction}, {self.images} images): max |probability difference| "
                f"{self.max_abs_probability_difference:.3g}; rms error against float64 "
                f"{self.result_error:.3g} <= band {self.band:.3g} ({bands.RATIO:g} x the "
                f"source's own {self.source_error:.3g} + {bands.FLOOR_ULPS:g} ulps): "
                f"{'pass' if self.passed else 'FAIL'}; same classes: {self.same_classes}"
                + (f"; {self.note}" if self.note else ""))


def compare(direction: str, source: str, result: str, source32: np.ndarray,
            result32: np.ndarray, exact: np.ndarray, note: str = "",
            variants: tuple[np.ndarray, ...] = ()) -> Parity:
    """The band rule of tl_common.bands on the rms error over every image's probabilities:
    result error <= RATIO x source error + FLOOR_ULPS ulps. The source's error is the largest
    of its equally valid float32 runs (``source32`` and ``variants``: the port folded, as predict
    runs it, and unfolded, as exports trace it). The rms, not the largest error: the folded base
    rounds other numbers than Keras (its weights are w * gamma / sigma), so its largest error
    over a few dozen probabilities is a noisy multiple of Keras' while its rms is steady."""
    source_error = max(bands.rms_error(s, exact) for s in (source32, *variants))
    rule = bands.Band(source_error, bands.rms_error(result32, exact), bands.floor(exact, "rms"),
                      "rms vs the source in float64")
    result_error, band = rule.port_error, rule.limit
    same = bool(result32.shape == source32.shape and np.array_equal(
        predicted_classes(source32), predicted_classes(result32)))
    diff = float(np.max(np.abs(result32 - source32))) if result32.shape == source32.shape \
        else float("inf")
    return Parity(direction, source, result, len(exact), diff, source_error, result_error, band,
                  same, rule.passed and same, note)


def comparison_images(paths: list[str] | None, image_size: int) -> torch.Tensor:
    """(N, 3, s, s) float32 [0, 255]: the given image files and folders, or generated demo images."""
    if paths:
        return load_images([str(p) for p in image_paths(paths)], image_size)
    from tl_common.demo import draw_animal

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(DEFAULT_IMAGES):
            file = Path(tmp) / f"{i}.jpg"
            draw_animal(np.random.default_rng([14, i]), dog=i % 2 == 1).save(file, quality=90)
            files.append(str(file))
        return load_images(files, image_size)


def _port_probabilities(module: TransferModule, images: torch.Tensor) -> np.ndarray:
    dtype = next(module.parameters()).dtype
    with torch.no_grad():
        return probabilities(module(images.to(dtype)).cpu().numpy())


def _nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _write_summary(parity: Parity, path: Path, extra: dict[str, Any]) -> None:
    print(parity.line())
    write_json(path, {**asdict(parity), **extra, "band_multiple": bands.RATIO,
                      "floor_ulps": bands.FLOOR_ULPS})


# ---- the three commands ------------------------------------------------------------------------

def from_keras(model_path: str | Path, out_dir: str | Path, *, class_names: list[str] | None = None,
               inputs_scaled: bool = False, images: list[str] | None = None,
               overwrite: bool = False) -> Parity:
    """Keras model -> ``OUT_DIR/model.ckpt`` (+ ``conversion.json``)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if (out_dir / MODEL_FILE).exists() and not overwrite:
        raise UserError(f"{out_dir / MODEL_FILE} exists; pass --overwrite to replace it")
    module, found = module_from_keras(model_path, class_names=class_names,
                                      inputs_scaled=inputs_scaled)
    save_module(module, out_dir / MODEL_FILE)
    print(f"wrote {out_dir / MODEL_FILE}: {module.hparams.num_classes} classes "
          f"{module.hparams.class_names}, {found.image_size} px, dropout {found.dropout:g}, "
          f"Dense activation {found.activation}")
    ported, _, size = load_run(out_dir)
    x = comparison_images(images, size)
    result32 = _port_probabilities(ported, x)
    if not keras_available():
        parity = Parity("from-keras", str(model_path), str(out_dir / MODEL_FILE), len(x), None,
                        None, None, None, None, None, "Keras is not installed here")
    else:
        project = "tl_keras>" in json.dumps(read_model_config(model_path))
        run = {"inputs_scaled": inputs_scaled, "project": project}
        source32 = probabilities(run_keras(model_path, _nhwc(x), **run), found.activation)
        exact = probabilities(run_keras(model_path, _nhwc(x), float64=True, **run),
                              found.activation)
        if found.units == 2:  # the port gives the probability of class 1
            source32, exact = source32[:, 1], exact[:, 1]
        parity = compare("from-keras", str(model_path), str(out_dir / MODEL_FILE), source32,
                         result32, exact)
    _write_summary(parity, out_dir / "conversion.json", {"keras_model": asdict(found)})
    return parity


def _source_module(run_dir: Path) -> tuple[TransferModule, TransferModule, int]:
    """The run's module as predict runs it (float32), its float64 twin, and the image size."""
    module, _, size = load_run(run_dir)
    return module, unfolded_copy(module).double(), size


def port_variants(module: TransferModule, images: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The port's other valid float32 run: unfolded (what exports trace)."""
    return (_port_probabilities(unfolded_copy(module), images),)


def to_keras(run_dir: str | Path, out: str | Path, *, images: list[str] | None = None) -> Parity:
    """Port run -> Keras ``.keras`` (+ ``OUT.keras.parity.json``)."""
    run_dir, out = Path(run_dir), Path(out)
    module, exact_module, size = _source_module(run_dir)
    write_keras_model(module, size, out)
    print(f"wrote {out}")
    x = comparison_images(images, size)
    source32, exact = _port_probabilities(module, x), _port_probabilities(exact_module, x)
    if keras_available():
        result32 = probabilities(run_keras(out, _nhwc(x)))
        parity = compare("to-keras", str(run_dir / MODEL_FILE), str(out), source32, result32, exact,
                         variants=port_variants(module, x))
    else:
        parity = Parity("to-keras", str(run_dir / MODEL_FILE), str(out), len(x), None, None, None,
                        None, None, None, "Keras is not installed here")
    _write_summary(parity, out.with_name(out.name + ".parity.json"), {})
    return parity


def to_onnx(run_dir: str | Path, out: str | Path, *, images: list[str] | None = None) -> Parity:
    """Port run -> ONNX (+ ``OUT.onnx.parity.json``)."""
    run_dir, out = Path(run_dir), Path(out)
    module, exact_module, size = _source_module(run_dir)
    write_onnx(module, size, out)
    print(f"wrote {out}: input 'images' float32 (N, 3, {size}, {size}) RGB in [0, 255]; outputs "
          f"'logits', 'probabilities'; opset {ONNX_OPSET}")
    x = comparison_images(images, size)
    source32, exact = _port_probabilities(module, x), _port_probabilities(exact_module, x)
    logits = onnx_outputs(out, x.numpy())
    if logits is None:
        parity = Parity("to-onnx", str(run_dir / MODEL_FILE), str(out), len(x), None, None, None,
                        None, None, None, "onnxruntime is not installed here")
    else:
        parity = compare("to-onnx", str(run_dir / MODEL_FILE), str(out), source32,
                         probabilities(logits), exact, variants=port_variants(module, x))
    _write_summary(parity, out.with_name(out.name + ".parity.json"),
                   {"opset": ONNX_OPSET, "input": "images NCHW float32 RGB [0, 255]"})
    return parity


def main(argv: list[str] | None = None) -> Parity:
    parser = argparse.ArgumentParser(prog="python -m tl_torch.convert",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    a = commands.add_parser("from-keras", help="a whole Keras model -> a port run folder")
    a.add_argument("model", help="Keras model file (.keras, or .h5 from model.save)")
    a.add_argument("out_dir", help="folder for model.ckpt and conversion.json")
    a.add_argument("--class-names", default=None,
                   help="comma-separated class names in label order (default: the metrics.json "
                        "of a tl_keras run beside the model, else class_0...)")
    a.add_argument("--inputs-scaled", action="store_true",
                   help="the model takes inputs scaled to [-1, 1] already (no scaling layer)")
    a.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/model.ckpt")
    for name, what in (("to-keras", "a Keras 3 .keras model"), ("to-onnx", "an ONNX model")):
        b = commands.add_parser(name, help=f"a port run -> {what}")
        b.add_argument("run_dir", help="folder holding model.ckpt (tl_torch.train or from-keras)")
        b.add_argument("out", help="output file")
    for sub in commands.choices.values():
        sub.add_argument("--images", nargs="+", default=None,
                         help="images or folders to compare on (default: generated demo images)")
    args = parser.parse_args(argv)
    if args.command == "from-keras":
        names = None if args.class_names is None else [n.strip() for n in args.class_names.split(",")]
        parity = from_keras(args.model, args.out_dir, class_names=names,
                            inputs_scaled=args.inputs_scaled, images=args.images,
                            overwrite=args.overwrite)
    elif args.command == "to-keras":
        parity = to_keras(args.run_dir, args.out, images=args.images)
    else:
        parity = to_onnx(args.run_dir, args.out, images=args.images)
    if parity.passed is False:
        raise UserError(f"the converted model does not match its source: {parity.line()}")
    return parity


if __name__ == "__main__":
    run_main(main)
