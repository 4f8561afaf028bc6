"""Tests of :mod:`tl_torch.fast`: the folded base computes what the base computes, forward and
backward, at every freezing point the recipe uses; the fused oneDNN path is taken and exact.

Weights: every tensor random, BatchNorm statistics included (the ``random_base`` fixture;
Keras' initial statistics, 0 and 1, would make folding an identity), and, in float64,
BatchNorm statistics measured on data (``calibrated_base``). In float32 the calibrated base's
gradients part by ~5e-3 relative between the two computation orders (some channels of tiny
variance amplify rounding; float64 agrees to 1e-10), so float32 is checked on the former.
Run: ``python -m pytest tests/test_torch_fast.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from tl_torch import fast
from tl_torch.fast import FrozenConvReLU6, LiveFoldedConvBN, folded_modules
from tl_torch.freezing import freeze

#: float64: folding reorders a few products per output; the rest is the same arithmetic.
FLOAT64_RTOL = 1e-10
#: float32: the same reordering, over 52 layers of rounding (measured ~1e-6 relative).
FLOAT32_RTOL = 1e-4
SIZE = 64
#: Input scale that takes >10 % of the stem's outputs past 6 (checked in the test).
STEM_SATURATING_SCALE = 20.0


def images(dtype: torch.dtype, channels_last: bool, scale: float = 1.0,
           size: int = SIZE) -> torch.Tensor:
    """``scale`` > 1 drives many stem outputs past ReLU6's upper bound."""
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    x = (x * 2 - 1) * scale
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("fine_tune_at", [0, 100, 154])
@pytest.mark.parametrize("dtype, rtol, channels_last", [
    (torch.float64, FLOAT64_RTOL, False),   # convolutions only
    (torch.float64, FLOAT64_RTOL, True),    # trainable 1x1 convolutions as matrix products
    (torch.float32, FLOAT32_RTOL, True),    # as the port trains: oneDNN's fused convolutions too
])
def test_folded_base_equals_base_forward_and_backward(random_base, fine_tune_at, dtype, rtol,
                                                      channels_last):
    base = random_base(0).to(dtype)
    freeze(base, fine_tune_at)
    stats = {k: v.clone() for k, v in base.state_dict().items()}
    x = images(dtype, channels_last=channels_last)
    trainable = [p for p in base.parameters() if p.requires_grad]

    def run(fast_layers):
        base.fast_layers = fast_layers
        base.zero_grad(set_to_none=True)
        out = base(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)).sum().backward() \
            if trainable else None
        return out.detach(), [p.grad.clone() for p in trainable]

    expected, expected_grads = run(None)
    got, grads = run(folded_modules(base))
    assert rel_err(got, expected) < rtol
    assert len(grads) == len(expected_grads) == len(trainable)
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_err(g, e) < rtol
    # Nothing of the base changed: weights and BatchNorm statistics.
    assert all(torch.equal(v, stats[k]) for k, v in base.state_dict().items())


def test_which_layers_are_folded_how(random_base):
    base = random_base(0)
    freeze(base, 100)
    layers = folded_modules(base)
    by_type = {name: type(module).__name__ for name, module in layers.items()}
    assert by_type["block_10_expand"] == "FrozenConvReLU6"     # frozen conv + BN + ReLU6
    assert by_type["block_6_expand"] == "PaddedFrozenConvReLU6"  # ... + ZeroPadding2D
    assert by_type["block_6_pad"] == "Identity"
    assert "block_13_pad" not in by_type                       # after a trainable convolution
    assert by_type["block_10_project"] == "Conv2d"             # frozen conv + BN, no ReLU6
    assert by_type["block_11_expand"] == "FrozenConvReLU6"     # BN 99 frozen, ReLU 100 weightless
    assert by_type["block_11_depthwise"] == "LiveFoldedConvBN"  # trainable: folded at each call
    assert by_type["block_11_depthwise_relu"] == "ReLU6"
    assert all(by_type[layer.name] == "Identity"
               for layer in base.keras_layers if layer.type == "BatchNormalization")
    # The live fold reads the current parameters: a change shows in the next call.
    module = layers["Conv_1"]
    assert isinstance(module, LiveFoldedConvBN)
    x = torch.rand(2, 320, 2, 2)
    before = module(x)
    with torch.no_grad():
        base.Conv_1_bn.bias.add_(1.0)
    assert torch.allclose(module(x), before + 1.0, atol=1e-5)


@pytest.mark.skipif(not fast._FUSED_CONVOLUTION, reason="this torch has no oneDNN fused convolution")
def test_fused_convolution_is_used_and_exact(random_base, monkeypatch):
    base = random_base(0)
    freeze(base, 154)
    layers = folded_modules(base)
    x = images(torch.float32, channels_last=True, scale=STEM_SATURATING_SCALE)
    stem = layers["Conv1"].conv
    with torch.no_grad():
        assert (stem(x) > 6).float().mean() > 0.1  # the upper bound matters here
    base.fast_layers = layers
    with torch.no_grad():
        fused = base(x)
    calls = []
    original = FrozenConvReLU6.forward

    def counting(self, inp):
        calls.append(inp.requires_grad)
        return original(self, inp)

    monkeypatch.setattr(FrozenConvReLU6, "forward", counting)
    monkeypatch.setattr(fast, "_FUSED_CONVOLUTION", False)  # the two-operation fallback
    with torch.no_grad():
        unfused = base(x)
    assert len(calls) == 35  # the stem, and each block's expand (not block 0's) and depthwise
    assert torch.equal(fused, unfused)


def test_fused_path_falls_back_when_the_input_needs_a_gradient(calibrated_base):
    """Input gradients (saliency maps...) flow through the frozen layers."""
    base = calibrated_base(0, SIZE).double()
    freeze(base, 154)
    x = images(torch.float64, channels_last=False).requires_grad_(True)
    base.fast_layers = folded_modules(base)
    base(x).sum().backward()
    fast_grad = x.grad.clone()
    x.grad = None
    base.fast_layers = None
    base(x).sum().backward()
    assert rel_err(fast_grad, x.grad) < FLOAT64_RTOL


@pytest.mark.parametrize("size", [75, 97])
def test_folded_base_equals_base_at_odd_sizes(calibrated_base, size):
    """Odd sizes pad the strided blocks 1 on each side, even ones 0 before and 1 after."""
    base = calibrated_base(0, size).double()
    freeze(base, 154)
    x = images(torch.float64, channels_last=False, size=size)
    with torch.no_grad():
        expected = base(x)
        base.fast_layers = folded_modules(base)
        got = base(x)
    assert rel_err(got, expected) < FLOAT64_RTOL
