"""The suite catches a wrong port: each test plants a classic porting mistake (monkeypatching the
port) and asserts that the matching check fails. Rows from these runs are not reported; the
same checks pass on the port as it is (test_parity.py).

Cheap variants of the checks are used where they suffice (one weight set, one size).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

import tl_torch.augment
import tl_torch.freezing
import tl_torch.keras_weights
import tl_torch.model
import tl_torch.module
import tl_torch.padding
import tl_torch.weights
from parity_tests import checks_data, checks_model, checks_steps, checks_training
from parity_tests.rows import Row, failures
from tl_torch.model import MobileNetV2Base
from tl_torch.optim import KerasRMSprop


def assert_caught(rows: list[Row], *, where: str) -> None:
    """Some row whose check name contains ``where`` failed."""
    failed = [r for r in failures(rows) if where in r.check]
    assert failed, f"no failing row matching {where!r}; rows: " + "; ".join(
        f"{r.check}={'pass' if r.passed else 'FAIL'}" for r in rows)


def torch_batchnorm() -> list[Row]:
    """The BatchNorm check with the port alone trained (Keras' side is not what is broken)."""
    return checks_training.check_batchnorm(steps=1, frameworks=("torch",))


def quick_numerics(tmp_path: Path) -> list[Row]:
    """Numerics on the demo weights at 96 px (even: asymmetric padding), float32 only."""
    return checks_model.check_numerics(tmp_path, sizes=(96,), only="demo", float64=False)


def test_symmetric_padding(monkeypatch, tmp_path) -> None:
    # torchvision's padding=1 on each side instead of TF "same" (0 before, 1 after on even sizes).
    monkeypatch.setattr(tl_torch.padding, "pad_amounts", lambda h, w, k, s, t: (1, 1, 1, 1))
    assert_caught(quick_numerics(tmp_path), where="base output")


def test_batchnorm_epsilon_1e_5(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(tl_torch.weights, "KERAS_BN_EPS", 1e-5)  # torch's default
    assert_caught(quick_numerics(tmp_path), where="base output")
    assert_caught(torch_batchnorm(), where="epsilon")


def test_torch_default_batchnorm_momentum(monkeypatch) -> None:
    # momentum=0.1 (torch's default) where 1 - 0.999 belongs.
    monkeypatch.setattr(tl_torch.model, "KERAS_BN_MOMENTUM", 0.9)
    assert_caught(torch_batchnorm(), where="momentum")


def test_frozen_batchnorm_left_in_training_mode(monkeypatch) -> None:
    # What plain .train() does: BatchNorm normalises with batch statistics and updates its own.
    monkeypatch.setattr(MobileNetV2Base, "train", nn.Module.train)
    assert_caught(torch_batchnorm(), where="moving statistics unchanged")


def test_fine_tune_at_off_by_one(monkeypatch) -> None:
    original = tl_torch.freezing.freeze

    def off_by_one(base, fine_tune_at):
        return original(base, min(fine_tune_at + 1, len(base.keras_layers)))

    monkeypatch.setattr(tl_torch.module, "freeze", off_by_one)
    # Layer 100 (block_11_expand_relu) has no weights: the counts cannot tell, the table can.
    assert_caught(checks_model.check_counts(), where="fine_tuning: layer table")


def test_zero_one_preprocessing(monkeypatch) -> None:
    monkeypatch.setattr(MobileNetV2Base, "preprocess", lambda self, x: x / 255.0)
    assert_caught(checks_model.check_preprocessing(), where="-1, 0, 1")


def test_depthwise_kernel_reshaped_not_permuted(monkeypatch, tmp_path) -> None:
    original = tl_torch.keras_weights.keras_to_torch

    def reshaped(keras_type, array):
        if keras_type == "DepthwiseConv2D":  # same shape, scrambled values
            kh, kw, c, _ = array.shape
            return array.reshape(c, 1, kh, kw)
        return original(keras_type, array)

    monkeypatch.setattr(tl_torch.keras_weights, "keras_to_torch", reshaped)
    assert_caught(quick_numerics(tmp_path), where="base output")


def test_moving_mean_and_variance_swapped(monkeypatch, tmp_path) -> None:
    swapped = dict(tl_torch.keras_weights.KERAS_VARIABLES)
    swapped["BatchNormalization"] = (("gamma", "weight"), ("beta", "bias"),
                                     ("moving_mean", "running_var"),
                                     ("moving_variance", "running_mean"))
    monkeypatch.setattr(tl_torch.keras_weights, "KERAS_VARIABLES", swapped)
    assert_caught(quick_numerics(tmp_path), where="base output")


def test_torch_default_linear_init(monkeypatch) -> None:
    monkeypatch.setattr(tl_torch.module, "keras_dense_init_", lambda linear, generator=None: linear)
    assert_caught(checks_model.check_head(), where="KS p-value")


def test_rmsprop_rho_0_99(monkeypatch) -> None:
    monkeypatch.setattr(tl_torch.module, "KerasRMSprop",
                        functools.partial(KerasRMSprop, rho=0.99))
    assert_caught(checks_training.check_optimizers(), where="RMSprop(learning_rate")


def test_torch_adam_epsilon(monkeypatch) -> None:
    # torch.optim.Adam: epsilon added after bias correction.
    monkeypatch.setattr(tl_torch.module, "KerasAdam",
                        lambda params, lr: torch.optim.Adam(params, lr=lr, eps=1e-7))
    assert_caught(checks_training.check_optimizers(), where="Adam(learning_rate")


def test_rotation_with_constant_fill(monkeypatch) -> None:
    # torchvision's RandomRotation fills with a constant.
    monkeypatch.setattr(tl_torch.augment.augment, "__defaults__", ("constant",))
    assert_caught(checks_data.check_augmentation(), where="reflect-filled border")


def test_loss_summed_not_averaged(monkeypatch) -> None:
    # Keras' losses average over the batch; a summed loss scales every gradient by the batch size,
    # which Adam and RMSprop nearly cancel: the steps look right, the losses do not.
    monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss",
                        functools.partial(torch.nn.BCEWithLogitsLoss, reduction="sum"))
    setup = checks_steps.Setup(steps=1, free_running=False)
    assert_caught(checks_steps.check_steps(setup), where="loss of each of 1 steps")
