"""Tests of ``python -m tl_torch.convert``: from-keras -> predict, to-keras, to-onnx, and the
one-line errors for models whose head or input side is not the recipe's.

Keras models are built in-process at 96 px with the demo weights' base (``parity_tests`` has
the numeric parity rows); the CLI runs that start Keras in fresh processes are ``slow``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_common.errors import UserError, run_main
from tl_torch import convert, predict
from tl_torch.data import load_images
from tl_torch.model import MobileNetV2Base
from tl_torch.module import TransferModule
from tl_torch.weights import base_config

pytestmark = pytest.mark.slow  # conversions run Keras in another process

SIZE = 96


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory) -> dict[str, Path]:
    """The reference's model (two classes) and models whose head or input does not fit."""
    import keras

    import tl_keras  # noqa: F401
    from tl_keras import model as kmodel
    from tl_keras.train import save_model

    root = tmp_path_factory.mktemp("keras")
    base = kmodel.build_base("demo", SIZE)
    recipe = kmodel.build_model(base, seed=0)
    dense = recipe.get_layer("dense")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 5, bias + 0.3])
    save_model(recipe, root / "recipe.keras")

    def other(head: str, scaling: bool = True) -> Path:
        inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs) if scaling else inputs
        x = base(x)
        if head == "flatten":
            x = keras.layers.Flatten(name="flatten")(x)
        else:
            x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(3, activation="softmax", name="breeds")(x)
        path = root / f"{head}-{scaling}.keras"
        keras.Model(inputs, outputs).save(path)
        return path

    return {"recipe": root / "recipe.keras", "flatten": other("flatten"),
            "unscaled": other("gap", scaling=False)}


def test_from_keras_then_predict(keras_models, tmp_path, capsys):
    module, found = convert.module_from_keras(keras_models["recipe"], class_names=["cats", "dogs"])
    assert (found.image_size, found.units, found.activation, found.dropout) == (SIZE, 1, "linear",
                                                                                0.2)
    assert found.augmentation == ["RandomFlip", "RandomRotation"]
    assert found.scaling == "mobilenet_v2.preprocess_input"
    out = tmp_path / "run"
    convert.save_module(module, out / "model.ckpt")
    # A run folder of its own: plain data, the model's settings inside.
    hparams = torch.load(out / "model.ckpt", weights_only=True)["hyper_parameters"]
    assert (hparams["class_names"], hparams["image_size"], hparams["dropout"]) == (
        ["cats", "dogs"], SIZE, 0.2)
    assert hparams["base_config"] == base_config("demo")
    image = tmp_path / "cat.jpg"
    from tl_common.demo import draw_animal

    draw_animal(np.random.default_rng(0), dog=False).save(image)
    run_main(predict.main, [str(out), str(image)])
    (line,) = capsys.readouterr().out.strip().splitlines()
    _, name, prob = line.split("\t")
    with torch.no_grad():
        logit = float(module.eval()(load_images([str(image)], SIZE))[0])
    assert name == ("dogs" if logit > 0 else "cats")
    assert float(prob) == pytest.approx(1 / (1 + np.exp(-abs(logit))), abs=5e-5)


def test_head_that_does_not_fit_is_named(keras_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(convert.main, ["from-keras", str(keras_models["flatten"]), str(tmp_path)])
    assert exit_info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "layer 'flatten' (Flatten)" in err and "GlobalAveragePooling2D" in err
    assert not (tmp_path / "model.ckpt").exists()


def test_model_without_scaling_needs_inputs_scaled(keras_models):
    with pytest.raises(UserError, match="--inputs-scaled"):
        convert.inspect_keras_model(keras_models["unscaled"])
    found = convert.inspect_keras_model(keras_models["unscaled"], inputs_scaled=True)
    assert (found.units, found.activation, found.scaling) == (3, "softmax", None)


def test_wrong_class_name_count(keras_models):
    with pytest.raises(UserError, match="names 3 classes; the model's head has 2"):
        convert.module_from_keras(keras_models["recipe"], class_names=["a", "b", "c"])


def test_torchvision_run_does_not_go_to_keras(tmp_path):
    module = TransferModule(MobileNetV2Base(**base_config("torchvision")), fast=False)
    with pytest.raises(UserError, match="only runs with Keras weights convert to Keras"):
        convert.write_keras_model(module, SIZE, tmp_path / "x.keras")


def test_to_keras_writes_the_reference_layout(keras_models, tmp_path):
    module, _ = convert.module_from_keras(keras_models["recipe"])
    path = convert.write_keras_model(module, SIZE, tmp_path / "m.keras")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
        config = json.loads(zf.read("config.json"))
    assert [layer["class_name"] for layer in config["config"]["layers"]] == [
        "InputLayer", "Sequential", "TrueDivide", "Subtract", "Functional",
        "GlobalAveragePooling2D", "Dropout", "Dense"]
    back, _ = convert.module_from_keras(path)
    for key, value in module.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


@pytest.mark.long
@pytest.mark.slow
def test_cli_round_trip_through_fresh_keras_processes(keras_models, tmp_path):
    """from-keras (Keras run in a fresh process, float32 and float64), then to-keras opened by
    keras.models.load_model in a fresh process with only Keras imported, then to-onnx: each
    within its measured band."""
    run = tmp_path / "run"
    first = convert.main(["from-keras", str(keras_models["recipe"]), str(run),
                          "--class-names", "cats,dogs"])
    assert first.passed and first.same_classes
    assert json.loads((run / "conversion.json").read_text())["passed"] is True
    back = convert.main(["to-keras", str(run), str(tmp_path / "back.keras")])
    assert back.passed and back.result_error <= back.band
    onnx = convert.main(["to-onnx", str(run), str(tmp_path / "m.onnx")])
    assert onnx.passed and onnx.result_error <= onnx.band
