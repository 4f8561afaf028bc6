"""The torch side of moving whole classifiers between Keras and the port: a Keras model's
weights into a :class:`TransferModule`, a module out as a Keras 3 ``.keras`` file, and a Keras
model file run by Keras in another process (``python -m tl_keras.runner``: this package imports
no TensorFlow).

The model's structure is read and written as JSON by :mod:`tl_common.keras_config`; the weights'
layouts meet here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from tl_common import keras_config as kc
from tl_common import recipe
from tl_common.errors import UserError
from tl_common.mobilenet_v2 import LAST_FILTERS
from tl_common.outputs import atomic_write_bytes, read_metrics
from tl_torch.keras_weights import (
    EXPORT_KERAS_VERSION,
    load_keras_weights,
    open_keras_file,
    save_keras_weights,
)
from tl_torch.model import KERAS_BN_MOMENTUM, MobileNetV2Base
from tl_torch.module import TransferModule
from tl_torch.padding import pad_amounts
from tl_torch.weights import base_config

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


# ---- Keras -> port ---------------------------------------------------------------------------

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
                      inputs_scaled: bool = False) -> tuple[TransferModule, kc.KerasClassifier]:
    """The port's module holding a whole Keras model's weights."""
    found = kc.inspect_keras_model(path, inputs_scaled=inputs_scaled)
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


# ---- port -> Keras ---------------------------------------------------------------------------

_BLOCK = re.compile(r"^(expanded_conv|block_\d+)_")


def _layer_settings(name: str, kind: str, m: Any, trainable: bool, in_shape: tuple[int, ...],
                    pad_type: str) -> dict[str, Any]:
    """A base layer's Keras configuration (name and inputs aside)."""
    if kind == "Conv2D":
        k, s = m.kernel_size[0], m.stride[0]
        return {"trainable": trainable, "filters": m.out_channels, "kernel_size": [k, k],
                "strides": [s, s], "padding": "same", "use_bias": False, "activation": "linear"}
    if kind == "DepthwiseConv2D":
        s = m.stride[0]
        return {"trainable": trainable, "kernel_size": list(m.kernel_size), "strides": [s, s],
                "padding": "same" if s == 1 else "valid", "depth_multiplier": 1,
                "use_bias": False, "activation": "linear"}
    if kind == "BatchNormalization":
        return {"trainable": trainable, "axis": -1, "momentum": KERAS_BN_MOMENTUM,
                "epsilon": float(m.eps)}
    if kind == "ReLU":
        return {"trainable": trainable, "max_value": 6.0}
    if kind == "ZeroPadding2D":
        h, w, _ = in_shape
        left, right, top, bottom = pad_amounts(h, w, 3, 2, pad_type)
        return {"trainable": trainable, "padding": [[top, bottom], [left, right]]}
    if kind == "Add":
        return {"trainable": trainable}
    raise ValueError(f"no Keras configuration for layer {name} of type {kind}")


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
        name, kind = layer.name, layer.type
        match = _BLOCK.match(name)
        if match and match.group(1) != block:
            block, block_input = match.group(1), previous
        if kind == "InputLayer":
            layers.append(kc.input_layer(name, shapes[name]))
        else:
            args = [kc.keras_tensor(previous, shapes[previous])]
            if kind == "Add":  # the residual: the block's input and its last BatchNorm
                args = [[kc.keras_tensor(block_input, shapes[block_input]), args[0]]]
            settings = _layer_settings(name, kind, layer.module, layer.index >= fine_tune_at,
                                       shapes[previous], base.pad_type)
            layers.append(kc.keras_layer(kind, name, settings, args))
        previous = name
    return kc.functional(f"mobilenetv2_1.00_{image_size}", layers, base.input_layer_name,
                         previous)


def keras_model_config(module: TransferModule, image_size: int) -> dict[str, Any]:
    """The reference's model (``tl_keras.model.build_model``) as a Keras 3 configuration, without
    the reference's own InferenceMode layer: the base is a nested model called with
    ``training=False``."""
    hp = module.hparams
    spec = kc.HeadSpec(image_size, module.classifier.out_features, float(hp.dropout),
                       module.augment is not None, flip_seed=hp.seed + recipe.FLIP_SEED_OFFSET,
                       rotation_seed=hp.seed + recipe.ROTATION_SEED_OFFSET,
                       dropout_seed=hp.seed + recipe.DROPOUT_SEED_OFFSET,
                       rotation_factor=recipe.ROTATION_FACTOR)
    return kc.classifier_config(spec, base_config_json(module.base, image_size, hp.fine_tune_at))


def _empty_layer(group: h5py.Group, key: str, name: str) -> h5py.Group:
    layer = group.create_group(key)
    layer.create_group("vars").attrs["name"] = name
    return layer


def write_keras_weights(module: TransferModule, h5: h5py.File, base_name: str) -> None:
    """``model.weights.h5`` as Keras 3 saves this model: each layer of ``model.layers`` under
    ``layers/<class name in snake case, numbered>/vars/<i>``, nested models under their own
    ``layers``."""
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


# ---- running a Keras model file (in another process: tl_torch imports no TensorFlow) ----------

def keras_available() -> bool:
    return importlib.util.find_spec("keras") is not None


def run_keras(path: Path, images_nhwc: np.ndarray, *, float64: bool = False,
              inputs_scaled: bool = False, project: bool = False) -> np.ndarray:
    """A Keras model file's outputs on images, computed by Keras in a fresh Python process
    (``python -m tl_keras.runner``; ``project``: with this project's Keras layers registered)."""
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "images.npy", Path(tmp) / "out.npy"
        np.save(images, images_nhwc.astype(np.float32))
        command = [sys.executable, "-m", "tl_keras.runner", str(path), str(images), str(out)]
        command += ["--float64"] * float64 + ["--inputs-scaled"] * inputs_scaled
        command += ["--project"] * project
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise UserError(f"Keras could not run {path}: {lines[-1] if lines else 'no message'}")
        return np.load(out)
