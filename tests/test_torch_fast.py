"""Tests of :mod:`tl_torch.fast`: ``fold(base)`` computes what the base computes, forward and
backward, at every freezing point the recipe uses; it follows the base's weights and freezing
without being rebuilt; the fused oneDNN path is taken and exact.

Weights: every tensor random, BatchNorm statistics included (the ``random_base`` fixture;
Keras' initial statistics, 0 and 1, would make folding an identity), and, in float64,
BatchNorm statistics measured on data (``calibrated_base``). In float32 the calibrated base's
gradients part by ~5e-3 relative between the two computation orders (some channels of tiny
variance amplify rounding; float64 agrees to 1e-10), so float32 is checked on the former.
Run: ``python -m pytest tests/test_torch_fast.py -q``.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tl_torch import fast, frozen_graph, internals, runtime
from tl_torch.fast import FoldedBase, FoldedConvBN, fold
from tl_torch.freezing import freeze
from tl_torch.padding import Conv2dSame

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

    def run(model):
        base.zero_grad(set_to_none=True)
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)).sum().backward() \
            if trainable else None
        return out.detach(), [p.grad.clone() for p in trainable]

    expected, expected_grads = run(base)
    got, grads = run(fold(base))
    assert rel_err(got, expected) < rtol
    assert len(grads) == len(expected_grads) == len(trainable)
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_err(g, e) < rtol
    # Nothing of the base changed: weights and BatchNorm statistics.
    assert all(torch.equal(v, stats[k]) for k, v in base.state_dict().items())


def test_folded_base_holds_nothing_of_its_own(random_base):
    base = random_base(0)
    folded = fold(base)
    assert isinstance(folded, FoldedBase) and folded.base is base
    assert list(folded.parameters()) == [] and folded.state_dict() == {}
    assert all(isinstance(unit, FoldedConvBN) for unit in folded.units)
    assert len(folded.units) == 52   # every convolution + BatchNorm pair of MobileNetV2
    # Those a ReLU6 follows, and the strided blocks' paddings after them.
    assert sum(unit.relu for unit in folded.units) == 35
    assert sum(unit.pad is not None for unit in folded.units) == 4


def test_one_fold_follows_the_base(random_base):
    """Built once, the folded base reads the base's weights and freezing at each call: loading
    other weights, unfreezing and changing dtype need no rebuild."""
    base = random_base(0).double()
    folded = fold(base)
    freeze(base, 154)
    x = images(torch.float64, channels_last=False, size=32)[:1]
    with torch.no_grad():
        assert rel_err(folded(x), base(x)) < FLOAT64_RTOL
        base.load_state_dict(random_base(1).double().state_dict())
        assert rel_err(folded(x), base(x)) < FLOAT64_RTOL
        base.Conv_1_bn.bias.add_(1.0)
        assert rel_err(folded(x), base(x)) < FLOAT64_RTOL
    assert not folded(x).requires_grad
    freeze(base, 100)   # fine-tuning begins: the upper layers' gradients flow
    folded(x).sum().backward()
    got = {n: p.grad for n, p in base.named_parameters() if p.grad is not None}
    base.zero_grad(set_to_none=True)
    base(x).sum().backward()
    want = {n: p.grad for n, p in base.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    assert len(got) == sum(p.requires_grad for p in base.parameters()) > 0
    assert all(rel_err(got[n], want[n]) < FLOAT64_RTOL for n in got)


def test_kept_folded_weights_follow_every_change_of_their_sources(random_base, monkeypatch):
    """The gradient-free units fold once and reuse the result while nothing they are folded from
    changed; each kind of change below is seen at the next call."""
    base = random_base(0).double()
    freeze(base, 154)
    folded = fold(base)
    x = images(torch.float64, channels_last=False, size=32)[:1]
    folds = []
    real_fold = fast.fold_conv_bn

    def counting(conv, bn, **kw):
        folds.append(conv)
        return real_fold(conv, bn, **kw)

    monkeypatch.setattr(fast, "fold_conv_bn", counting)

    def check(expect_folds: int) -> None:
        folds.clear()
        with torch.no_grad():
            assert rel_err(folded(x), base(x)) < FLOAT64_RTOL
        assert len(folds) == expect_folds

    check(52)   # first call: every unit folds
    check(0)    # nothing changed: nothing folds again
    with torch.inference_mode():   # kept weights made in inference mode serve outside it
        folded(x)
    with torch.no_grad():          # in place, one source of one unit at a time
        base.Conv1.weight.mul_(1.5)
        check(1)
        base.block_3_project_BN.running_var.add_(0.25)
        check(1)
        base.block_3_project_BN.running_mean.sub_(0.5)
        check(1)
        base.expanded_conv_depthwise_BN.weight.neg_()
        check(1)
        base.Conv_1_bn.bias.add_(1.0)
        check(1)
    base.block_5_expand.weight.data = base.block_5_expand.weight.data * 2   # a new storage
    check(1)
    with torch.no_grad():   # through state_dict()'s tensors, as the weight loaders write
        base.state_dict()["block_12_depthwise.weight"].mul_(0.5)
    check(1)
    base.load_state_dict(random_base(1).double().state_dict())
    check(52)
    base.float().double()   # new tensors, equal values: folded again, same result
    check(52)
    # An in-place change through .data is invisible to version counters: forget() it.
    base.block_16_project.weight.data.mul_(3.0)
    with torch.no_grad():
        assert rel_err(folded(x), base(x)) > 1e-3
    folded.forget()
    check(52)
    # Inputs that need a gradient run through the kept weights (folded under inference_mode).
    folded.forget()
    with torch.inference_mode():
        folded(x)
    xg = x.clone().requires_grad_(True)
    folded(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0



class _Scaled(torch.nn.Module):
    """A parametrization: the weight computed from its original at every access."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2.0


def test_computed_weights_and_a_trainable_convolution_bias_are_folded_from_what_the_base_uses(
        random_base):
    """The units read their sources from the modules' tables; a weight that is computed (a
    parametrization, not in the table) is read through the attribute instead, and folded again
    at each call (a new tensor each time); a convolution's bias that alone wants a gradient makes
    its unit trainable."""
    from torch.nn.utils import parametrize

    base = random_base(0).double()
    freeze(base, 154)
    folded = fold(base)
    x = images(torch.float64, channels_last=False, size=32)[:1]
    conv = base.block_3_project
    parametrize.register_parametrization(conv, "weight", _Scaled())
    with torch.no_grad():
        assert rel_err(folded(x), base(x)) < FLOAT64_RTOL
        conv.parametrizations.weight.original.mul_(-1.0)
        assert rel_err(folded(x), base(x)) < FLOAT64_RTOL
    parametrize.remove_parametrizations(conv, "weight")

    base.requires_grad_(False)
    top = base.Conv_1
    top.bias = torch.nn.Parameter(torch.rand(top.out_channels, dtype=torch.float64))
    assert not folded.units[-1].frozen()
    (folded(x) ** 2).sum().backward()
    folded_grad, top.bias.grad = top.bias.grad, None
    (base(x) ** 2).sum().backward()
    assert folded_grad is not None
    assert rel_err(folded_grad, top.bias.grad) < FLOAT64_RTOL

def test_a_base_with_kept_weights_saves_and_copies(random_base):
    """torch.save of a whole model refuses two tensors over one storage; the kept weights are
    left out of pickles and copies, and folded again there."""
    base = random_base(0)
    freeze(base, 154)
    model = torch.nn.Sequential(base, fold(base))   # the base and its folded twin, as a module
    x = images(torch.float32, channels_last=False, size=SIZE)[:1]
    with torch.no_grad():
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for graph in (False, True):   # packed weights, and a graph of the frozen blocks
            model[1].graph = graph
            model[1](x_cl)
        info = model[1].cache_info()
        assert info.kept == 52
        # A graph for the shape, or the reason there is none on this CPU.
        assert len(info.graphs) + len(info.fallbacks) == (1 if internals.HAS_GRAPH_FUSION else 0)
        expected = model[1](x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded[1](x), expected)
        assert loaded[1].base is loaded[0]
        copied = copy.deepcopy(model)
        copied[0].Conv1.weight.mul_(2.0)
        assert not torch.equal(copied[1](x), expected)
        assert torch.equal(model[1](x), expected)


needs_fused = pytest.mark.skipif(not internals.HAS_FUSED_CONVOLUTION,
                                 reason="this torch has no oneDNN fused convolution")


@needs_fused
def test_fused_convolution_is_used_and_exact(random_base, monkeypatch):
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 154)
    folded = fold(base, graph=False)   # each unit's own oneDNN call (the graph: below)
    x = images(torch.float32, channels_last=True, scale=STEM_SATURATING_SCALE)
    with torch.no_grad():
        assert (base.bn_Conv1(base.Conv1(x)) > 6).float().mean() > 0.1  # the bound matters here
    calls = {"hardtanh": 0, "none": 0, "add": 0, "packed": 0}
    mkldnn = torch.ops.mkldnn._convolution_pointwise

    class Counting:   # the op with its two overloads, counted
        def __call__(self, *args):
            calls[args[7]] += 1                 # the post-op: "hardtanh" (ReLU6) or "none"
            calls["packed"] += args[1].is_mkldnn
            return mkldnn(*args)

        def binary(self, *args):
            calls["add"] += 1
            calls["packed"] += args[2].is_mkldnn
            return mkldnn.binary(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", Counting())
    with torch.no_grad():
        fused = folded(x)
        fused_3 = folded(x[:3])   # another batch size: weights packed for it too
    # The stem, and each block's expand (not block 0's) and depthwise with ReLU6; each residual
    # block's last convolution with its shortcut; the other blocks' last with no post-op; every
    # weight in oneDNN's layout.
    assert calls == {"hardtanh": 70, "none": 14, "add": 20, "packed": 104}
    monkeypatch.setattr(internals, "HAS_FUSED_CONVOLUTION", False)  # the two-operation fallback
    with torch.no_grad():
        unfused, unfused_3 = folded(x), folded(x[:3])
    assert calls == {"hardtanh": 70, "none": 14, "add": 20, "packed": 104}
    assert torch.equal(fused, unfused) and torch.equal(fused_3, unfused_3)


@needs_fused
def test_packed_weights_go_with_the_kept_weights(random_base, monkeypatch):
    """A packed weight is the kept folded weight in oneDNN's layout: dropped whenever that is
    folded again (a stale one would compute with the old weights), and kept for a few input
    shapes only."""
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 154)
    folded = fold(base, graph=False)
    x = images(torch.float32, channels_last=True)

    def unfused(inputs: torch.Tensor) -> torch.Tensor:
        with monkeypatch.context() as m:
            m.setattr(internals, "HAS_FUSED_CONVOLUTION", False)
            return folded(inputs)

    with torch.no_grad():
        folded(x)
        assert all(len(shapes) == 1 for shapes in folded.cache_info().packed_shapes)
        base.block_3_expand.weight.mul_(-2.0)       # one weight changed in place
        base.Conv_1_bn.running_var.add_(3.0)        # and one statistic
        assert torch.equal(folded(x), unfused(x))
        assert rel_err(folded(x), base(x)) < FLOAT32_RTOL
        # Six batch sizes, one of them twice. (Batch 1 is left out: there torch's two-operation
        # fallback itself rounds differently from the fused call, with or without packing.)
        x8 = torch.cat([x, x.flip(0)])
        for n in (8, 6, 5, 3, 2, 5):
            assert torch.equal(folded(x8[:n]), unfused(x8[:n]))
        assert all(len(shapes) == fast.PACKED_SHAPES
                   for shapes in folded.cache_info().packed_shapes)
        folded.forget()
        assert folded.cache_info().kept == 0


#: The graph of the frozen blocks sums in other orders than the units' own calls: its float32
#: error against float64 is held to this multiple of theirs (measured 0.6-1.0), plus a floor.
GRAPH_ERROR_MULTIPLE = 4.0
GRAPH_ERROR_FLOOR = 1e-6
#: The recipe's size: at 64 px oneDNN computes the fused pairs bitwise as the units do.
GRAPH_SIZE = 160
needs_graph = pytest.mark.skipif(not internals.HAS_GRAPH_FUSION, reason="this torch has no oneDNN Graph")


def graph_shape(folded: FoldedBase, x: torch.Tensor) -> tuple[int, int]:
    """(stages the graph for inputs like ``x`` runs, its oneDNN Graph partitions that compute
    two convolutions together: a block's 1x1 expansion and its depthwise convolution)."""
    (graph,) = [g for g in folded.cache_info().graphs if g.input_shape == tuple(x.shape)]
    return graph.stages, graph.fused_pairs


def graph_within_rounding(folded: FoldedBase, base, x: torch.Tensor) -> torch.Tensor:
    """``folded(x)`` once its graph is optimized (two profiling calls first), checked against
    float64 with the units' own float32 error as the yardstick."""
    exact = copy.deepcopy(base).double()
    units = fold(base, graph=False)
    for _ in range(3):
        got = folded(x)
    want = exact(x.double())
    err, own_err = rel_err(got, want), rel_err(units(x), want)
    assert err <= GRAPH_ERROR_MULTIPLE * own_err + GRAPH_ERROR_FLOOR, (err, own_err)
    return got


@needs_graph
@pytest.mark.parametrize(("fine_tune_at", "stages", "pairs"), [
    (154, 19, 16),   # the whole base: its 16 blocks with an expansion
    (100, 12, 10),   # stem and blocks 0-10 (block 11's depthwise trains)
])
def test_frozen_blocks_run_as_one_graph(random_base, fine_tune_at, stages, pairs):
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, fine_tune_at)
    folded = fold(base)
    x = images(torch.float32, channels_last=True, size=GRAPH_SIZE)
    with torch.inference_mode():   # as Lightning validates and predicts
        for n in (4, 3, 4):        # a graph per input shape
            graph_within_rounding(folded, base, x[:n])
            assert graph_shape(folded, x[:n]) == (stages, pairs)
    assert sorted(g.input_shape[0] for g in folded.cache_info().graphs) == [3, 4]


@needs_graph
@pytest.mark.parametrize(("pad_type", "size", "flipped"), [
    ("same", GRAPH_SIZE, True),        # Keras' padding, one after, on even sizes
    ("same", 150, True),               # and on both sides of an odd one (75)
    ("symmetric", GRAPH_SIZE, False),  # torchvision's on an even size: the frame can't turn
    ("symmetric", 97, True),           # odd sizes all the way: one on both sides, turnable
])
def test_the_graph_turns_its_frame_where_the_padding_allows(random_base, pad_type, size,
                                                            flipped):
    """In the flipped frame Keras' padding of a strided convolution becomes the convolution's
    own, and so do the odd sizes' and torchvision's on odd sizes; torchvision's on an even size
    would move the windows by a pixel there, so that graph runs in the usual frame."""
    base = random_base(0, pad_type=pad_type).to(memory_format=torch.channels_last)
    freeze(base, 154)
    folded = fold(base)
    x = images(torch.float32, channels_last=True, size=size)
    with torch.no_grad():
        graph_within_rounding(folded, base, x)
    (graph,) = folded.cache_info().graphs
    assert graph.flipped is flipped


@pytest.mark.parametrize("pad_type", ["same", "symmetric"])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize(("kernel", "stride"), [(1, 1), (1, 2), (2, 1), (3, 1), (3, 2), (5, 2)])
def test_the_flipped_frame_takes_exactly_the_convolutions_it_computes(kernel, stride, size,
                                                                       pad_type):
    """A convolution in the flipped frame, its padding before taken as a symmetric one, is its
    usual output turned where the windows tile the padded input and that padding adds nothing
    they reach; the frame must take exactly those (MobileNetV2's among them) and refuse the
    rest, which would compute something else."""
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, kernel, stride=stride, pad_type=pad_type).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    turned = conv.weight.flip((2, 3))
    with torch.no_grad():
        want = conv(x)
        left, right, top, bottom = conv.pad.amounts(size, size)
        naive = F.conv2d(x.flip((2, 3)), turned, conv.bias, stride, (bottom, right)).flip((2, 3))
        right_answer = naive.shape == want.shape and torch.allclose(naive, want, rtol=1e-12)
        try:
            got = frozen_graph.flipped_conv(x.flip((2, 3)), conv, turned, conv.bias,
                                           None).flip((2, 3))
        except frozen_graph.NotFlippable:
            got = None
    assert (got is not None) is right_answer
    if got is not None:
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    if kernel == 3 and pad_type == "same" or (kernel, stride) == (1, 1):
        assert got is not None   # every convolution of MobileNetV2 with Keras' padding


@needs_graph
def test_fine_tuning_gradients_pass_the_graph(random_base):
    """In fine-tuning the graph runs the frozen blocks; the trainable ones after it get their
    gradients as without it."""
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 100)
    exact = copy.deepcopy(base).double()
    x = images(torch.float32, channels_last=True, size=GRAPH_SIZE)

    def grads(model, inputs):
        source = exact if model is exact else base
        for _ in range(3):   # the graph's two profiling calls, then the fused one
            source.zero_grad(set_to_none=True)
            model(inputs).square().sum().backward()
        return {n: p.grad.double() for n, p in source.named_parameters() if p.grad is not None}

    want = grads(exact, x.double())
    own = grads(fold(base, graph=False), x)
    folded = fold(base)
    got = grads(folded, x)
    assert got.keys() == own.keys() == want.keys() and len(want) > 0
    err = max(rel_err(got[n], want[n]) for n in want)
    own_err = max(rel_err(own[n], want[n]) for n in want)
    assert err <= GRAPH_ERROR_MULTIPLE * own_err + GRAPH_ERROR_FLOOR, (err, own_err)
    assert graph_shape(folded, x) == (12, 10)


@needs_graph
def test_the_graph_gives_one_result_from_its_first_call(random_base):
    """TorchScript profiles a graph unfused before it fuses it; were that first call's result
    handed out, a run resumed from a checkpoint would differ from an uninterrupted one."""
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 154)
    x = images(torch.float32, channels_last=True, size=GRAPH_SIZE)
    folded = fold(base)
    with torch.no_grad():
        first = folded(x)
        assert graph_shape(folded, x) == (19, 16)
        folded(x[:3])
    with torch.enable_grad():
        assert torch.equal(folded(x), first)
    with torch.inference_mode():
        assert torch.equal(folded(x), first)
        assert torch.equal(fold(base)(x), first)


@needs_graph
def test_the_graph_follows_the_weights(random_base, monkeypatch):
    """A graph first holds the kept weights as constants (oneDNN keeps them in its layout);
    once any is folded again, that shape's graph is traced once more reading them as buffers,
    and new ones are handed to it from then on (torch keeps memory of every trace); new shapes
    past the last trace allowed run through the units."""
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 154)
    folded = fold(base)
    x = images(torch.float32, channels_last=True, size=GRAPH_SIZE)
    with torch.no_grad():
        first = graph_within_rounding(folded, base, x)
        graph_within_rounding(folded, base, x[:3])
        info = folded.cache_info()
        assert info.traces == 2
        assert all(g.constants and not g.reads_weights for g in info.graphs)
        base.block_3_depthwise.weight.mul_(-2.0)   # in place, inside the graph (turned there)
        changed = graph_within_rounding(folded, base, x)
        assert rel_err(changed, first) > 1e3 * GRAPH_ERROR_FLOOR   # a stale graph fails above
        graph_within_rounding(folded, base, x[:3])
        info = folded.cache_info()
        assert info.traces == 4 and len(info.graphs) == 2
        assert all(not g.constants and g.reads_weights for g in info.graphs)
        base.load_state_dict(random_base(1).state_dict())
        graph_within_rounding(folded, base, x)
        graph_within_rounding(folded, base, x[:3])
        assert folded.cache_info().traces == 4   # handed the new weights, not traced again
        monkeypatch.setattr(frozen_graph, "GRAPH_TRACES", 4)
        assert torch.equal(folded(x[:2]), fold(base, graph=False)(x[:2]))
        info = folded.cache_info()
        assert info.traces == 4 and len(info.graphs) == 2 and info.fallbacks == {}
        folded.forget()
        assert folded.cache_info().graphs == ()


@needs_graph
def test_the_bf16_graph_follows_the_weights(random_base):
    """Under autocast to bf16 the frozen blocks get a graph of their own beside the float32 one
    of the same shape, in bf16 where oneDNN has bf16 kernels; it follows the weights as the
    float32 one does, and its error against float64 stays within a multiple of the bf16 units'."""
    from tl_torch import fused

    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 154)
    folded = fold(base)
    x = images(torch.float32, channels_last=True, size=GRAPH_SIZE)

    def bf16_within_rounding(before: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, units = folded(x).double(), fold(base, graph=False)(x).double()
        want = copy.deepcopy(base).double()(x.double())
        band = GRAPH_ERROR_MULTIPLE * rel_err(units, want)
        assert rel_err(got, want) <= band, (rel_err(got, want), band)
        if before is not None:   # the result before the change would fail: the band can tell
            assert rel_err(before, want) > band, (rel_err(before, want), band)
        return got

    with torch.no_grad():
        graph_within_rounding(folded, base, x)
        first = bf16_within_rounding()
        dtypes = {g.dtype for g in folded.cache_info().graphs}
        assert dtypes == ({torch.float32, torch.bfloat16} if fused.BF16_KERNELS
                          else {torch.float32})
        base.Conv_1_bn.bias.add_(1.0)   # in place, inside the graph (the top convolution's fold)
        changed = bf16_within_rounding(first)
        base.load_state_dict(random_base(1).state_dict())
        bf16_within_rounding(changed)
    assert folded.cache_info().fallbacks == {}


@needs_graph
@pytest.mark.parametrize(("pad_type", "fine_tune_at"), [
    ("same", 154), ("symmetric", 154), ("same", 100)])
def test_the_graph_hands_out_channels_last_tensors(random_base, pad_type, fine_tune_at):
    """What the graph returns stays channels-last, as the units' results are: in either frame,
    ending in a ReLU6 (the whole base) or in a projection (fine-tuning). Traced in place, the
    last ReLU6 left the graph's output without a recorded layout, and oneDNN Graph wrote it
    NCHW through one more reorder."""
    base = random_base(0, pad_type=pad_type).to(memory_format=torch.channels_last)
    freeze(base, fine_tune_at)
    folded = fold(base)
    x = images(torch.float32, channels_last=True, size=GRAPH_SIZE)
    after = []   # the layout of what the graph hands to the units after it, if any
    with torch.no_grad():
        folded(x)
        (graph,) = folded.cache_info().graphs
        if graph.stages < len(folded.stages):
            folded.stages[graph.stages].units[0].register_forward_pre_hook(
                lambda _, args: after.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        for _ in range(2):
            assert folded(x).is_contiguous(memory_format=torch.channels_last)
    assert after == ([True, True] if fine_tune_at == 100 else [])


@needs_graph
def test_a_shape_that_fails_to_trace_runs_through_the_units(random_base, monkeypatch):
    """Where oneDNN cannot build a graph for one input shape, that shape runs through the units
    with their numbers, after one warning, and is reported; other shapes keep their graphs."""
    real_trace = torch.jit.trace

    def picky(module, example, **kwargs):
        if example.shape[0] == 3:
            raise RuntimeError("no kernel for this shape\nsecond line")
        return real_trace(module, example, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", picky)
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, 154)
    folded, units = fold(base), fold(base, graph=False)
    x = images(torch.float32, channels_last=True, size=SIZE)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match=r"\(3, 3, 64, 64\) run through the folded units"
                                                r".*no kernel for this shape\)$"):
            got = folded(x[:3])
        assert torch.equal(got, units(x[:3]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # reported once
            assert torch.equal(folded(x[:3]), got)
            graph_within_rounding(folded, base, x)
    info = folded.cache_info()
    assert info.fallbacks == {(19, (3, 3, SIZE, SIZE), torch.float32):
                              "RuntimeError: no kernel for this shape"}
    assert [g.input_shape for g in info.graphs] == [tuple(x.shape)] and info.traces == 1


def test_fused_path_falls_back_when_the_input_needs_a_gradient(calibrated_base):
    """Input gradients (saliency maps...) flow through the frozen layers."""
    base = calibrated_base(0, SIZE).double()
    freeze(base, 154)
    x = images(torch.float64, channels_last=False).requires_grad_(True)
    fold(base)(x).sum().backward()
    fast_grad = x.grad.clone()
    x.grad = None
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
        got = fold(base)(x)
    assert rel_err(got, expected) < FLOAT64_RTOL


@pytest.mark.parametrize(("kernels", "native", "accelerator", "precision", "warns"), [
    (False, False, "cpu", "bf16-mixed", True),
    (True, False, "auto", "bf16-true", True),
    (True, True, "cpu", "bf16-mixed", False),
    (False, False, "cpu", "32-true", False),
    (False, False, "gpu", "bf16-mixed", False),
])
def test_bf16_on_a_cpu_that_emulates_it_is_one_warning(monkeypatch, kernels, native, accelerator,
                                                       precision, warns):
    monkeypatch.setattr(runtime, "bf16_support", lambda: runtime.Bf16Support(kernels, native))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    warning = runtime.bf16_cost_warning(precision, accelerator)
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith(f"warning: --precision {precision} on this CPU runs ")
        assert "x the time of 32-true here" in warning and "\n" not in warning


@pytest.mark.parametrize("isa", ["AVX2", "SSE41"])
def test_bf16_support_follows_the_onednn_cap(isa):
    """Capped below AVX-512, oneDNN has no bf16 kernels and nothing is native, whatever the
    CPU; asked of torch in a process started under the cap."""
    code = ("from tl_torch.runtime import bf16_support; s = bf16_support(); "
            "print(s.kernels, s.native)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa}).stdout.split()
    assert out == ["False", "False"]


#: Input sizes (odd and even, down to the smallest the base takes) and batches of the sweep; with
#: oneDNN switched off (torch's own operations) on a few of them.
SWEEP = [(size, batch) for size in (32, 33, 97, 160) for batch in (1, 8)] + [(224, 1), (160, 32)]
ONEDNN_OFF = [(32, 1), (97, 8), (160, 32)]


@pytest.mark.slow
@pytest.mark.parametrize("fine_tune_at", [100, 154])
@pytest.mark.parametrize(("size", "batch", "onednn"), [
    pytest.param(size, batch, onednn, id=f"{size}px-b{batch}-{'onednn' if onednn else 'onednn_off'}")
    for onednn, shapes in ((True, SWEEP), (False, ONEDNN_OFF)) for size, batch in shapes])
def test_the_folded_base_equals_the_base_over_shapes(random_base, size, batch, fine_tune_at,
                                                     onednn):
    """Whatever path a shape takes on this CPU (the graph, the fused units, or torch's own
    operations with oneDNN off), the folded base computes the base's function: its float32
    error against float64 within a multiple of the base's own; where no graph could be built
    for the shape, that is reported once, with the reason."""
    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, fine_tune_at)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
    x = (x * 2 - 1).contiguous(memory_format=torch.channels_last)
    exact = copy.deepcopy(base).double()
    folded = fold(base)
    with (torch.no_grad(), torch.backends.mkldnn.flags(enabled=onednn),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always", RuntimeWarning)
        got = [folded(x) for _ in range(3)]
        own = base(x)
        want = exact(x.double())
    assert all(torch.equal(g, got[0]) for g in got)   # the first call's result is the last's
    err, own_err = rel_err(got[0], want), rel_err(own, want)
    assert err <= GRAPH_ERROR_MULTIPLE * own_err + GRAPH_ERROR_FLOOR, (err, own_err)
    info = folded.cache_info()
    fusion = internals.HAS_GRAPH_FUSION and onednn
    assert len(info.graphs) + len(info.fallbacks) == (1 if fusion else 0)
    assert len([w for w in caught if "oneDNN Graph" in str(w.message)]) == len(info.fallbacks)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["AVX2", "SSE41"])
def test_the_shape_sweep_passes_under_capped_kernels(isa):
    """The sweep again in a process whose oneDNN is capped, as an older CPU runs it (other
    kernels, other sums, other shapes a graph can or cannot be built for)."""
    selection = "over_shapes and not onednn_off and (32px-b1 or 33px-b8 or 160px-b32)"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
         "-k", selection, __file__],
        capture_output=True, text=True, env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa})
    assert done.returncode == 0, done.stdout[-3000:]
    assert "6 passed" in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("fine_tune_at", [100, 154])
def test_bf16_autocast_runs_the_frozen_pairs_in_bf16_kernels(random_base, monkeypatch,
                                                             fine_tune_at, graph):
    """Under CPU autocast to bf16 (``--precision bf16-mixed``) the folded base's error against
    float64 is held to a multiple of the base's own under autocast; where oneDNN has bf16
    kernels, every pair with a ReLU6 runs on bf16 tensors, in a bf16 graph of the frozen
    stages or as a fused oneDNN call, and gradients still reach the trainable layers."""
    from tl_torch import fused

    base = random_base(0).to(memory_format=torch.channels_last)
    freeze(base, fine_tune_at)
    folded = fold(base, graph=graph)
    x = images(torch.float32, channels_last=True)
    dtypes = []
    real = internals.conv_pointwise

    def recording(inputs, *args, **kwargs):
        dtypes.append(inputs.dtype)
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(internals, "conv_pointwise", recording)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, own = folded(x), base(x)
        want = copy.deepcopy(base).double()(x.double())
    err, own_err = rel_err(got.double(), want), rel_err(own.double(), want)
    assert err <= GRAPH_ERROR_MULTIPLE * own_err, (err, own_err)
    if fused.BF16_KERNELS and internals.HAS_FUSED_CONVOLUTION:
        assert got.dtype == torch.bfloat16
        info = folded.cache_info()
        assert all(g.dtype == torch.bfloat16 for g in info.graphs)
        if graph and internals.HAS_GRAPH_FUSION:
            assert len(info.graphs) + len(info.fallbacks) == 1
        in_graph = max((g.stages for g in info.graphs), default=0)
        outside = sum(unit.relu for stage in folded.stages[in_graph:] for unit in stage.units)
        assert len(dtypes) >= outside and set(dtypes) <= {torch.bfloat16}
        assert in_graph > 0 or len(dtypes) >= 35   # every pair with a ReLU6
    trainable = [p for p in base.parameters() if p.requires_grad]
    assert len(trainable) == (54 if fine_tune_at == 100 else 0)
    if trainable:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded(x).float().square().sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


@needs_graph
def test_fine_tuning_gets_its_graph_where_the_whole_base_could_not(random_base, monkeypatch):
    """A shape whose whole-base graph failed (feature extraction) still gets fine-tuning's graph
    of the lower stages, as a process that starts in fine-tuning (a resumed run) does: the
    numbers must not depend on which phase ran first in the process."""
    real_trace = torch.jit.trace

    def whole_base_fails(module, example, **kwargs):
        if module.stages == 19:
            raise RuntimeError("no kernel for the whole base")
        return real_trace(module, example, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", whole_base_fails)
    base = random_base(0).to(memory_format=torch.channels_last)
    x = images(torch.float32, channels_last=True, size=SIZE)
    folded = fold(base)
    freeze(base, 154)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no kernel for the whole base"):
        folded(x)
    freeze(base, 100)
    with torch.no_grad():
        after_feature_extraction = folded(x)
        fresh = fold(base)(x)   # a process that starts in fine-tuning
    assert torch.equal(after_feature_extraction, fresh)
    assert [g.stages for g in folded.cache_info().graphs] == [12]
