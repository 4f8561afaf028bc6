"""Tests of :mod:`tl_torch.backbones.folding`: the speed path of the bases other than MobileNetV2
(``TransferModule(fast=True)``: channels-last, gradient-free Conv + BatchNorm pairs folded, their
activations fused into oneDNN's convolution) computes what the base's own modules compute
(``fast=False``), forward and backward, in both phases.

float32 is held to the band of :mod:`tl_common.bands`, measured in the same run: both float32
paths against the float64 run of the base's own modules, the fast path's error at most
``bands.RATIO`` times the plain path's plus a floor of a few ulps. BatchNorm statistics are drawn
at random (Keras' initial 0 and 1 would make folding an identity).
Run: ``python -m pytest tests/test_backbones_folding.py -q``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tl_common import bands
from tl_torch import internals
from tl_torch.backbones import folding
from tl_torch.fused import absorb_padding
from tl_torch.module import TransferModule
from tl_torch.weights import build_base

BASES = ("mobilenet_v3_large", "efficientnet_b0", "resnet50")
SIZE = 64


def random_module(name: str, fast: bool = True, size: int = SIZE) -> TransferModule:
    base = build_base("none", size, generator=torch.Generator().manual_seed(1), base=name)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn in base.batchnorms():
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.2, 0.2, generator=g)
    return TransferModule(base, seed=0, fast=fast).eval()


def images(dtype: torch.dtype = torch.float32, size: int = SIZE) -> torch.Tensor:
    return (torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3)) * 255).to(dtype)


def run(module: TransferModule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and every trainable parameter's gradient of a fixed weighted sum of them, flat."""
    module.zero_grad(set_to_none=True)
    logits = module(x)
    (logits * torch.linspace(-1, 1, logits.numel(), dtype=x.dtype).reshape(logits.shape)).sum() \
        .backward()
    grads = [p.grad.flatten() for p in module.parameters() if p.requires_grad]
    return logits.detach(), torch.cat(grads).detach()


@pytest.mark.parametrize(("phase", "size"), [("feature_extraction", SIZE), ("fine_tuning", SIZE),
                                             ("feature_extraction", SIZE + 1)])
@pytest.mark.parametrize("name", BASES)
def test_fast_path_equals_the_bases_own_modules_within_the_measured_band(name, phase, size,
                                                                           monkeypatch):
    """Even sizes pad strided convolutions 0 before and 1 after, odd ones 1 and 1."""
    fast = random_module(name, size=size)
    fast.set_phase(phase)
    plain = copy.deepcopy(fast)
    plain.fast = False
    exact = copy.deepcopy(plain).double()
    fused = []
    original = internals.conv_pointwise
    monkeypatch.setattr(internals, "conv_pointwise",
                        lambda *a: fused.append(a[5]) or original(*a))

    want, want_grads = run(exact, images(torch.float64, size))
    got, got_grads = run(fast, images(size=size))
    assert fused, "no pair ran through oneDNN's fused convolution"
    fused_count = len(fused)
    ref, ref_grads = run(plain, images(size=size))
    assert len(fused) == fused_count   # the plain path never folds
    for what, e, r, g in (("logits", want, ref, got), ("gradients", want_grads, ref_grads,
                                                         got_grads)):
        band = bands.against_exact(e.numpy(), r.numpy(), g.numpy())
        assert band.passed, f"{name} {phase} {what}: {band}"
    # Fine-tuning folds only the frozen pairs: fewer fused calls than feature extraction.
    frozen = [p for p in fast.folded_base.pairs if fast.folded_base.frozen(p)]
    assert 0 < len(frozen) <= len(fast.folded_base.pairs)
    if phase == "fine_tuning":
        assert len(frozen) < len(fast.folded_base.pairs)


@pytest.mark.parametrize("name", BASES)
def test_every_batchnorm_is_paired_with_its_convolution(name):
    base = random_module(name).base
    pairs = folding.pairs_of(base)
    assert len(pairs) == sum(1 for _ in base.batchnorms())
    for pair in pairs:
        conv, bn = base.layer(pair.conv), base.layer(pair.bn)
        assert conv.out_channels == bn.num_features, pair
        assert base.keras_layer(pair.conv).index < base.keras_layer(pair.bn).index
        if pair.activation is not None:
            assert base.keras_layer(pair.activation).index == base.keras_layer(pair.bn).index + 1
    assert {p.post_op for p in pairs} <= {"none", *folding.ONEDNN_ACTIVATIONS.values()}


def test_the_fold_follows_the_bases_weights():
    """Built once: a changed BatchNorm statistic (load_state_dict) changes the fast result as it
    changes the plain one."""
    module = random_module("resnet50")
    plain = copy.deepcopy(module)
    plain.fast = False
    state = module.state_dict()
    state["base.conv2_block1_1_bn.running_var"] = state["base.conv2_block1_1_bn.running_var"] * 4
    with torch.no_grad():
        before = module(images())
    for m in (module, plain):
        m.load_state_dict(state)
    exact = copy.deepcopy(plain).double()
    with torch.no_grad():
        after, ref, want = module(images()), plain(images()), exact(images(torch.float64))
    assert not torch.allclose(before, after)
    band = bands.against_exact(want.numpy(), ref.numpy(), after.numpy())
    assert band.passed, band


@pytest.mark.parametrize("name", BASES)
def test_without_onednn_the_fold_takes_torchs_public_operations(name):
    """``torch.backends.mkldnn`` off: the folded pairs, absorbed paddings and ResNet's fused
    residual ends run as F.conv2d and separate operations, with the same result."""
    fast = random_module(name, size=SIZE + 1)
    plain = copy.deepcopy(fast)
    plain.fast = False
    exact = copy.deepcopy(plain).double()
    with torch.no_grad():
        want = exact(images(torch.float64, SIZE + 1))
        ref = plain(images(size=SIZE + 1))
        with torch.backends.mkldnn.flags(enabled=False):
            got = fast(images(size=SIZE + 1))
    band = bands.against_exact(want.numpy(), ref.numpy(), got.numpy())
    assert band.passed, f"{name}: {band}"


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("amounts", [(0, 1, 0, 1), (1, 1, 1, 1), (1, 2, 1, 2), (0, 1, 1, 1),
                                     (2, 2, 1, 2)])
def test_a_padding_absorbed_into_the_convolution_gives_the_padded_convolutions_sums(kernel,
                                                                                    amounts):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 11, 10, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(6, 6, kernel, stride=2, groups=6, bias=False).double()
    absorbed = absorb_padding(conv.weight, conv, amounts)
    assert absorbed is not None
    weight, padding = absorbed
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, amounts), conv.weight,
                                      stride=2, groups=6)
    got = torch.nn.functional.conv2d(x, weight, stride=2, padding=padding, groups=6)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("amounts", [(1, 0, 0, 0), (0, 2, 0, 0), (0, 0, 0, 3)])
def test_a_padding_that_is_not_tfs_same_is_not_absorbed(amounts):
    conv = torch.nn.Conv2d(4, 4, 3, stride=2)
    assert absorb_padding(conv.weight, conv, amounts) is None
    assert absorb_padding(conv.weight, torch.nn.Conv2d(4, 4, 3, padding=1),
                                (0, 1, 0, 1)) is None


def test_fold_pairs_refuses_mobilenet_v2_in_one_line():
    with pytest.raises(TypeError, match="tl_torch.fast.fold"):
        folding.fold_pairs(build_base("none", SIZE))
