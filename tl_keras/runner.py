"""Run a whole Keras model file on images, in float32 as saved or rebuilt in float64 (the exact
answer a conversion is judged against). ``tl_torch.convert`` starts it in a fresh process, so that
the port's processes import no TensorFlow.

Run::

    python -m tl_keras.runner MODEL.keras|MODEL.h5 IMAGES.npy OUT.npy [--float64]
        [--inputs-scaled] [--base BASE] [--project]

``IMAGES.npy``: NHWC float32 pixels in [0, 255]; ``OUT.npy``: the model's outputs, float64.
``--inputs-scaled``: the model takes its base's ``preprocess_input`` applied already (it has no
preprocessing of its own): ``x / 127.5 - 1`` for MobileNetV2 (the default ``--base``), "caffe"
for ``--base resnet50`` (:data:`tl_common.keras_inputs.PREPROCESS_INPUT`).
Without ``--project`` the model must load with Keras alone: this project's registered layers
are withdrawn first, so a file that needs them fails here as it would anywhere else.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import zipfile
from pathlib import Path

# The package's __init__ (TensorFlow's environment, import order, InferenceMode registered)
# has run before this module: it is tl_keras.runner.
import keras
import numpy as np

from tl_common.bases import BASES, DEFAULT_BASE
from tl_common.errors import run_main
from tl_common.keras_config import float64_config, read_model_config
from tl_common.keras_inputs import PREPROCESS_INPUT

#: The package name this project's Keras layers are registered under.
PROJECT_PACKAGE = "tl_keras"


def withdraw_project_layers() -> list[str]:
    """Unregister this project's Keras layers; returns their registered names."""
    objects = keras.saving.get_custom_objects()
    names = [name for name in objects if name.startswith(f"{PROJECT_PACKAGE}>")]
    for name in names:
        del objects[name]
    return names


def load_float64(path: Path) -> keras.Model:
    """The model rebuilt with every float32 dtype made float64, its weights loaded into it."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    config = float64_config(read_model_config(path))
    if not zipfile.is_zipfile(path):  # a whole-model .h5: the weights are in the same file
        model = keras.models.model_from_json(json.dumps(config))
        model.load_weights(path)
        return model
    model = keras.saving.deserialize_keras_object(config)
    with zipfile.ZipFile(path) as zf, tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        weights.write_bytes(zf.read("model.weights.h5"))
        model.load_weights(weights)
    return model


def outputs(path: Path, images: np.ndarray, *, float64: bool = False,
            inputs_scaled: bool = False, base: str = DEFAULT_BASE) -> np.ndarray:
    """The model's outputs on NHWC [0, 255] images, as float64 numbers (``inputs_scaled``:
    ``base``'s ``preprocess_input`` applied to them first)."""
    if float64:
        model = load_float64(path)
    else:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    x = images.astype("float64" if float64 else "float32")
    if inputs_scaled:
        x = PREPROCESS_INPUT[base](x)
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tl_keras.runner",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="Keras model file (.keras, or .h5)")
    parser.add_argument("images", type=Path, help="NHWC float32 [0, 255] images (.npy)")
    parser.add_argument("out", type=Path, help="where the outputs go (.npy, float64)")
    parser.add_argument("--float64", action="store_true", help="rebuild the model in float64")
    parser.add_argument("--inputs-scaled", action="store_true",
                        help="apply the base's preprocess_input first (the model does not)")
    parser.add_argument("--base", choices=list(BASES), default=DEFAULT_BASE,
                        help="whose preprocess_input --inputs-scaled applies")
    parser.add_argument("--project", action="store_true",
                        help="keep this project's Keras layers registered")
    args = parser.parse_args(argv)
    if args.project:
        # tl_keras loads its modules on first use: the one that registers the layers, now.
        importlib.import_module(f"{PROJECT_PACKAGE}.model")
    else:
        withdraw_project_layers()
    np.save(args.out, outputs(args.model, np.load(args.images), float64=args.float64,
                              inputs_scaled=args.inputs_scaled, base=args.base))


if __name__ == "__main__":
    run_main(main)
