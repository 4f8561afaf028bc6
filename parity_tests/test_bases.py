"""Check 20 of the parity suite: the other bases against their Keras applications
(``checks_bases.py``), and the planted mistakes each must catch.

Run alone: ``python -m pytest parity_tests/test_bases.py -q`` (``-m "not slow"``: the layer
tables, counts and preprocessing only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

import tl_torch.backbones.base as backbone_base
import tl_torch.backbones.efficientnet as efficientnet
import tl_torch.backbones.layers as layers
import tl_torch.backbones.mobilenet_v3 as mobilenet_v3
import tl_torch.backbones.resnet as resnet
import tl_torch.module
import tl_torch.padding
from parity_tests import checks_bases
from parity_tests.rows import Row, failures
from tl_torch.freezing import freeze

BASES = checks_bases.OTHER_BASES


@pytest.fixture(scope="session")
def bases_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the bases' calibrated weights, made once per session."""
    return tmp_path_factory.mktemp("bases")


@pytest.mark.parametrize("name", BASES)
def test_20_structure_and_preprocessing(parity, name: str, bases_dir: Path) -> None:
    parity.check(checks_bases.check_structure(name)
                 + checks_bases.check_preprocessing(name, bases_dir))


@pytest.mark.slow  # Keras in float64, every layer
@pytest.mark.parametrize("name", BASES)
def test_20_numerics(parity, name: str, bases_dir: Path) -> None:
    parity.check(checks_bases.check_numerics(name, bases_dir))


@pytest.mark.slow  # a fine-tuning step in both frameworks
@pytest.mark.parametrize("name", BASES)
def test_20_inference_mode(parity, name: str, bases_dir: Path) -> None:
    parity.check(checks_bases.check_inference_mode(name, bases_dir))


# Steps of both phases, Keras in float32 and float64; and two epochs in Keras and Lightning: with
# the checks that run the trainers (TL_PARITY_TRAINERS=1: python -m parity_tests, and CI's second
# pass), for the test command's time.
@pytest.mark.slow
@pytest.mark.trainers
@pytest.mark.parametrize("name", BASES)
def test_20_training_steps(parity, name: str, bases_dir: Path) -> None:
    parity.check(checks_bases.check_training_steps(name, bases_dir))


@pytest.mark.slow
@pytest.mark.trainers
@pytest.mark.parametrize("name", BASES)
def test_20_unbalanced_classes(parity, name: str, bases_dir: Path) -> None:
    parity.check(checks_bases.check_unbalanced_classes(name, bases_dir))


# ---- planted mistakes: each fails a named row ----------------------------------------------

def sigmoid_for_hard_sigmoid(relu6: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def normalization_by_variance(self: layers.Normalization, x: torch.Tensor) -> torch.Tensor:
    return (x - self.mean.view(1, -1, 1, 1)) / self.variance.view(1, -1, 1, 1)


def caffe_without_flip(images: torch.Tensor) -> torch.Tensor:
    return images - torch.tensor(resnet.CAFFE_MEAN_BGR, dtype=images.dtype).view(1, 3, 1, 1)


def symmetric_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tl_torch.padding, "pad_amounts", lambda h, w, k, s, t: (k // 2,) * 4)


def freezing_one_layer_late(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tl_torch.module, "freeze", lambda base, k: freeze(
        base, min(k + 1, len(base.keras_layers))))


def base_trains_its_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The base follows its parent's train(): BatchNorm on batch statistics, Dropout active."""
    monkeypatch.setattr(backbone_base.KerasBase, "train", nn.Module.train)


class BatchMeanLoss(MeanMetric):
    """An epoch's loss as the mean of its batches' means (the last, smaller batch over-weighted)."""

    def update(self, value, weight=1.0) -> None:  # noqa: ARG002  (the weight left out)
        super().update(value)


def macro_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tl_torch.module, "MulticlassAccuracy",
                        lambda num_classes, average: MulticlassAccuracy(num_classes=num_classes,
                                                                        average="macro"))


#: mistake -> (base, how it is planted, which check runs, the row it must fail).
Plant = Callable[[pytest.MonkeyPatch], None]
MISTAKES: dict[str, tuple[str, Plant, str, str]] = {
    "v3 hard-sigmoid as sigmoid": ("mobilenet_v3_large", lambda m: m.setattr(
        mobilenet_v3, "hard_sigmoid", sigmoid_for_hard_sigmoid), "numerics", "float64"),
    "v3 hard-swish as swish": ("mobilenet_v3_large", lambda m: m.setitem(
        layers.ACTIVATIONS, "hard_swish", F.silu), "numerics", "float64"),
    "v3 torch's BatchNorm epsilon": ("mobilenet_v3_large", lambda m: m.setattr(
        mobilenet_v3, "BN_EPS", 1e-5), "numerics", "float64"),
    "v3 one layer frozen too many": ("mobilenet_v3_large", freezing_one_layer_late,
                                     "structure", "fine_tune_at="),
    "efficientnet normalised by the variance": ("efficientnet_b0", lambda m: m.setattr(
        layers.Normalization, "forward", normalization_by_variance), "preprocessing",
        "preprocessing values"),
    "efficientnet symmetric padding": ("efficientnet_b0", symmetric_padding, "numerics",
                                       "float64"),
    "efficientnet torch's BatchNorm epsilon": ("efficientnet_b0", lambda m: m.setattr(
        efficientnet, "BN_EPS", 1e-5), "numerics", "float64"),
    "efficientnet base in training mode": ("efficientnet_b0", base_trains_its_batchnorm,
                                           "inference_mode", "moving statistics"),
    "resnet stride on the 3x3": ("resnet50", lambda m: m.setattr(
        resnet, "bottleneck_strides", lambda stride: (1, stride)), "numerics", "float64"),
    "resnet caffe without RGB->BGR": ("resnet50", lambda m: m.setattr(
        resnet, "caffe", caffe_without_flip), "preprocessing", "preprocessing values"),
    "resnet torch's BatchNorm epsilon": ("resnet50", lambda m: m.setattr(
        resnet, "BN_EPS", 1e-5), "numerics", "float64"),
    "resnet epoch loss as a mean of batch means": ("resnet50", lambda m: m.setattr(
        tl_torch.module, "MeanMetric", BatchMeanLoss), "unbalanced_classes", "epoch: loss"),
    "v3 macro-averaged accuracy": ("mobilenet_v3_large", macro_accuracy, "unbalanced_classes",
                                   "epoch: accuracy"),
}


def run_check(check: str, name: str, directory: Path) -> list[Row]:
    if check == "structure":
        return checks_bases.check_structure(name)
    return getattr(checks_bases, f"check_{check}")(name, directory)


def _param(mistake: str):
    """The mistakes that need the trainers' checks carry their marker."""
    trainers = MISTAKES[mistake][2] in ("training_steps", "unbalanced_classes")
    return pytest.param(mistake, marks=[pytest.mark.trainers] if trainers else [])


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [_param(m) for m in sorted(MISTAKES)])
def test_planted_mistake_fails_its_row(mistake: str, bases_dir: Path, monkeypatch) -> None:
    name, plant, check, where = MISTAKES[mistake]
    checks_bases.weights(name, bases_dir)  # made before the plant: Keras' file is not the port's
    plant(monkeypatch)
    rows = run_check(check, name, bases_dir)
    failed = [r for r in failures(rows) if where in r.check]
    assert failed, f"{mistake} went unnoticed: " + "; ".join(
        f"{r.check}={'pass' if r.passed else 'FAIL'}" for r in rows)


def test_every_base_has_three_planted_mistakes() -> None:
    planted = [base for base, *_ in MISTAKES.values()]
    assert all(planted.count(name) >= 3 for name in BASES), planted
