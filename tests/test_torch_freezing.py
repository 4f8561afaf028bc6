"""Freezing by Keras layer index (``fine_tune_at``) and counting parameters as Keras does.

The expected counts come from Keras' ``model.summary()`` of the recipe (MobileNetV2-160 base plus
``Dense(1)``), and from a layer list rebuilt here from Keras' ``mobilenet_v2.py`` itself, not from
the code under test.

Run: ``python -m pytest tests/test_torch_freezing.py -q``
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tl_common.errors import UserError
from tl_torch import MobileNetV2Base, count_params, freeze, layer_table

N_KERAS_LAYERS = 154
#: Keras' summary of the recipe: base frozen (phase A) and fine_tune_at = 100 (phase B).
PHASE_A_COUNTS = (1281, 2257984)
PHASE_B_COUNTS = (1862721, 396544)
#: BatchNorm moving mean + variance of the base: 2 x 17,056 BatchNorm channels.
BN_MOVING_STATS = 34112
HEAD_PARAMS = 1281


def keras_layer_names() -> list[str]:
    """``MobileNetV2(include_top=False).layers`` names, rebuilt from Keras' recipe: stem, the
    inverted residual blocks (expansion, stride-2 padding, depthwise, projection, residual add), top."""
    names = ["input_layer", "Conv1", "bn_Conv1", "Conv1_relu"]
    # (block ids, stride of the first, output channels) per stage; block 0 has no expansion.
    stages = [((0,), 1, 16), ((1, 2), 2, 24), ((3, 4, 5), 2, 32), ((6, 7, 8, 9), 2, 64),
              ((10, 11, 12), 1, 96), ((13, 14, 15), 2, 160), ((16,), 1, 320)]
    channels = 32
    for ids, first_stride, out in stages:
        for i, block in enumerate(ids):
            p = f"block_{block}_" if block else "expanded_conv_"
            stride = first_stride if i == 0 else 1
            if block:
                names += [p + "expand", p + "expand_BN", p + "expand_relu"]
            if stride == 2:
                names.append(p + "pad")
            names += [p + "depthwise", p + "depthwise_BN", p + "depthwise_relu",
                      p + "project", p + "project_BN"]
            if stride == 1 and channels == out:
                names.append(p + "add")
            channels = out
    return names + ["Conv_1", "Conv_1_bn", "out_relu"]


KERAS_LAYER_NAMES = keras_layer_names()


@pytest.fixture
def recipe() -> tuple[MobileNetV2Base, nn.Module]:
    """The base and the recipe's model around it (pooling, dropout, Dense(1))."""
    base = MobileNetV2Base()
    model = nn.Sequential(base, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 1))
    return base, model


def test_layer_list_equals_keras_recipe(recipe) -> None:
    base, _ = recipe
    assert len(KERAS_LAYER_NAMES) == N_KERAS_LAYERS
    assert KERAS_LAYER_NAMES[100] == "block_11_expand_relu"
    assert [layer.name for layer in base.keras_layers] == KERAS_LAYER_NAMES


@pytest.mark.parametrize(("fine_tune_at", "expected"), [(154, PHASE_A_COUNTS), (100, PHASE_B_COUNTS)])
def test_counts_match_keras_summary(recipe, fine_tune_at: int, expected: tuple[int, int]) -> None:
    base, model = recipe
    freeze(base, fine_tune_at)
    assert count_params(model) == expected
    assert sum(count_params(model)) == 2257984 + HEAD_PARAMS


def test_fine_tune_at_zero_trains_the_whole_base(recipe) -> None:
    base, model = recipe
    freeze(base, 0)
    assert all(p.requires_grad for p in base.parameters())
    trainable, frozen = count_params(model)
    assert frozen == BN_MOVING_STATS
    assert frozen == 2 * sum(m.num_features for m in base.modules() if isinstance(m, nn.BatchNorm2d))
    assert trainable == 2257984 - BN_MOVING_STATS + HEAD_PARAMS


def test_every_fine_tune_at_matches_independent_count(recipe) -> None:
    """For k = 0..154 (in the order phase A then B would call it, and back): counts, the
    ``requires_grad`` of every parameter and ``layer_table`` follow ``base.layers[:k]`` frozen."""
    base, model = recipe
    index_of = {name: i for i, name in enumerate(KERAS_LAYER_NAMES)}
    params = [(index_of[key.split(".")[0]], p.numel()) for key, p in base.named_parameters()]
    total = sum(n for _, n in params)
    previous = None
    for k in [*range(N_KERAS_LAYERS + 1), 0]:
        freeze(base, k)
        frozen_params = sum(n for i, n in params if i < k)
        expected = (total - frozen_params + HEAD_PARAMS, frozen_params + BN_MOVING_STATS)
        assert count_params(model) == expected, k
        for key, p in base.named_parameters():
            assert p.requires_grad == (index_of[key.split(".")[0]] >= k), (k, key)
        table = layer_table(base)
        assert [row[0] for row in table] == list(range(N_KERAS_LAYERS))
        assert [row[2] for row in table] == KERAS_LAYER_NAMES
        assert [row[3] for row in table] == [i >= k for i in range(N_KERAS_LAYERS)], k
        if previous is not None and k > 0:  # monotone while k grows
            assert expected[0] <= previous[0] and expected[1] >= previous[1]
        previous = expected
    assert count_params(model) == (total + HEAD_PARAMS, BN_MOVING_STATS)  # back at k = 0


def test_layer_table_types(recipe) -> None:
    base, _ = recipe
    table = layer_table(freeze(base, 100))
    assert table[0] == (0, "InputLayer", "input_layer", False)
    assert table[1] == (1, "Conv2D", "Conv1", False)
    assert table[99] == (99, "BatchNormalization", "block_11_expand_BN", False)
    assert table[100] == (100, "ReLU", "block_11_expand_relu", True)
    assert table[153] == (153, "ReLU", "out_relu", True)
    types = {row[1] for row in table}
    assert types == {"InputLayer", "Conv2D", "BatchNormalization", "ReLU", "ZeroPadding2D",
                     "DepthwiseConv2D", "Add"}
    assert sum(row[1] == "ZeroPadding2D" for row in table) == 4
    assert sum(row[1] == "Add" for row in table) == 10


@pytest.mark.parametrize("bad", [-1, 155, 1.5, True, "100", None])
def test_out_of_range_fine_tune_at_is_a_user_error(recipe, bad) -> None:
    base, model = recipe
    freeze(base, 100)
    with pytest.raises(UserError, match=re.escape(f"fine_tune_at={bad!r}")) as err:
        freeze(base, bad)
    assert "0..154" in str(err.value)
    assert count_params(model) == PHASE_B_COUNTS  # nothing changed
    assert base.frozen_below == 100


def test_num_batches_tracked_is_not_counted(recipe) -> None:
    base, model = recipe
    freeze(base, 154)
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(1000)
    assert count_params(model) == PHASE_A_COUNTS
    assert count_params(nn.BatchNorm2d(8)) == (16, 16)
    no_stats = nn.BatchNorm2d(8, track_running_stats=False)
    assert count_params(no_stats) == (16, 0)


def test_freezing_then_training_updates_only_unfrozen(recipe) -> None:
    base, model = recipe
    freeze(base, 100)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = base.preprocess(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255)
    model(x).sum().backward()
    optimizer.step()
    after = base.state_dict()
    index_of = {name: i for i, name in enumerate(KERAS_LAYER_NAMES)}
    for key, p in base.named_parameters():
        if index_of[key.split(".")[0]] < 100:
            assert p.grad is None, key
            assert torch.equal(after[key], before[key]), key
    # Above the cut the gradients arrive (Keras' init: only the top is guaranteed non-zero).
    assert base.Conv_1_bn.bias.grad is not None and base.Conv_1_bn.bias.grad.abs().max() > 0
    assert not torch.equal(after["Conv_1_bn.bias"], before["Conv_1_bn.bias"])
