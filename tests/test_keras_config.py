"""The framework-free Keras model configuration (``tl_common/keras_config.py``): what the writer
builds, the reader finds again; a head that does not fit is named in one line. No Keras, no torch:
plain JSON in a ``.keras`` zip. Run: ``python -m pytest tests/test_keras_config.py -q``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tl_common import keras_config as kc
from tl_common import recipe
from tl_common.errors import UserError

SIZE = 96


def tiny_base(size: int) -> dict:
    """A stand-in for MobileNetV2's configuration: what the reader looks for (Conv1 ... out_relu)
    with the output shape the writer reads."""
    image, features = (size, size, 3), (size // 32, size // 32, 1280)
    layers = [kc.input_layer("input_1", image),
              kc.keras_layer("Conv2D", "Conv1", {"filters": 1280}, [kc.keras_tensor("input_1",
                                                                                    image)]),
              kc.keras_layer("ReLU", "out_relu", {"max_value": 6.0},
                             [kc.keras_tensor("Conv1", features)])]
    return kc.functional(f"mobilenetv2_1.00_{size}", layers, "input_1", "out_relu")


def write(path: Path, config: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", json.dumps(config))
    return path


def spec(**changes) -> kc.HeadSpec:
    values = dict(image_size=SIZE, units=1, dropout=recipe.DROPOUT, augment=True, flip_seed=7,
                  rotation_seed=8, dropout_seed=9, rotation_factor=recipe.ROTATION_FACTOR)
    return kc.HeadSpec(**{**values, **changes})


def test_written_classifier_reads_back(tmp_path):
    path = write(tmp_path / "m.keras", kc.classifier_config(spec(), tiny_base(SIZE)))
    found = kc.inspect_keras_model(path)
    assert (found.image_size, found.units, found.activation, found.dense, found.dropout) == (
        SIZE, 1, "linear", "dense", recipe.DROPOUT)
    assert found.augmentation == ["RandomFlip", "RandomRotation"]
    assert found.scaling == "mobilenet_v2.preprocess_input"
    layers = {layer["name"]: layer for layer in kc.read_model_config(path)["config"]["layers"]}
    rotation = layers["data_augmentation"]["config"]["layers"][2]["config"]
    assert rotation["factor"] == [-recipe.ROTATION_FACTOR, recipe.ROTATION_FACTOR]
    assert rotation["seed"] == 8
    assert layers["true_divide"]["inbound_nodes"][0]["args"][1] == recipe.PIXEL_SCALE
    assert layers[f"mobilenetv2_1.00_{SIZE}"]["inbound_nodes"][0]["kwargs"] == {"training": False}


def test_without_augmentation_and_with_n_classes(tmp_path):
    path = write(tmp_path / "m.keras",
                 kc.classifier_config(spec(image_size=64, augment=False, units=3, dropout=0.3),
                                     tiny_base(64)))
    found = kc.inspect_keras_model(path)
    assert (found.image_size, found.units, found.dropout, found.augmentation) == (64, 3, 0.3, [])


def test_head_that_does_not_fit_is_one_line(tmp_path):
    config = kc.classifier_config(spec(), tiny_base(SIZE))
    pooling = next(x for x in config["config"]["layers"]
                   if x["class_name"] == "GlobalAveragePooling2D")
    pooling["class_name"] = "Flatten"
    with pytest.raises(UserError, match=r"layer 'global_average_pooling2d' \(Flatten\) after "
                                        r"the MobileNetV2 base does not fit"):
        kc.inspect_keras_model(write(tmp_path / "m.keras", config))


def test_missing_scaling_asks_for_inputs_scaled(tmp_path):
    config = kc.classifier_config(spec(augment=False), tiny_base(SIZE))
    layers = config["config"]["layers"]
    # The base called on the input directly: no divide, no subtract.
    config["config"]["layers"] = [x for x in layers if x["name"] not in ("true_divide",
                                                                         "subtract")]
    base = next(x for x in config["config"]["layers"] if x["class_name"] == "Functional")
    base["inbound_nodes"][0]["args"] = [kc.keras_tensor("input_layer", (SIZE, SIZE, 3))]
    path = write(tmp_path / "m.keras", config)
    with pytest.raises(UserError, match="pass --inputs-scaled"):
        kc.inspect_keras_model(path)
    assert kc.inspect_keras_model(path, inputs_scaled=True).scaling is None


def test_float64_config_retypes_every_float32():
    config = {"dtype": "float32", "layers": [{"dtype": {"config": {"name": "float32"}}}],
              "name": "float32_name"}
    assert kc.float64_config(config) == {"dtype": "float64", "name": "float32_name",
                                         "layers": [{"dtype": {"config": {"name": "float64"}}}]}


def test_framework_free():
    """Imported alone, the reader and the recipe's facts bring no framework with them."""
    code = ("import sys, tl_common.keras_config, tl_common.recipe; "
            "bad = {'torch', 'tensorflow', 'keras'} & set(sys.modules); assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
