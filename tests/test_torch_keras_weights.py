"""Keras weight files without TensorFlow: export/import round trips, the layouts written, finding the
base by structure in whole-model files, errors that name the problem, and no TensorFlow imported.

The files are built with h5py in the layouts Keras writes (legacy HDF5: ``layer_names`` and
``weight_names`` attributes; Keras 3: ``layers/<snake_case class>/vars/<i>`` with the layer's name
as an attribute; ``.keras``: a zip holding ``model.weights.h5``).

Run: ``TL_PARITY_CACHE=/tmp/tlcache python -m pytest tests/test_torch_keras_weights.py -q``
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tl_common.errors import UserError
from tl_torch import MobileNetV2Base, build_base, load_keras_weights, read_base_weights, save_keras_weights
from tl_torch.keras_weights import describe_file, keras_to_torch, open_keras_file, torch_to_keras
from tl_torch.weights import keras_init_

N_KERAS_LAYERS = 154
N_WEIGHTED_LAYERS = 104
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
#: Sub-model names a whole model may give the base: Keras' own, a renamed one, an auto name.
SUB_MODEL_NAMES = ("mobilenetv2_1.00_160", "my_base", "functional_3")


def assert_same_state(a: MobileNetV2Base, b: MobileNetV2Base) -> None:
    """Every tensor bitwise equal (a round trip through float32 files loses nothing)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def n_differing(a: MobileNetV2Base, b: MobileNetV2Base) -> int:
    sa, sb = a.state_dict(), b.state_dict()
    return sum(not torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("num_batches_tracked"))


def names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# ---- layout conversions ----------------------------------------------------------------------

def test_kernel_layout_conversions() -> None:
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 16, 24)).astype(np.float32)          # Keras (kh, kw, in, out)
    weight = keras_to_torch("Conv2D", kernel)
    assert weight.shape == (24, 16, 3, 3)
    assert weight[5, 7, 0, 2] == kernel[0, 2, 7, 5]
    assert np.array_equal(torch_to_keras("Conv2D", weight), kernel)
    depthwise = rng.normal(size=(3, 3, 96, 1)).astype(np.float32)        # Keras (kh, kw, C, 1)
    weight = keras_to_torch("DepthwiseConv2D", depthwise)
    assert weight.shape == (96, 1, 3, 3)
    assert weight[40, 0, 2, 1] == depthwise[2, 1, 40, 0]
    # A reshape keeps the shape and scrambles the values: the permute must not be one.
    assert not np.array_equal(weight, depthwise.reshape(96, 1, 3, 3))
    assert np.array_equal(torch_to_keras("DepthwiseConv2D", weight), depthwise)
    gamma = rng.normal(size=(32,)).astype(np.float32)
    assert keras_to_torch("BatchNormalization", gamma) is gamma


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("file_name", ["base.weights.h5", "base.h5"])
def test_round_trip_is_exact(random_base, tmp_path: Path, file_name: str) -> None:
    source, target = random_base(seed=1), random_base(seed=2)
    assert n_differing(source, target) == 52 + 4 * 52  # every kernel and BN variable differs
    path = save_keras_weights(source, tmp_path / file_name)
    assert path == tmp_path / file_name
    assert sorted(p.name for p in tmp_path.iterdir()) == [file_name]  # no temporary file left
    assert load_keras_weights(target, path) is target
    assert_same_state(source, target)
    # read_base_weights gives the same tensors, keyed like the state dict, in torch layout.
    state = read_base_weights(MobileNetV2Base(), path)
    assert len(state) == 52 + 4 * 52
    for key, array in state.items():
        assert np.array_equal(array, source.state_dict()[key].numpy()), key


def test_legacy_layout(random_base, tmp_path: Path) -> None:
    base = random_base(seed=3)
    path = save_keras_weights(base, tmp_path / "legacy.h5")
    with h5py.File(path, "r") as f:
        layer_names = names(f.attrs["layer_names"])
        assert len(layer_names) == N_KERAS_LAYERS
        assert layer_names[0] == "input_layer" and layer_names[100] == "block_11_expand_relu"
        assert names(f["Conv1"].attrs["weight_names"]) == ["Conv1/kernel"]
        assert names(f["bn_Conv1"].attrs["weight_names"]) == [f"bn_Conv1/{v}" for v in BN_VARIABLES]
        assert names(f["Conv1_relu"].attrs["weight_names"]) == []
        kernel = f["Conv1"]["Conv1/kernel"][()]
        assert kernel.shape == (3, 3, 3, 32) and kernel.dtype == np.float32
        assert np.array_equal(kernel, base.Conv1.weight.detach().permute(2, 3, 1, 0).numpy())
        depthwise = f["block_1_depthwise"]["block_1_depthwise/kernel"][()]
        assert depthwise.shape == (3, 3, 96, 1)
        assert np.array_equal(depthwise, base.block_1_depthwise.weight.detach().permute(2, 3, 0, 1).numpy())
        bn = base.block_5_project_BN
        for variable, tensor in zip(BN_VARIABLES, (bn.weight, bn.bias, bn.running_mean, bn.running_var),
                                    strict=True):
            assert np.array_equal(f["block_5_project_BN"][f"block_5_project_BN/{variable}"][()],
                                  tensor.detach().numpy()), variable
    info = describe_file(path)
    assert (info["layout"], info["whole_model"], info["containers"], info["model_class"]) == (
        "legacy_hdf5", False, ["/"], None)


def test_keras3_layout(random_base, tmp_path: Path) -> None:
    base = random_base(seed=4)
    path = save_keras_weights(base, tmp_path / "k3.weights.h5")
    with h5py.File(path, "r") as f:
        layers = f["layers"]
        assert len(layers) == N_KERAS_LAYERS
        assert layers["input_layer/vars"].attrs["name"] == "input_layer"
        assert layers["conv2d/vars"].attrs["name"] == "Conv1"
        assert layers["batch_normalization/vars"].attrs["name"] == "bn_Conv1"
        assert layers["re_lu/vars"].attrs["name"] == "Conv1_relu"
        assert layers["depthwise_conv2d/vars"].attrs["name"] == "expanded_conv_depthwise"
        assert layers["conv2d_1/vars"].attrs["name"] == "expanded_conv_project"
        assert layers["zero_padding2d/vars"].attrs["name"] == "block_1_pad"
        assert layers["add/vars"].attrs["name"] == "block_2_add"
        assert layers["re_lu_34/vars"].attrs["name"] == "out_relu"  # 35 ReLU layers
        assert len(layers["re_lu/vars"]) == 0
        conv1 = base.Conv1.weight.detach().permute(2, 3, 1, 0).numpy()
        assert np.array_equal(layers["conv2d/vars/0"][()], conv1)
        bn = base.bn_Conv1
        for i, tensor in enumerate((bn.weight, bn.bias, bn.running_mean, bn.running_var)):
            assert np.array_equal(layers[f"batch_normalization/vars/{i}"][()], tensor.detach().numpy()), i
        assert sorted(layers["batch_normalization/vars"]) == ["0", "1", "2", "3"]
    info = describe_file(path)
    assert (info["layout"], info["whole_model"]) == ("keras3", False)


def test_export_refuses_other_names(random_base, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model\.keras"):
        save_keras_weights(random_base(), tmp_path / "model.keras")
    assert list(tmp_path.iterdir()) == []


# ---- whole models -----------------------------------------------------------------------------

def write_legacy_whole_model(base: MobileNetV2Base, path: Path, sub_model: str | None) -> Path:
    """A legacy whole-model ``.h5`` as ``model.save("x.h5")`` writes it: the base nested as
    ``sub_model`` (or its layers inline when None) next to a pooling/dropout/Dense head. Like Keras,
    the nested model lists trainable variables before the moving statistics."""
    flat = save_keras_weights(base, path.with_name("flat-source.h5"))
    rng = np.random.default_rng(0)
    with h5py.File(flat, "r") as src, h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"3.11.3"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps({"class_name": "Functional", "config": {}})
        weights = f.create_group("model_weights")
        head = ["global_average_pooling2d", "dropout", "dense"]
        base_layers = names(src.attrs["layer_names"])
        inline = base_layers if sub_model is None else ["input_layer_1", sub_model]
        weights.attrs["layer_names"] = np.array([n.encode() for n in inline + head])
        for name in inline[:-1] if sub_model else []:
            weights.create_group(name).attrs["weight_names"] = np.array([])
        if sub_model is None:
            for name in base_layers:
                src.copy(src[name], weights, name=name)
        else:
            group = weights.create_group(sub_model)
            listed = [w for n in base_layers for w in names(src[n].attrs["weight_names"])]
            listed.sort(key=lambda w: w.endswith(("moving_mean", "moving_variance")))
            for w in listed:
                group.create_dataset(w, data=src[w.split("/")[0]][w][()])
            group.attrs["weight_names"] = np.array(listed, dtype=object)
        for name in head[:2]:
            weights.create_group(name).attrs["weight_names"] = np.array([])
        dense = weights.create_group("dense")
        dense.attrs["weight_names"] = np.array([b"dense/kernel", b"dense/bias"])
        dense.create_dataset("dense/kernel", data=rng.normal(size=(1280, 1)).astype(np.float32))
        dense.create_dataset("dense/bias", data=np.zeros(1, np.float32))
    flat.unlink()
    return path


@pytest.mark.parametrize("sub_model", SUB_MODEL_NAMES)
def test_base_found_in_legacy_whole_model_by_structure(random_base, tmp_path: Path, sub_model: str) -> None:
    source = random_base(seed=5)
    path = write_legacy_whole_model(source, tmp_path / "model.h5", sub_model)
    target = load_keras_weights(random_base(seed=6), path)
    assert_same_state(source, target)
    info = describe_file(path)
    assert info["whole_model"] is True and info["model_class"] == "Functional"
    assert f"/model_weights/{sub_model}" in info["containers"]


def test_base_inline_in_legacy_whole_model(random_base, tmp_path: Path) -> None:
    """Layers of the base directly in the model (no sub-model), next to the head's Dense."""
    source = random_base(seed=7)
    path = write_legacy_whole_model(source, tmp_path / "inline.h5", None)
    assert_same_state(source, load_keras_weights(random_base(seed=8), path))


def write_keras_archive(base: MobileNetV2Base, path: Path, *, with_weights: bool = True) -> Path:
    """A ``.keras`` zip as ``model.save("x.keras")`` writes it, the base nested as ``functional``."""
    flat = save_keras_weights(base, path.with_name("flat-source.weights.h5"))
    inner = path.with_name("model.weights.h5")
    with h5py.File(flat, "r") as src, h5py.File(inner, "w") as f:
        layers = f.create_group("layers")
        f.create_group("vars")
        layers.create_group("input_layer/vars").attrs["name"] = "input_layer_1"
        nested = layers.create_group("functional")
        src.copy(src["layers"], nested, name="layers")
        nested.create_group("vars").attrs["name"] = "mobilenetv2_1.00_160"
        layers.create_group("global_average_pooling2d/vars").attrs["name"] = "global_average_pooling2d"
        layers.create_group("dropout/vars").attrs["name"] = "dropout"
        dense = layers.create_group("dense/vars")
        dense.attrs["name"] = "dense"
        dense.create_dataset("0", data=np.ones((1280, 1), np.float32))
        dense.create_dataset("1", data=np.zeros(1, np.float32))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", json.dumps({"class_name": "Functional"}))
        if with_weights:
            zf.write(inner, "model.weights.h5")
    flat.unlink()
    inner.unlink()
    return path


def test_base_found_in_keras_archive(random_base, tmp_path: Path) -> None:
    source = random_base(seed=9)
    path = write_keras_archive(source, tmp_path / "model.keras")
    assert_same_state(source, load_keras_weights(random_base(seed=10), path))
    info = describe_file(path)
    assert (info["layout"], info["whole_model"]) == ("keras3", True)
    assert "/layers/functional" in info["containers"]


# ---- the demo weights -------------------------------------------------------------------------

def test_demo_weights_load_and_survive_round_trips(demo_weights: Path, tmp_path: Path) -> None:
    demo = build_base(demo_weights)
    assert demo.weights_source == str(demo_weights)
    random = build_base("none", generator=torch.Generator().manual_seed(0))
    assert n_differing(demo, random) == 52 + 4 * 52
    # Values straight from the file, in torch layout (a swapped mean/variance would show here).
    with h5py.File(demo_weights, "r") as f:
        sub = f["model_weights/mobilenetv2_1.00_160"]
        kernel = sub["Conv1/kernel"][()]
        assert np.array_equal(demo.Conv1.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1))
        depthwise = sub["block_3_depthwise/kernel"][()]
        assert np.array_equal(demo.block_3_depthwise.weight.detach().numpy(), depthwise.transpose(2, 3, 0, 1))
        assert np.array_equal(demo.Conv_1_bn.running_var.numpy(), sub["Conv_1_bn/moving_variance"][()])
        assert np.array_equal(demo.Conv_1_bn.running_mean.numpy(), sub["Conv_1_bn/moving_mean"][()])
        assert not np.array_equal(sub["Conv_1_bn/moving_variance"][()], sub["Conv_1_bn/moving_mean"][()])
    info = describe_file(demo_weights)
    assert (info["layout"], info["whole_model"], info["model_class"]) == ("legacy_hdf5", True, "Functional")
    assert "/model_weights/mobilenetv2_1.00_160" in info["containers"]
    for name in ("demo.weights.h5", "demo.h5"):
        path = save_keras_weights(demo, tmp_path / name)
        back = load_keras_weights(keras_init_(MobileNetV2Base()), path)
        assert_same_state(demo, back)
        assert_same_state(demo, build_base(path))


# ---- errors -----------------------------------------------------------------------------------

def rewrite(path: Path, dataset: str, array: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        del f[dataset]
        f.create_dataset(dataset, data=array)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.h5"
    with pytest.raises(UserError, match=re.escape(f"{path} does not exist")):
        load_keras_weights(MobileNetV2Base(), path)
    with pytest.raises(UserError, match="neither a weight source"):
        build_base(path)


def test_text_file_named_h5(tmp_path: Path) -> None:
    path = tmp_path / "weights.h5"
    path.write_text("not weights\n")
    with pytest.raises(UserError, match="is not an HDF5 or .keras file"):
        load_keras_weights(MobileNetV2Base(), path)
    with pytest.raises(UserError, match="is not an HDF5 or .keras file"):
        build_base(path)


def test_zip_without_weights_named_keras(random_base, tmp_path: Path) -> None:
    path = write_keras_archive(random_base(), tmp_path / "model.keras", with_weights=False)
    with pytest.raises(UserError, match=r"zip archive without model\.weights\.h5"):
        load_keras_weights(MobileNetV2Base(), path)
    with pytest.raises(UserError, match=r"without model\.weights\.h5"):
        open_keras_file(path)


@pytest.mark.parametrize(("file_name", "dataset"), [
    ("half.h5", "Conv1/Conv1/kernel"),
    ("half.weights.h5", "layers/conv2d/vars/0"),
])
def test_wrong_shape_names_the_layer(random_base, tmp_path: Path, file_name: str, dataset: str) -> None:
    """A Conv1 with 16 filters, as in MobileNetV2 alpha 0.5: refused, the base left untouched."""
    path = save_keras_weights(random_base(seed=11), tmp_path / file_name)
    rewrite(path, dataset, np.zeros((3, 3, 3, 16), np.float32))
    target = random_base(seed=12)
    untouched = random_base(seed=12)
    with pytest.raises(UserError, match=re.escape("layer Conv1: kernel has shape (3, 3, 3, 16), "
                                                  "expected (3, 3, 3, 32)")):
        load_keras_weights(target, path)
    assert_same_state(target, untouched)
    with pytest.raises(UserError, match="Conv1"):
        build_base(path)


def test_extra_layer_names_it(random_base, tmp_path: Path) -> None:
    """Weights of MobileNetV2(include_top=True) are not the base's alone."""
    path = save_keras_weights(random_base(), tmp_path / "top.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["layer_names"] = np.array([*f.attrs["layer_names"], b"predictions"])
        group = f.create_group("predictions")
        group.attrs["weight_names"] = np.array([b"predictions/kernel", b"predictions/bias"])
        group.create_dataset("predictions/kernel", data=np.zeros((1280, 1000), np.float32))
        group.create_dataset("predictions/bias", data=np.zeros(1000, np.float32))
    with pytest.raises(UserError, match="layer predictions is not part of MobileNetV2"):
        load_keras_weights(MobileNetV2Base(), path)
    with pytest.raises(UserError, match="predictions"):
        build_base(path)


def test_extra_layer_in_keras3_layout_names_it(random_base, tmp_path: Path) -> None:
    path = save_keras_weights(random_base(), tmp_path / "top.weights.h5")
    with h5py.File(path, "r+") as f:
        group = f.create_group("layers/dense/vars")
        group.attrs["name"] = "predictions"
        group.create_dataset("0", data=np.zeros((1280, 1000), np.float32))
        group.create_dataset("1", data=np.zeros(1000, np.float32))
    with pytest.raises(UserError, match="layer predictions is not part of MobileNetV2"):
        load_keras_weights(MobileNetV2Base(), path)


@pytest.mark.parametrize("file_name", ["short.h5", "short.weights.h5"])
def test_missing_layer_names_it(random_base, tmp_path: Path, file_name: str) -> None:
    path = save_keras_weights(random_base(), tmp_path / file_name)
    with h5py.File(path, "r+") as f:
        if "layers" in f:
            del f["layers/batch_normalization_51"]   # the 52nd BatchNorm: Conv_1_bn
        else:
            f.attrs["layer_names"] = np.array([n for n in f.attrs["layer_names"] if n != b"Conv_1_bn"])
            del f["Conv_1_bn"]
    with pytest.raises(UserError, match="layer Conv_1_bn is missing"):
        load_keras_weights(MobileNetV2Base(), path)


def test_missing_variable_names_it(random_base, tmp_path: Path) -> None:
    path = save_keras_weights(random_base(), tmp_path / "three.h5")
    with h5py.File(path, "r+") as f:
        group = f["bn_Conv1"]
        group.attrs["weight_names"] = np.array([f"bn_Conv1/{v}".encode() for v in BN_VARIABLES[:3]])
    with pytest.raises(UserError, match="layer bn_Conv1 has 3 variables, expected 4"):
        load_keras_weights(MobileNetV2Base(), path)


def test_file_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"input_layer"])
        f.create_group("input_layer").attrs["weight_names"] = np.array([])
    with pytest.raises(UserError, match="does not hold a MobileNetV2 base .* layer Conv1 is missing"):
        load_keras_weights(MobileNetV2Base(), path)


# ---- no TensorFlow ------------------------------------------------------------------------------

NO_TENSORFLOW_SCRIPT = """
import sys, tempfile, pathlib
import tl_torch
from tl_torch import build_base, load_keras_weights, save_keras_weights, feature_extractor
folder = pathlib.Path(tempfile.mkdtemp())
base = build_base("none")
for name in ("a.weights.h5", "a.h5"):
    load_keras_weights(build_base("none"), save_keras_weights(base, folder / name))
build_base("demo")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")))
"""


@pytest.mark.slow
def test_no_tensorflow_imported(demo_weights: Path) -> None:
    """Importing the port, building, exporting, importing and loading the demo weights never
    import TensorFlow or Keras (the demo fixture has cached the file for the child's cache)."""
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW_SCRIPT], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
