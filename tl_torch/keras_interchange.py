"""The torch side of moving whole classifiers between Keras and the port: a Keras model's
weights into a :class:`TransferModule` (any of the bases: the right port base is built from what
:mod:`tl_common.keras_config` finds, its layer list checked against Keras', its weights loaded by
name and shape), the Dense layer's layouts, and a Keras model file run by Keras in another
process (``python -m tl_keras.runner``: this package imports no TensorFlow).

The way back, a module out as a Keras 3 ``.keras`` file, is :mod:`tl_torch.keras_export`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tl_common import keras_config as kc
from tl_common.bases import BASES, DEFAULT_BASE
from tl_common.errors import UserError
from tl_common.mobilenet_v2 import LAST_FILTERS
from tl_common.outputs import read_metrics
from tl_torch.backbones import backbone_of
from tl_torch.keras_weights import (
    load_keras_weights,
    open_keras_file,
)
from tl_torch.model import MobileNetV2Base
from tl_torch.module import TransferModule
from tl_torch.weights import base_config, make_base

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

def read_dense(path: Path, name: str, units: int, features: int = LAST_FILTERS
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """The Dense layer's kernel (features, units) and bias, from the outermost model holding it;
    ``features``: the base's output width (1280 for MobileNetV2)."""
    kfile = open_keras_file(path)
    try:
        for container in sorted(kfile.containers, key=lambda c: len(c.where)):
            found = container.layers.get(name)
            if found is None:
                continue
            keys = ("0", "1") if kfile.keras3 else ("kernel", "bias")
            kernel = np.asarray(found[keys[0]], np.float32)
            bias = np.asarray(found[keys[1]], np.float32) if keys[1] in found else None
            if kernel.shape != (features, units):
                raise UserError(f"{path}: Dense {name!r} has a kernel of shape {kernel.shape}; "
                                f"expected ({features}, {units}) after the base's pooling")
            return kernel, bias
    finally:
        kfile.close()
    raise UserError(f"{path} holds no weights for its Dense layer {name!r}")


def keras_base_layers(path: Path) -> list[tuple[str, str]] | None:
    """(type, name) of each layer of the model's nested base, InputLayer first; None for a
    MobileNetV2 whose layers sit inline in the outer model."""
    config = kc.read_model_config(path)
    inner = kc.inner_model(kc.chain(config, path)[1])
    if inner is None:
        return None
    # Operations on symbolic tensors (MobileNetV3's ``x + 3``) are graph nodes, not layers.
    return [(x["class_name"], kc.layer_name(x)) for x in inner["config"]["layers"]
            if not str(x.get("module", "")).startswith("keras.src.ops")]


def check_base_layers(path: Path, base: nn.Module) -> None:
    """The Keras base's layer types, in order, are the port's: another member of the family
    (ResNet101, EfficientNetB1, a minimalistic MobileNetV3) is named, not half loaded. Names
    are compared by the weight import, for the layers that hold weights (Keras numbers its
    unnamed layers, ``re_lu_3``, per session)."""
    keras_layers = keras_base_layers(path)
    if keras_layers is None:
        return
    ours = [(layer.type, layer.name) for layer in base.keras_layers]
    app = backbone_of(base).keras_application
    for i, (theirs, mine) in enumerate(zip(keras_layers, ours, strict=False)):
        if theirs[0] != mine[0]:
            raise UserError(f"{path}: layer {i} of its base, {theirs[1]!r}, is a {theirs[0]}, "
                            f"where {app}(include_top=False) has the {mine[0]} {mine[1]!r}: "
                            f"expected the {len(ours)} layers of {app}")
    if len(keras_layers) != len(ours):
        raise UserError(f"{path}: its base has {len(keras_layers)} layers; "
                        f"{app}(include_top=False) has {len(ours)}")


def port_base(found: kc.KerasClassifier, path: Path) -> nn.Module:
    """The port's base for the Keras model's, its layers checked and its weights loaded."""
    if found.base == DEFAULT_BASE:
        base = MobileNetV2Base(**base_config(str(path)))
    else:
        base = make_base({"base": found.base, **found.base_layout})
    check_base_layers(path, base)
    load_keras_weights(base, path)
    base.weights_source = str(path)
    return base.eval()


def module_from_keras(path: Path, *, class_names: list[str] | None = None,
                      inputs_scaled: bool = False) -> tuple[TransferModule, kc.KerasClassifier]:
    """The port's module holding a whole Keras model's weights."""
    found = kc.inspect_keras_model(path, inputs_scaled=inputs_scaled)
    names = class_names_for(path, found.units, class_names)
    kernel, bias = read_dense(path, found.dense, found.units, BASES[found.base].features)
    weight, bias = dense_kernel_to_torch(kernel), dense_bias(bias, found.units)
    if found.units == 2:  # softmax over 2 = sigmoid of the difference: the port's one logit
        weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
    module = TransferModule(port_base(found, path), dropout=found.dropout,
                            augment=bool(found.augmentation), num_classes=len(names),
                            class_names=names, image_size=found.image_size)
    with torch.no_grad():
        module.classifier.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        module.classifier.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return module, found


# ---- running a Keras model file (in another process: tl_torch imports no TensorFlow) ----------

def keras_available() -> bool:
    return importlib.util.find_spec("keras") is not None


def run_keras(path: Path, images_nhwc: np.ndarray, *, float64: bool = False,
              inputs_scaled: bool = False, project: bool = False,
              base: str = DEFAULT_BASE) -> np.ndarray:
    """A Keras model file's outputs on images, computed by Keras in a fresh Python process
    (``python -m tl_keras.runner``; ``project``: with this project's Keras layers registered;
    ``inputs_scaled``: the images go through ``base``'s ``preprocess_input`` first)."""
    with tempfile.TemporaryDirectory() as tmp:
        images, out = Path(tmp) / "images.npy", Path(tmp) / "out.npy"
        np.save(images, images_nhwc.astype(np.float32))
        command = [sys.executable, "-m", "tl_keras.runner", str(path), str(images), str(out)]
        command += ["--float64"] * float64 + ["--inputs-scaled"] * inputs_scaled
        command += ["--project"] * project + ["--base", base]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise UserError(f"Keras could not run {path}: {lines[-1] if lines else 'no message'}")
        return np.load(out)
