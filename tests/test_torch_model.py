"""The Keras-faithful MobileNetV2 base: layer list, shapes, TF-"same" padding, BatchNorm settings and
inference mode, Keras' initialisation, and torchvision equivalence.

Run: ``TL_PARITY_CACHE=/tmp/tlcache python -m pytest tests/test_torch_model.py -q``
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tl_common.errors import UserError
from tl_torch import freeze
from tl_torch.keras_weights import torch_to_keras
from tl_torch.model import KERAS_BN_EPS, TORCHVISION_BN_EPS, MobileNetV2Base
from tl_torch.padding import Conv2dSame, Pad2d, pad_amounts, same_padding
from tl_torch.weights import build_base, copy_from_torchvision, keras_init_

#: Sizes around the multiples of 32, odd and even, the recipe's 160 and ImageNet's 224.
IMAGE_SIZES = (32, 33, 96, 127, 128, 160, 161, 192, 224)
N_KERAS_LAYERS = 154
#: torch's BatchNorm momentum is 1 - Keras' 0.999; the two only differ by float rounding.
TORCH_BN_MOMENTUM = 0.001
MOMENTUM_ROUNDING = 1e-15
#: torchvision's features and the copy compute the same convolutions in the same order: the
#: outputs agree to float32 rounding (measured: 0.0).
TORCHVISION_TOL = 1e-6
#: The classic porting mistake (pad 1 on every side) moves every value by a pixel: outputs of order
#: 1 differ by far more than rounding (measured: about 6 at 160).
PADDING_MISTAKE_MIN_DIFF = 1e-3
#: Keras' random init with inference-mode BatchNorm shrinks features to ~1e-12 (Keras measured a
#: std of 1.5e-12); anything below this bound is "vanished".
VANISHED_STD = 1e-6
#: Activations of weights whose BatchNorm statistics are measured on the data are of order 1.
ORDER_ONE_STD = 0.1
#: The largest of >= 288 draws from U(-b, b) exceeds 0.9 b except with probability 0.9**288 ~ 1e-13.
GLOROT_MAX_FRACTION = 0.9


def ceil_halvings(size: int, times: int = 5) -> int:
    """The spatial size after ``times`` stride-2 "same" convolutions: ceil(x / 2) each time."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


@pytest.fixture(scope="module")
def keras_base() -> MobileNetV2Base:
    return build_base("none", generator=torch.Generator().manual_seed(0))


def capture(base: MobileNetV2Base, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """(input, output) of the named layers' modules on a forward pass of ``x``."""
    seen: dict[str, tuple] = {}
    handles = [getattr(base, n).register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out))) for n in names]
    try:
        with torch.no_grad():
            base(x)
    finally:
        for h in handles:
            h.remove()
    return seen


# ---- the layer list ------------------------------------------------------------------------

def test_keras_layers_index_names_and_types(keras_base: MobileNetV2Base) -> None:
    layers = keras_base.keras_layers
    assert len(layers) == N_KERAS_LAYERS
    assert [layer.index for layer in layers] == list(range(N_KERAS_LAYERS))
    assert (layers[0].name, layers[0].type, layers[0].module) == ("input_layer", "InputLayer", None)
    assert (layers[100].name, layers[100].type) == ("block_11_expand_relu", "ReLU")
    assert (layers[-1].name, layers[-1].type) == ("out_relu", "ReLU")
    assert keras_base.keras_layer("block_11_expand_relu").index == 100
    assert keras_base.keras_layer(100).name == "block_11_expand_relu"
    weighted = [layer for layer in layers if layer.has_weights]
    assert len(weighted) == 104  # 52 convolutions + 52 BatchNorms
    # State-dict keys are "<Keras layer name>.<tensor>".
    names = {layer.name for layer in layers}
    assert {key.split(".")[0] for key in keras_base.state_dict()} == {layer.name for layer in weighted}
    assert {key.split(".")[0] for key in keras_base.state_dict()} <= names


def test_keras_layers_match_keras_own_config(keras_base: MobileNetV2Base, demo_config: dict) -> None:
    """Names, types and order equal the layer list Keras stored for the demo's MobileNetV2."""
    keras = [(layer["class_name"], layer["config"]["name"]) for layer in demo_config["config"]["layers"]]
    ours = [(layer.type, layer.name) for layer in keras_base.keras_layers]
    assert ours == keras


def test_every_layer_shape_matches_keras_at_160(demo_config: dict) -> None:
    """Every layer's output shape at 160 equals the shape Keras recorded for the tensor it feeds
    (channels-last in Keras' config, channels-first here)."""
    from tl_torch.features import all_layer_outputs

    recorded: dict[str, tuple[int, ...]] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "__keras_tensor__":
                recorded[node["config"]["keras_history"][0]] = tuple(node["config"]["shape"][1:])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for layer in demo_config["config"]["layers"]:
        walk(layer.get("inbound_nodes", []))
    base = MobileNetV2Base()
    outputs = all_layer_outputs(base, torch.zeros(1, 3, 160, 160))
    assert len(recorded) == N_KERAS_LAYERS - 1  # every layer but the last feeds another
    for name, shape in recorded.items():
        assert tuple(outputs[name].permute(0, 2, 3, 1).shape[1:]) == shape, name
    assert tuple(outputs["out_relu"].shape) == (1, 1280, 5, 5)


def test_batchnorm_settings_match_keras_config(keras_base: MobileNetV2Base, demo_config: dict) -> None:
    configs = {layer["config"]["name"]: layer["config"] for layer in demo_config["config"]["layers"]}
    for layer in keras_base.keras_layers:
        if layer.type == "BatchNormalization":
            assert layer.module.eps == configs[layer.name]["epsilon"] == KERAS_BN_EPS
            assert abs(layer.module.momentum - (1 - configs[layer.name]["momentum"])) < MOMENTUM_ROUNDING


# ---- shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_output_shape_is_ceil_size_over_32(keras_base: MobileNetV2Base, size: int) -> None:
    with torch.no_grad():
        out = keras_base(torch.zeros(1, 3, size, size))
    expected = ceil_halvings(size)
    assert expected == math.ceil(size / 32)
    assert tuple(out.shape) == (1, 1280, expected, expected)


def test_output_shape_non_square(keras_base: MobileNetV2Base) -> None:
    with torch.no_grad():
        out = keras_base(torch.zeros(2, 3, 64, 97))
    assert tuple(out.shape) == (2, 1280, 2, 4)


def test_intermediate_shapes_and_pad_placement(keras_base: MobileNetV2Base) -> None:
    x = torch.rand(1, 3, 160, 160) * 2 - 1
    seen = capture(keras_base, ["Conv1", "block_1_pad", "block_1_depthwise", "block_13_pad"], x)
    assert tuple(seen["Conv1"][1].shape) == (1, 32, 80, 80)
    pad_in, pad_out = seen["block_1_pad"]
    assert tuple(pad_in.shape) == (1, 96, 80, 80)
    assert tuple(pad_out.shape) == (1, 96, 81, 81)
    # 0 rows/columns before, 1 after: the input sits in the top-left corner.
    assert torch.equal(pad_out[..., :80, :80], pad_in)
    assert pad_out[..., 80, :].abs().max().item() == 0.0
    assert pad_out[..., :, 80].abs().max().item() == 0.0
    assert tuple(seen["block_1_depthwise"][1].shape) == (1, 96, 40, 40)
    assert tuple(seen["block_13_pad"][1].shape) == (1, 576, 11, 11)  # 10x10 -> 11x11

    x = torch.rand(1, 3, 161, 161) * 2 - 1
    seen = capture(keras_base, ["Conv1", "block_1_pad"], x)
    assert tuple(seen["Conv1"][1].shape) == (1, 32, 81, 81)
    pad_in, pad_out = seen["block_1_pad"]
    assert tuple(pad_out.shape) == (1, 96, 83, 83)
    # Odd input: 1 on every side.
    assert torch.equal(pad_out[..., 1:82, 1:82], pad_in)
    for border in (pad_out[..., 0, :], pad_out[..., 82, :], pad_out[..., :, 0], pad_out[..., :, 82]):
        assert border.abs().max().item() == 0.0


# ---- TF "same" padding ---------------------------------------------------------------------

@pytest.mark.parametrize(("size", "kernel", "stride", "expected"), [
    (160, 3, 2, (0, 1)),
    (161, 3, 2, (1, 1)),
    (80, 3, 2, (0, 1)),
    (5, 3, 2, (1, 1)),
    (160, 3, 1, (1, 1)),
    (160, 1, 1, (0, 0)),
    (160, 1, 2, (0, 0)),
    (7, 5, 2, (2, 2)),
    (8, 5, 2, (1, 2)),
])
def test_same_padding(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


def test_pad_amounts_and_bad_pad_type() -> None:
    assert pad_amounts(160, 161, 3, 2, "same") == (1, 1, 0, 1)  # (left, right, top, bottom)
    assert pad_amounts(160, 161, 3, 2, "symmetric") == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="'valid'"):
        pad_amounts(160, 160, 3, 2, "valid")
    with pytest.raises(ValueError, match="'valid'"):
        Pad2d(3, 2, "valid")


def test_conv2d_same_equals_hand_padding_and_differs_from_symmetric() -> None:
    torch.manual_seed(0)
    conv = Conv2dSame(3, 8, 3, stride=2, bias=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = conv(x)
        by_hand = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
        symmetric = F.conv2d(x, conv.weight, stride=2, padding=1)
    assert ours.shape == by_hand.shape == symmetric.shape == (2, 8, 8, 8)
    assert torch.equal(ours, by_hand)
    assert (ours - symmetric).abs().max().item() > PADDING_MISTAKE_MIN_DIFF
    # On odd inputs TF "same" is symmetric.
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, stride=2, padding=1))


# ---- BatchNorm ------------------------------------------------------------------------------

def assert_bn_settings(base: nn.Module, eps: float, momentum: float) -> None:
    bns = [m for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 52
    for bn in bns:
        assert bn.eps == eps
        assert abs(bn.momentum - momentum) < MOMENTUM_ROUNDING


def test_batchnorm_eps_and_momentum_keras_sources(keras_base: MobileNetV2Base, demo_weights) -> None:
    assert_bn_settings(keras_base, 1e-3, TORCH_BN_MOMENTUM)
    assert_bn_settings(build_base(demo_weights), 1e-3, TORCH_BN_MOMENTUM)
    assert_bn_settings(build_base("demo"), 1e-3, TORCH_BN_MOMENTUM)


def test_torchvision_source_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights="torchvision"`` picks symmetric padding, eps 1e-5 and ImageNet mean/std (the
    download itself is replaced by a randomly initialised torchvision model)."""
    import torchvision

    import tl_torch.weights as weights_module

    def fake_load(base: MobileNetV2Base) -> None:
        copy_from_torchvision(base, torchvision.models.mobilenet_v2(weights=None))

    monkeypatch.setattr(weights_module, "_load_torchvision", fake_load)
    base = build_base("torchvision")
    assert (base.pad_type, base.preprocessing, base.weights_source) == ("symmetric", "torchvision",
                                                                         "torchvision")
    assert_bn_settings(base, TORCHVISION_BN_EPS, TORCH_BN_MOMENTUM)
    assert TORCHVISION_BN_EPS == 1e-5
    assert base.Conv1.pad.pad_type == base.block_1_pad.pad_type == "symmetric"


def test_train_keeps_batchnorm_in_inference_mode(keras_base: MobileNetV2Base) -> None:
    head = nn.Linear(1280, 1)
    parent = nn.Sequential(keras_base, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), head)
    for call in (keras_base.train, lambda: keras_base.train(True), parent.train):
        call()
        assert not keras_base.training
        assert not any(bn.training for bn in keras_base.batchnorms())
        assert sum(1 for _ in keras_base.batchnorms()) == 52
    assert parent.training and head.training and parent[3].training  # the rest does train
    keras_base.eval()


def test_moving_statistics_frozen_while_gamma_beta_learn(calibrated_base) -> None:
    base = freeze(calibrated_base(seed=3, size=32), 0)
    parent = nn.Sequential(base, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1)).train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = base.preprocess(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255)
    with torch.no_grad():
        eval_out = parent.eval()(x)
        train_out = parent.train()(x)
    assert torch.equal(train_out, eval_out)  # no batch statistics in train mode
    optimizer = torch.optim.Adam(parent.parameters(), lr=1e-2)
    target = torch.tensor([[1.0], [0.0]])
    for _ in range(3):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(parent(x), target).backward()
        optimizer.step()
    after = base.state_dict()
    bn_names = [layer.name for layer in base.keras_layers if layer.type == "BatchNormalization"]
    for name in bn_names:
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(after[f"{name}.{stat}"], before[f"{name}.{stat}"]), (name, stat)
    changed = [name for name in bn_names
               if not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
               and not torch.equal(after[f"{name}.bias"], before[f"{name}.bias"])]
    assert len(changed) == len(bn_names) == 52
    assert not torch.equal(after["Conv1.weight"], before["Conv1.weight"])


# ---- preprocessing and construction -----------------------------------------------------------

def test_preprocess() -> None:
    pixels = torch.tensor([0.0, 127.5, 255.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    assert MobileNetV2Base().preprocess(pixels)[0, 0, 0].tolist() == [-1.0, 0.0, 1.0]
    tv = MobileNetV2Base(preprocessing="torchvision").preprocess(torch.full((1, 3, 1, 1), 255.0))
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]
    assert tv.flatten().tolist() == pytest.approx(expected, rel=1e-6)  # float32 rounding
    with pytest.raises(ValueError, match="'caffe'"):
        MobileNetV2Base(preprocessing="caffe")


def test_build_base_rejects_bad_arguments(tmp_path) -> None:
    with pytest.raises(UserError, match="image_size=31"):
        build_base("none", image_size=31)
    with pytest.raises(UserError, match="image_size='160'"):
        build_base("none", image_size="160")
    with pytest.raises(UserError, match="nonexistent-name"):
        build_base("nonexistent-name")
    assert build_base("none", image_size=32).weights_source == "none"
    assert build_base(None).weights_source == "none"


# ---- Keras' initialisation ----------------------------------------------------------------

def test_keras_init_glorot_bounds_and_batchnorm(keras_base: MobileNetV2Base) -> None:
    conv1 = keras_base.Conv1.weight
    assert tuple(torch_to_keras("Conv2D", conv1.detach().numpy()).shape) == (3, 3, 3, 32)
    bound = math.sqrt(6 / (27 + 288))
    assert conv1.abs().max().item() <= bound
    assert conv1.abs().max().item() > GLOROT_MAX_FRACTION * bound
    n_convs = 0
    for layer in keras_base.keras_layers:
        if layer.type in ("Conv2D", "DepthwiseConv2D"):
            # Keras' fans, from the Keras kernel shape: receptive field x shape[-2] / shape[-1].
            kh, kw, cin, cout = torch_to_keras(layer.type, layer.module.weight.detach().numpy()).shape
            bound = math.sqrt(6 / (kh * kw * cin + kh * kw * cout))
            w = layer.module.weight.abs().max().item()
            assert GLOROT_MAX_FRACTION * bound < w <= bound, layer.name
            n_convs += 1
        elif layer.type == "BatchNormalization":
            bn = layer.module
            assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
            assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert n_convs == 52
    depthwise = keras_base.block_1_depthwise.weight  # Keras (3, 3, 96, 1): fans 864 and 9
    assert depthwise.abs().max().item() <= math.sqrt(6 / (9 * 96 + 9))


def test_keras_init_is_reproducible_from_generator() -> None:
    a = build_base("none", generator=torch.Generator().manual_seed(5))
    b = build_base("none", generator=torch.Generator().manual_seed(5))
    c = build_base("none", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.Conv_1.weight, b.Conv_1.weight)
    assert not torch.equal(a.Conv_1.weight, c.Conv_1.weight)


def test_keras_init_features_vanish(keras_base: MobileNetV2Base, calibrated_base) -> None:
    """Why comparisons need randomised BatchNorm statistics: Keras' init with inference-mode
    BatchNorm shrinks the features to nothing; with statistics measured on data they are of order 1."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        vanished = keras_base(keras_base.preprocess(images)).std().item()
        calibrated = calibrated_base(seed=1, size=64)
        alive = calibrated(calibrated.preprocess(images)).std().item()
    assert vanished < VANISHED_STD
    assert alive > ORDER_ONE_STD


def test_keras_init_resets_batchnorm_after_randomising(random_base) -> None:
    base = keras_init_(random_base(seed=2))
    assert torch.all(base.Conv_1_bn.running_var == 1) and torch.all(base.Conv_1_bn.weight == 1)
    assert torch.all(base.Conv_1_bn.running_mean == 0) and torch.all(base.Conv_1_bn.bias == 0)


# ---- torchvision ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchvision_pair(calibrate_bn):
    """torchvision's MobileNetV2 with BatchNorm statistics measured on data, and its copy."""
    import torchvision

    generator = torch.Generator().manual_seed(7)
    reference = torchvision.models.mobilenet_v2(weights=None)
    calibrate_bn(reference, torch.randn(2, 3, 64, 64, generator=generator), generator)
    ours = MobileNetV2Base(pad_type="symmetric", bn_eps=TORCHVISION_BN_EPS, preprocessing="torchvision")
    return reference, copy_from_torchvision(ours, reference)


@pytest.mark.parametrize("size", [160, 161])
def test_torchvision_copy_equals_torchvision(torchvision_pair, size: int) -> None:
    reference, ours = torchvision_pair
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = reference.features(x)
        got = ours(x)
    assert expected.std().item() > ORDER_ONE_STD  # not a trivial comparison
    assert (got - expected).abs().max().item() <= TORCHVISION_TOL


def test_torchvision_weights_with_same_padding_differ_on_even_sizes(torchvision_pair) -> None:
    reference, _ = torchvision_pair
    same = copy_from_torchvision(MobileNetV2Base(pad_type="same", bn_eps=TORCHVISION_BN_EPS,
                                                 preprocessing="torchvision"), reference)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        x = torch.randn(1, 3, 160, 160, generator=generator)
        assert (same(x) - reference.features(x)).abs().max().item() > PADDING_MISTAKE_MIN_DIFF
        # 161 -> 81 -> 41 -> 21 -> 11: every stride-2 layer sees an odd size, where "same" pads
        # 1 on each side like torchvision, so the outputs agree.
        x = torch.randn(1, 3, 161, 161, generator=generator)
        assert (same(x) - reference.features(x)).abs().max().item() <= TORCHVISION_TOL


def test_copy_from_torchvision_rejects_other_models() -> None:
    import torchvision

    other = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        copy_from_torchvision(MobileNetV2Base(), other)
