"""Intermediate outputs by Keras layer name or index, and the recipe's flattened features.

Compared on a base whose BatchNorm statistics are measured on data, so that every layer's output is
of order 1 (with Keras' init they shrink to ~1e-12 and any comparison would pass).

Run: ``python -m pytest tests/test_torch_features.py -q``
"""

from __future__ import annotations

import pytest
import torch

from tl_torch import FlatFeatures, MobileNetV2Base, all_layer_outputs, feature_extractor

N_KERAS_LAYERS = 154
SIZE = 64
#: The traced extractor runs the same modules on the same tensors as ``base(x)``: bitwise equal.
EXACT = 0.0
#: Outputs of order 1 at the top of the network: the comparisons below are not trivial.
ORDER_ONE_STD = 0.1


@pytest.fixture(scope="module")
def base(calibrated_base) -> MobileNetV2Base:
    return calibrated_base(seed=11, size=SIZE)


@pytest.fixture(scope="module")
def x(base: MobileNetV2Base) -> torch.Tensor:
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(12)) * 255
    return base.preprocess(images)


@pytest.fixture(scope="module")
def expected(base: MobileNetV2Base, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's output recorded by forward hooks on ``base(x)``, and ``base(x)`` itself."""
    seen: dict[str, torch.Tensor] = {"input_layer": x}
    handles = [layer.module.register_forward_hook(
        lambda m, args, out, name=layer.name: seen.__setitem__(name, out))
        for layer in base.keras_layers[1:]]
    with torch.no_grad():
        seen["base(x)"] = base(x)
    for h in handles:
        h.remove()
    assert seen["base(x)"].std().item() > ORDER_ONE_STD
    return seen


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_feature_extractor_by_name_and_index(base, x, expected) -> None:
    extractor = feature_extractor(base, ["block_11_expand_relu", 0, "Conv_1", "out_relu"])
    with torch.no_grad():
        out = extractor(x)
    assert set(out) == {"block_11_expand_relu", "input_layer", "Conv_1", "out_relu"}
    assert tuple(out["input_layer"].shape) == (2, 3, 64, 64)
    assert tuple(out["block_11_expand_relu"].shape) == (2, 576, 4, 4)   # 96 x 6 channels, 64 / 16
    assert tuple(out["Conv_1"].shape) == (2, 1280, 2, 2)
    assert tuple(out["out_relu"].shape) == (2, 1280, 2, 2)
    assert out["input_layer"] is x
    assert max_diff(out["out_relu"], expected["base(x)"]) <= EXACT
    for name in ("block_11_expand_relu", "Conv_1"):
        assert max_diff(out[name], expected[name]) <= EXACT, name
    assert out["block_11_expand_relu"].std().item() > ORDER_ONE_STD
    # ReLU6 bounds the relu layers; Conv_1 (before its BN) is not bounded the same way.
    assert 0.0 <= out["out_relu"].min().item() and out["out_relu"].max().item() <= 6.0


def test_feature_extractor_input_only_and_by_index(base, x, expected) -> None:
    with torch.no_grad():
        only_input = feature_extractor(base, ["input_layer"])(x)
        by_index = feature_extractor(base, [100, 153])(x)
    assert list(only_input) == ["input_layer"] and only_input["input_layer"] is x
    assert list(by_index) == ["block_11_expand_relu", "out_relu"]
    assert max_diff(by_index["block_11_expand_relu"], expected["block_11_expand_relu"]) <= EXACT
    assert max_diff(by_index["out_relu"], expected["base(x)"]) <= EXACT


def test_all_layer_outputs_in_keras_order(base, x, expected) -> None:
    with torch.no_grad():
        outputs = all_layer_outputs(base, x)
    assert len(outputs) == N_KERAS_LAYERS
    assert list(outputs) == [layer.name for layer in base.keras_layers]
    assert max_diff(list(outputs.values())[-1], expected["base(x)"]) <= EXACT
    for name, value in outputs.items():
        assert max_diff(value, expected[name]) <= EXACT, name
    # The residual adds join the previous block's output and this block's projection.
    assert max_diff(outputs["block_2_add"],
                    outputs["block_1_project_BN"] + outputs["block_2_project_BN"]) <= EXACT
    assert max_diff(outputs["block_5_add"], outputs["block_4_add"] + outputs["block_5_project_BN"]) <= EXACT


def test_flat_features_channels_last(base) -> None:
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(14)) * 255
    x = base.preprocess(images)
    with torch.no_grad():
        flat = FlatFeatures(base)(x)
        features = base(x)
    assert tuple(flat.shape) == (2, 5 * 5 * 1280) == (2, 32000)
    assert max_diff(flat, features.permute(0, 2, 3, 1).flatten(1)) <= EXACT
    # Keras' Flatten of (N, 5, 5, 1280): element (i, j, c) at (i * 5 + j) * 1280 + c.
    for n, c, i, j in [(0, 0, 0, 0), (1, 1279, 4, 4), (0, 7, 2, 3), (1, 640, 4, 0)]:
        assert flat[n, (i * 5 + j) * 1280 + c].item() == features[n, c, i, j].item()
    assert features.std().item() > ORDER_ONE_STD


def test_unknown_layers_are_refused(base) -> None:
    with pytest.raises(KeyError, match="block_99_expand"):
        feature_extractor(base, ["block_99_expand"])
    with pytest.raises(IndexError, match="154"):
        feature_extractor(base, [154])
    with pytest.raises(IndexError, match="-1"):
        feature_extractor(base, [-1])


def test_extractor_stops_after_last_requested_layer(base, x) -> None:
    """Asking for an early layer does not run the blocks above it (the graph is cut there)."""
    calls: list[str] = []
    handles = [getattr(base, name).register_forward_hook(lambda *_, name=name: calls.append(name))
               for name in ("block_6_expand", "block_7_expand", "out_relu")]
    try:
        extractor = feature_extractor(base, ["block_6_expand"])
        with torch.no_grad():
            out = extractor(x)
    finally:
        for h in handles:
            h.remove()
    assert list(out) == ["block_6_expand"]
    assert calls == ["block_6_expand"]


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "efficientnet_b0", "resnet50"])
def test_every_base_gives_every_layer_by_name_and_index(name: str, calibrate_bn) -> None:
    """The other bases: every Keras layer in Keras' order, the last one the base's output, and a
    layer asked for by index is the one of that name."""
    from tl_torch.backbones import get_backbone

    generator = torch.Generator().manual_seed(13)
    base = get_backbone(name).build()
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator) * 255
    x = base.preprocess(images)
    calibrate_bn(base, x, generator)
    with torch.no_grad():
        outputs = all_layer_outputs(base, x)
        whole = base(x)
        picked = feature_extractor(base, [3, base.keras_layers[-1].name])(x)
    assert list(outputs) == [layer.name for layer in base.keras_layers]
    assert max_diff(outputs[base.keras_layers[-1].name], whole) <= EXACT
    assert whole.std().item() > ORDER_ONE_STD
    # Each output is its own layer's: a convolution's has that convolution's channels.
    convs = [layer for layer in base.keras_layers if isinstance(layer.module, torch.nn.Conv2d)]
    assert [outputs[c.name].shape[1] for c in convs] == [c.module.out_channels for c in convs]
    third = base.keras_layers[3].name
    assert list(picked) == [third, base.keras_layers[-1].name]
    assert max_diff(picked[third], outputs[third]) <= EXACT
    # EfficientNet pools its squeeze-and-excitation to (N, C) before a Reshape; the others keep 4-D.
    assert any(v.ndim == 2 for v in outputs.values()) == (name == "efficientnet_b0")
