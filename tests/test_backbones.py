"""The bases of tl_torch.backbones against the Keras applications themselves (``weights=None``).

For MobileNetV3Large, EfficientNetB0 and ResNet50 (and MobileNetV2 where the same check applies):
the layer table (count, names, types, order), the parameter counts at every fine-tune point, the
default fine-tune point, preprocessing (Keras' ``preprocess_input`` + the model's own
preprocessing layers), BatchNorm and Dropout in inference mode, and Keras' legacy weight files
both ways. Every layer's output in float64 and float32 against Keras, training steps, and the
planted mistakes that change the numbers are the parity suite's check 20
(``parity_tests/test_bases.py``).

Run: ``PYTHONPATH=$PWD python -m pytest -p no:cacheprovider tests/test_backbones.py -q``
(``-m "not slow"`` for the quick tier).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from torch import nn

import tl_torch.backbones.efficientnet as efficientnet
import tl_torch.backbones.layers as layers
from parity_tests import checks_bases, pairs
from tl_common import bands
from tl_common.errors import UserError
from tl_keras.bases import fresh_layer_names
from tl_torch.backbones import BACKBONES, RECIPE_FINE_TUNE_AT, RECIPE_LAYERS, get_backbone
from tl_torch.freezing import count_params, freeze
from tl_torch.keras_weights import load_keras_weights, save_keras_weights

NEW = ("mobilenet_v3_large", "efficientnet_b0", "resnet50")
ALL = ("mobilenet_v2", *NEW)
#: Even at every stride-2 layer (TF "same" pads asymmetrically there), and small.
SIZE = 48
IMAGES = 3
#: Pixels in [0, 255] reach the first convolution in this range (Normalization at mean 0, var 1).
INPUT_RANGES = {"mobilenet_v2": (-1.0, 1.0), "mobilenet_v3_large": (-1.0, 1.0),
                "efficientnet_b0": (0.0, 1.0), "resnet50": (-123.68, 255.0 - 103.939)}


# ---- Keras, built as each test needs it ---------------------------------------------------------

def keras_base(name: str, *, size: int = SIZE, **kwargs):
    app = getattr(keras.applications, get_backbone(name).keras_application)
    with fresh_layer_names():
        return app(include_top=False, weights=kwargs.pop("weights", None),
                   input_shape=(size, size, 3), **kwargs)


_KERAS32: dict[str, object] = {}


def cached_keras_base(name: str):
    """One float32 Keras base per application for the quick tier (building one takes seconds)."""
    if name not in _KERAS32:
        _KERAS32[name] = keras_base(name)
    return _KERAS32[name]


# ---- the port ---------------------------------------------------------------------------------


def randomize_normalization_(base: nn.Module, generator: torch.Generator) -> None:
    """EfficientNet's Normalization away from 0 / 1, so a square root left out shows."""
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, layers.Normalization):
                m.mean.uniform_(0.3, 0.6, generator=generator)
                m.variance.uniform_(0.04, 0.09, generator=generator)
                m.count.fill_(1000)


def pixels(generator: torch.Generator, n: int = IMAGES, size: int = SIZE) -> np.ndarray:
    """Random images in [0, 255], NHWC float32, the first one the extremes (0 and 255 halves)."""
    x = torch.rand(n, size, size, 3, generator=generator) * 255
    x[0, : size // 2], x[0, size // 2:] = 0.0, 255.0
    return x.numpy()


# ---- quick tier: tables, counts, defaults, preprocessing, inference mode ----------------------

@pytest.mark.parametrize("name", ALL)
def test_layer_table_equals_keras(name: str) -> None:
    kbase, tbase = cached_keras_base(name), get_backbone(name).build()
    keras_table = [(i, type(layer).__name__, layer.name) for i, layer in enumerate(kbase.layers)]
    torch_table = [(layer.index, layer.type, layer.name) for layer in tbase.keras_layers]
    assert len(torch_table) == len(keras_table)
    assert torch_table == keras_table
    assert tbase.keras_layer(len(keras_table) - 1).name == kbase.layers[-1].name
    out = tbase(torch.zeros(1, 3, SIZE, SIZE))
    assert tuple(out.permute(0, 2, 3, 1).shape[1:]) == tuple(kbase.output.shape[1:])


def keras_counts(kbase, fine_tune_at: int) -> tuple[int, int]:
    """The recipe's freezing in Keras: ``base.trainable = True``, then ``layers[:k]`` frozen."""
    kbase.trainable = True
    for layer in kbase.layers[:fine_tune_at]:
        layer.trainable = False
    size = lambda weights: sum(int(np.prod(w.shape)) for w in weights)  # noqa: E731
    return size(kbase.trainable_weights), size(kbase.non_trainable_weights)


@pytest.mark.parametrize("name", ALL)
def test_parameter_counts_equal_keras_at_every_fine_tune_point(name: str) -> None:
    kbase, tbase = cached_keras_base(name), get_backbone(name).build()
    n = len(kbase.layers)
    assert {0, get_backbone(name).default_fine_tune_at(tbase), n} <= set(range(n + 1))
    mismatches = []
    for k in range(n + 1):
        ours = count_params(freeze(tbase, k))
        theirs = keras_counts(kbase, k)
        if ours != theirs:
            mismatches.append((k, theirs, ours))
    kbase.trainable = True
    assert not mismatches, f"(fine_tune_at, keras, torch) first differences: {mismatches[:3]}"


@pytest.mark.parametrize("name", ALL)
def test_default_fine_tune_point_is_the_block_start_nearest_the_recipe_share(name: str) -> None:
    backbone = get_backbone(name)
    base = backbone.build()
    n, default = len(base.keras_layers), backbone.default_fine_tune_at(base)
    if name == "mobilenet_v2":
        assert (default, n) == (RECIPE_FINE_TUNE_AT, RECIPE_LAYERS)
        return
    starts = [base.keras_layer(block.layers[0]).index for block in base.blocks]
    share = RECIPE_FINE_TUNE_AT / RECIPE_LAYERS
    assert default in starts
    assert default == min(starts, key=lambda i: abs(i / n - share))
    assert str(default) in backbone.reason


def test_efficientnet_imagenet_rescaling_matches_keras_imagenet_layout(monkeypatch) -> None:
    """Keras builds one more Rescaling for ``weights="imagenet"``: built here with its download
    and load stubbed (the layout is what is compared, not ImageNet's numbers)."""
    from keras.src.applications import efficientnet as keras_efficientnet
    from keras.src.models.model import Model

    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *a, **k: "no-file.h5")
    monkeypatch.setattr(Model, "load_weights", lambda self, *a, **k: None)
    kbase = keras_base("efficientnet_b0", weights="imagenet")
    tbase = efficientnet.EfficientNetB0Base(imagenet_rescaling=True)
    assert [(layer.index, layer.type, layer.name) for layer in tbase.keras_layers] == \
        [(i, type(layer).__name__, layer.name) for i, layer in enumerate(kbase.layers)]
    assert len(kbase.layers) == len(cached_keras_base("efficientnet_b0").layers) + 1
    assert get_backbone("efficientnet_b0").default_fine_tune_at(tbase) == \
        get_backbone("efficientnet_b0").default_fine_tune_at(efficientnet.EfficientNetB0Base()) + 1
    x = np.full((1, 2, 2, 3), 0.5, np.float64)
    expected = keras.ops.convert_to_numpy(kbase.get_layer("rescaling_1")(x))
    got = tbase.rescaling_1(pairs.nchw(x)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, expected)
    assert not np.allclose(expected, 0.5)


def preprocessing_difference(name: str, tbase: nn.Module, kbase, x: np.ndarray) -> float:
    """Largest |Keras - port| of what reaches the first convolution: ``preprocess_input`` and
    the model's leading preprocessing layers (Rescaling, Normalization)."""
    return bands.max_error(*checks_bases.first_convolution_inputs(name, kbase, tbase, x))


@pytest.mark.parametrize("name", ALL)
def test_preprocessing_ranges_and_values_equal_keras(name: str, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    tbase, kbase = get_backbone(name).build(), cached_keras_base(name)
    extremes = np.stack([np.zeros((SIZE, SIZE, 3), np.float32), np.full((SIZE, SIZE, 3), 255, np.float32)])
    low, high = INPUT_RANGES[name]
    assert preprocessing_difference(name, tbase, kbase, extremes) == 0.0
    k_ext = pairs.preprocess(extremes, name)
    for layer in kbase.layers[1:]:
        if type(layer).__name__ not in ("Rescaling", "Normalization"):
            break
        k_ext = keras.ops.convert_to_numpy(layer(k_ext))
    np.testing.assert_allclose([k_ext.min(), k_ext.max()], [low, high], rtol=1e-6)
    # Values: random images, EfficientNet's Normalization weights randomised through Keras' file.
    randomize_normalization_(tbase, generator)
    path = save_keras_weights(tbase, tmp_path / "base.weights.h5")
    kbase.load_weights(str(path))
    x = pixels(generator)
    magnitude = bands.magnitude(pairs.preprocess(x, name))
    # One float32 rounding of the largest value: Keras and torch may round a multiply-add once
    # (fused) or twice; nothing wrong (a flip, a missing square root) is near this.
    assert preprocessing_difference(name, tbase, kbase, x) <= bands.EPS32 * max(magnitude, 1.0) * 4


@pytest.mark.parametrize("name", NEW)
def test_base_stays_in_inference_mode_inside_a_training_parent(name: str) -> None:
    generator = torch.Generator().manual_seed(4)
    base = get_backbone(name).build()
    x = base.preprocess(torch.from_numpy(pixels(generator, n=2, size=32)).permute(0, 3, 1, 2))
    with torch.no_grad():
        before = base(x)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in base.batchnorms()]
    parent = nn.Sequential(base).train()
    freeze(base, get_backbone(name).default_fine_tune_at(base))
    after = parent(x)
    after.sum().backward()
    assert not any(m.training for m in base.modules())
    assert torch.equal(before, after.detach())  # Dropout inactive, BatchNorm on moving statistics
    for m, (mean, var) in zip(base.batchnorms(), stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    trained = [layer for layer in base.keras_layers if layer.has_weights
               and layer.index >= get_backbone(name).default_fine_tune_at(base)]
    assert trained and all(p.grad is not None for layer in trained for p in layer.parameters())


def test_unknown_base_is_a_user_error() -> None:
    with pytest.raises(UserError, match="'vgg16'.*mobilenet_v2, mobilenet_v3_large"):
        get_backbone("vgg16")
    assert set(BACKBONES) == set(ALL)


# ---- a planted mistake that only the weight file sees ----------------------------------------
# Every layer's output in float64 and float32, and the planted mistakes that change the numbers
# (hard-sigmoid as sigmoid, ResNet's stride on the 3x3, RGB left unflipped...), are the parity
# suite's check 20 (parity_tests/test_bases.py).

def test_efficientnet_se_width_from_the_expanded_filters_fails_the_import(tmp_path: Path,
                                                                           monkeypatch) -> None:
    path = save_keras_weights(get_backbone("efficientnet_b0").build(), tmp_path / "b0.weights.h5")
    monkeypatch.setattr(efficientnet, "se_filters", lambda fin, expanded: max(1, int(expanded * 0.25)))
    with pytest.raises(UserError, match="se_reduce"):
        load_keras_weights(get_backbone("efficientnet_b0").build(), path)


@pytest.mark.parametrize("name", NEW)
def test_legacy_hdf5_round_trip_through_keras(name: str, tmp_path: Path, randomize) -> None:
    """Keras' ImageNet files are legacy HDF5: the port's legacy export loads in Keras, and the
    legacy file Keras writes from it loads back into the port, every tensor unchanged."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    generator = torch.Generator().manual_seed(6)
    source = randomize(get_backbone(name).build(), generator)
    randomize_normalization_(source, generator)
    kbase = cached_keras_base(name)
    kbase.load_weights(str(save_keras_weights(source, tmp_path / "port.h5")))
    with h5py.File(tmp_path / "keras.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, kbase)
    target = load_keras_weights(get_backbone(name).build(), tmp_path / "keras.h5")
    theirs = target.state_dict()
    differing = [k for k, v in source.state_dict().items()
                 if not k.endswith("num_batches_tracked") and not torch.equal(v, theirs[k])]
    assert not differing, differing[:3]
    assert len(theirs) == len(source.state_dict())
