"""``python -m tl_keras.runner``: a Keras model file run on images, float32 as saved and rebuilt in
float64, as ``tl_torch.convert`` runs it in a fresh process. Small models here; the converter's
own tests run it on MobileNetV2 classifiers. Run: ``python -m pytest tests/test_keras_runner.py -q``.
"""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from tl_common.recipe import scale_pixels
from tl_keras import runner
from tl_keras.model import InferenceMode


def small_model(wrapped: bool = False) -> keras.Model:
    inputs = keras.Input((4, 4, 3))
    inner = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2, name="dense")])
    outputs = InferenceMode(inner)(inputs) if wrapped else inner(inputs)
    return keras.Model(inputs, outputs)


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (5, 4, 4, 3)).astype(np.float32)


def test_float32_and_float64_outputs(tmp_path, images):
    model = small_model()
    path = tmp_path / "m.keras"
    model.save(path)
    own = keras.ops.convert_to_numpy(model(images))
    out32 = runner.outputs(path, images)
    assert out32.dtype == np.float64 and np.array_equal(out32, own.astype(np.float64))
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer(index=1).get_weights())
    exact = images.reshape(5, -1).astype(np.float64) @ kernel + bias
    # float64 agrees with numpy's float64 product to float64 rounding; float32 does not.
    out64 = runner.outputs(path, images, float64=True)
    assert np.abs(out64 - exact).max() < 1e-9 < np.abs(out32 - exact).max()
    scaled = runner.outputs(path, images, float64=True, inputs_scaled=True)
    assert np.abs(scaled - (scale_pixels(images.reshape(5, -1).astype(np.float64)) @ kernel
                            + bias)).max() < 1e-9
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.mark.slow
def test_project_layers_only_with_project(tmp_path, images):
    """A file holding this project's InferenceMode layer loads with --project only: without it,
    the runner is Keras alone, as a user's would be."""
    path, data = tmp_path / "wrapped.keras", tmp_path / "images.npy"
    model = small_model(wrapped=True)
    model.save(path)
    np.save(data, images)

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tl_keras.runner", str(path), str(data),
                               str(tmp_path / "out.npy"), *flags], capture_output=True, text=True)

    refused = run()
    assert refused.returncode != 0 and "InferenceMode" in refused.stderr
    assert run("--project").returncode == 0
    assert np.array_equal(np.load(tmp_path / "out.npy"),
                          keras.ops.convert_to_numpy(model(images)).astype(np.float64))
