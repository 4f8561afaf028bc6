"""``python -m tl_torch.convert`` for MobileNetV3Large, EfficientNetB0 and ResNet50: from-keras
finds the base, its layout and its preprocessing and gives Keras' probabilities; to-onnx and
to-keras give the port's; each base has planted mistakes, each caught by a check of the converter.

Keras models are built in-process with ``weights=None`` at 48 px, their weights those of a port
base with BatchNorm statistics calibrated on the images (activations of order 1), exported with
``save_keras_weights`` and loaded by Keras. Probabilities are judged as the converter judges them:
against the source in float64, within the band measured in the same run
(:func:`tl_torch.conversion_parity.compare`). The CLI runs (Keras in fresh processes, ONNX) are
``slow``.

Run: ``PYTHONPATH=$PWD python -m pytest -p no:cacheprovider tests/test_convert_bases.py -q``
(``-m "not slow"`` for the quick tier).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import torch

import tl_torch.keras_interchange as ki
from parity_tests.pairs import float64_policy
from tl_common import keras_inputs
from tl_common.bases import BASES
from tl_common.errors import UserError
from tl_common.keras_config import float64_config
from tl_keras.bases import keras_application, preprocess_input
from tl_keras.export_config import with_imagenet_rescaling
from tl_keras.model import build_model
from tl_torch import conversion_parity as cp
from tl_torch import convert
from tl_torch.backbones import ResNet50Base, get_backbone
from tl_torch.checkpoint import save_module
from tl_torch.keras_weights import save_keras_weights
from tl_torch.weights import build_base, keras_init_

NEW = ("mobilenet_v3_large", "efficientnet_b0", "resnet50")
SIZE = 48
IMAGES = 6
CLASSES = ("beagle", "husky", "poodle")
#: The head's logits on the images get this spread, so probabilities cover (0, 1).
LOGIT_SPREAD = 2.0


def images() -> torch.Tensor:
    return torch.rand(IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 255


def keras_probabilities(model: keras.Model, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """Keras' probabilities on the images: float32, and the same model in float64 (exact)."""
    x = cp.nhwc(images())
    out32 = keras.ops.convert_to_numpy(model(x, training=False))
    with float64_policy():
        model64 = keras.saving.deserialize_keras_object(
            float64_config(keras.saving.serialize_keras_object(model)))
    model64.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    out64 = keras.ops.convert_to_numpy(model64(x.astype(np.float64), training=False))
    return cp.probabilities(out32, activation), cp.probabilities(out64, activation)


def keras_base(name: str, directory: Path, calibrate_bn, *, imagenet_rescaling: bool = False):
    """Keras' application (weights=None) holding a calibrated port base's weights."""
    generator = torch.Generator().manual_seed(len(name))
    if imagenet_rescaling:  # as Keras builds it for weights="imagenet"
        base = keras_init_(get_backbone(name).build(imagenet_rescaling=True), generator)
    else:
        base = build_base("none", SIZE, generator=generator, base=name)
    calibrate_bn(base, base.preprocess(images()), generator)
    file = save_keras_weights(base, directory / f"{name}.weights.h5")
    kbase = keras_application(name, SIZE, None)
    if imagenet_rescaling:
        kbase = with_imagenet_rescaling(kbase)
    kbase.load_weights(file)
    return kbase


def set_head(model: keras.Model, dense: str, seed: int) -> None:
    """A random head whose logits on the images spread by LOGIT_SPREAD around zero."""
    layer = model.get_layer(dense)
    kernel, _ = layer.get_weights()
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0.0, 1.0, kernel.shape)
    features = keras.ops.convert_to_numpy(
        keras.Model(model.inputs, layer.input)(cp.nhwc(images()), training=False))
    logits = features @ kernel
    kernel *= LOGIT_SPREAD / max(float(logits.std()), 1e-30)
    bias = -(features @ kernel).mean(axis=0) + rng.normal(0.0, 0.3, kernel.shape[1])
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])


def tutorial_model(kbase, *, preprocessing=None, units: int = 3) -> keras.Model:
    """The tutorial's pattern with the base swapped: input -> preprocess_input -> base(x,
    training=False) -> pooling -> dropout -> Dense (softmax over the classes)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = (preprocessing or (lambda t: preprocess_input(kbase, t)))(inputs)
    x = kbase(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(units, activation="softmax" if units > 1 else None,
                                 name="breeds")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def kbases(tmp_path_factory, calibrate_bn) -> dict[tuple[str, bool], keras.Model]:
    """Per (base, ImageNet rescaling): the Keras application holding calibrated weights
    (:func:`keras_base`), built on first use and shared by the tutorial-pattern models built
    around it (which leave it as it is; ``build_model`` freezes its base, so it gets its own)."""
    root = tmp_path_factory.mktemp("kbases")

    class Bases(dict):
        def __missing__(self, key: tuple[str, bool]) -> keras.Model:
            name, imagenet_rescaling = key
            directory = root / f"{name}-{imagenet_rescaling}"
            directory.mkdir()
            self[key] = keras_base(name, directory, calibrate_bn,
                                   imagenet_rescaling=imagenet_rescaling)
            return self[key]

    return Bases()


@pytest.fixture(scope="module")
def models(tmp_path_factory, kbases, calibrate_bn) -> dict[tuple[str, str], Path]:
    """Per base: someone's model in the tutorial's pattern (3 classes, softmax) and the
    reference's (``tl_keras.model.build_model``, as ``tl_keras.train --base`` saves it); built on
    first use."""
    root = tmp_path_factory.mktemp("bases")

    class Models(dict):
        def __missing__(self, key: tuple[str, str]) -> Path:
            name, kind = key
            if kind == "tutorial":
                model = tutorial_model(kbases[name, False])
                set_head(model, "breeds", 1)
            else:
                model = build_model(keras_base(name, root, calibrate_bn), seed=0, num_classes=2)
                set_head(model, "dense", 2)
            path = root / f"{name}-{kind}.keras"
            model.save(path)
            self[key] = path
            return path

    return Models()


#: Keras' float32 and float64 probabilities per file: the planted mistakes change the port only.
_KERAS_PROBABILITIES: dict[Path, tuple[np.ndarray, np.ndarray]] = {}


def from_keras_parity(path: Path, model: keras.Model | None = None) -> cp.Parity:
    """from-keras judged as the converter judges it: the port against Keras in float64."""
    found = convert.inspect_keras_model(path)
    module, _ = convert.module_from_keras(path)
    if path not in _KERAS_PROBABILITIES:
        model = model or keras.models.load_model(path, compile=False)
        _KERAS_PROBABILITIES[path] = keras_probabilities(model, found.activation)
    source32, exact = _KERAS_PROBABILITIES[path]
    return cp.compare("from-keras", str(path), "port", source32,
                      cp.port_probabilities(module.eval(), images()), exact)


# ---- quick tier: from-keras, in-process ----------------------------------------------------------

@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("kind", ["tutorial", "reference"])
def test_from_keras_finds_the_base_and_matches_keras(name, kind, models):
    path = models[name, kind]
    found = convert.inspect_keras_model(path)
    assert found.base == name
    assert found.base_layout == ({"imagenet_rescaling": False} if name == "efficientnet_b0"
                                 else {})
    assert found.scaling == ("resnet50.preprocess_input" if name == "resnet50" else None)
    assert (found.units, found.activation) == ((3, "softmax") if kind == "tutorial" else
                                               (1, "linear"))
    module, _ = convert.module_from_keras(path)
    assert module.hparams.base_config["base"] == name
    assert module.classifier.in_features == BASES[name].features
    features = module.base(module.base.preprocess(images()))
    assert float(features.std()) > 1e-2, "activations vanish: the comparison would mean nothing"
    parity = from_keras_parity(path)
    assert parity.passed, parity.line()
    assert parity.max_abs_probability_difference < 1e-3


def test_port_preprocessing_is_keras_preprocess_input():
    """The framework-free preprocess_input the converter checks against is the port's."""
    x = images()
    for name in NEW:
        base = build_base("none", SIZE, base=name)
        expected = keras_inputs.PREPROCESS_INPUT[name](cp.nhwc(x).astype(np.float64))
        np.testing.assert_allclose(cp.nhwc(base.preprocess(x.double())), expected, rtol=0,
                                   atol=1e-12)


def test_efficientnet_imagenet_layout_is_read_from_the_file(tmp_path, kbases):
    kbase = kbases["efficientnet_b0", True]
    model = tutorial_model(kbase)
    set_head(model, "breeds", 3)
    path = tmp_path / "imagenet-layout.keras"
    model.save(path)
    assert convert.inspect_keras_model(path).base_layout == {"imagenet_rescaling": True}
    parity = from_keras_parity(path, model)
    assert parity.passed, parity.line()


# ---- planted mistakes, one family per base --------------------------------------------------------

def test_resnet_rgb_left_unflipped_is_caught(models, monkeypatch):
    """The port's caffe without the RGB -> BGR flip: same shapes, other probabilities."""
    mean = torch.tensor((103.939, 116.779, 123.68)).view(1, 3, 1, 1)
    monkeypatch.setattr(ResNet50Base, "preprocess", lambda self, x: x - mean.to(x.dtype))
    parity = from_keras_parity(models["resnet50", "tutorial"])
    assert not parity.passed and parity.result_error > parity.band


def test_resnet_model_with_rgb_means_is_refused(tmp_path, kbases):
    """A model that subtracts the means without flipping to BGR is not resnet50's
    preprocess_input: one line naming what is accepted."""
    kbase = kbases["resnet50", False]
    means = np.asarray(keras_inputs.CAFFE_MEAN_BGR[::-1], np.float32)
    model = tutorial_model(kbase, preprocessing=lambda t: t - means)
    path = tmp_path / "rgb.keras"
    model.save(path)
    with pytest.raises(UserError, match=r"not the base's: expected resnet50.preprocess_input"):
        convert.inspect_keras_model(path)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet50"])
def test_head_kernel_reshaped_not_transposed_is_caught(name, models, monkeypatch):
    monkeypatch.setattr(ki, "dense_kernel_to_torch",
                        lambda kernel: np.ascontiguousarray(kernel.reshape(kernel.shape[::-1])))
    parity = from_keras_parity(models[name, "tutorial"])
    assert not parity.passed and parity.result_error > parity.band


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet50", "mobilenet_v3_large"])
def test_mobilenet_v2_head_width_is_refused(name, models, monkeypatch):
    """A converter that expects MobileNetV2's 1280 features before the Dense reads a kernel of
    the base's own width: one line naming both."""
    real = ki.read_dense
    monkeypatch.setattr(ki, "read_dense", lambda path, dense, units, features: real(
        path, dense, units, BASES["mobilenet_v2"].features))
    width = BASES[name].features
    if width == BASES["mobilenet_v2"].features:  # EfficientNetB0: 1280 too, nothing to catch
        convert.module_from_keras(models[name, "tutorial"])
        return
    with pytest.raises(UserError, match=rf"kernel of shape \({width}, 3\); expected \(1280, 3\)"):
        convert.module_from_keras(models[name, "tutorial"])


def test_efficientnet_built_without_the_files_extra_rescaling_is_refused(tmp_path, kbases):
    kbase = kbases["efficientnet_b0", True]
    path = tmp_path / "imagenet-layout.keras"
    tutorial_model(kbase).save(path)
    found = convert.inspect_keras_model(path)
    found.base_layout = {"imagenet_rescaling": False}
    with pytest.raises(UserError, match=r"layer 3 of its base, 'rescaling_1', is a Rescaling"):
        ki.port_base(found, path)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0"])
def test_mobilenet_v2_scaling_before_a_self_scaling_base_is_refused(name, tmp_path, kbases):
    """MobileNetV3 and EfficientNet scale inside: x / 127.5 - 1 before them is a mistake."""
    kbase = kbases[name, False]
    model = tutorial_model(kbase, preprocessing=keras.layers.Rescaling(1 / 127.5, offset=-1))
    path = tmp_path / "scaled-twice.keras"
    model.save(path)
    app = BASES[name].keras_application
    with pytest.raises(UserError, match=rf"before the {app} base is MobileNetV2's "
                                        rf"preprocess_input, not the base's: expected nothing"):
        convert.inspect_keras_model(path)


def test_resnet_without_preprocessing_asks_for_inputs_scaled(tmp_path, kbases):
    kbase = kbases["resnet50", False]
    path = tmp_path / "unscaled.keras"
    tutorial_model(kbase, preprocessing=lambda t: t).save(path)
    with pytest.raises(UserError, match=r"resnet50.preprocess_input\), pass --inputs-scaled"):
        convert.inspect_keras_model(path)
    assert convert.inspect_keras_model(path, inputs_scaled=True).scaling is None


# ---- slow tier: the command line, Keras in fresh processes, ONNX ---------------------------------

@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50"])
def test_cli_from_keras_to_keras_to_onnx(name, models, tmp_path):
    """from-keras of the reference's model (Keras run in fresh processes, float32 and float64),
    to-keras opened by keras.models.load_model in a fresh process with Keras alone, to-onnx in
    onnxruntime: each within its measured band; the Keras file reads back bit for bit. The
    command line on one base (caffe's, the one with preprocessing operations between input and
    base); the parity suite's check 13 runs the same conversions for each base."""
    run = tmp_path / "run"
    first = convert.main(["from-keras", str(models[name, "reference"]), str(run),
                          "--class-names", "cats,dogs"])
    assert first.passed and first.same_classes, first.line()
    back = convert.main(["to-keras", str(run), str(tmp_path / "back.keras")])
    assert back.passed and back.result_error <= back.band, back.line()
    onnx = convert.main(["to-onnx", str(run), str(tmp_path / "m.onnx")])
    assert onnx.passed and onnx.result_error <= onnx.band, onnx.line()
    module, _ = convert.module_from_keras(models[name, "reference"])
    again, _ = convert.module_from_keras(tmp_path / "back.keras")
    for key, value in module.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0"])
def test_port_trained_run_to_onnx_and_keras(name, tmp_path, calibrate_bn):
    """A run of the port itself (as tl_torch.train --base writes model.ckpt) exports to ONNX and
    Keras within the measured band (EfficientNet: the ImageNet Rescaling option, TF-"same" 5x5
    pads; check 13 exports a converted run of each base). BatchNorm is calibrated on the images
    the converter compares on (its default demo images), and the head spreads their logits, as
    for the Keras models."""
    from tl_torch.module import TransferModule

    generator = torch.Generator().manual_seed(9)
    x = cp.comparison_images(None, SIZE)
    base = build_base("none", SIZE, generator=generator, base=name)
    calibrate_bn(base, base.preprocess(x), generator)
    module = TransferModule(base, num_classes=3, class_names=list(CLASSES), image_size=SIZE)
    with torch.no_grad():
        features = base(base.preprocess(x)).mean(dim=(2, 3))
        weight = torch.randn(3, features.shape[1], generator=generator)
        weight *= LOGIT_SPREAD / (features @ weight.T).std()
        module.classifier.weight.copy_(weight)
        module.classifier.bias.copy_(-(features @ weight.T).mean(dim=0))
    save_module(module, tmp_path / "run" / "model.ckpt")
    onnx = convert.main(["to-onnx", str(tmp_path / "run"), str(tmp_path / "m.onnx")])
    assert onnx.passed, onnx.line()
    back = convert.main(["to-keras", str(tmp_path / "run"), str(tmp_path / "m.keras")])
    assert back.passed, back.line()
