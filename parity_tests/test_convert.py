"""Check 13 of the parity suite: whole models across the border (``checks_convert.py``), and the
mistakes a conversion can make, each planted and caught by a row.

Run alone: ``python -m pytest parity_tests/test_convert.py -q``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tl_torch.keras_interchange
from parity_tests import checks_convert
from parity_tests.rows import Row, failures
from tl_common import keras_inputs

pytestmark = pytest.mark.slow  # conversions run Keras in float64 in another process


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """One folder for the Keras models of the module (each built once)."""
    return tmp_path_factory.mktemp("convert")


def assert_caught(rows: list[Row], *, where: str) -> None:
    failed = [r for r in failures(rows) if where in r.check]
    assert failed, f"no failing row matching {where!r}; rows: " + "; ".join(
        f"{r.check}={'pass' if r.passed else 'FAIL'}" for r in rows)


def test_13_whole_models_across_frameworks(parity, models) -> None:
    parity.check(checks_convert.check_convert(models))


def test_transposed_head_kernel_is_caught(monkeypatch, models) -> None:
    # A reshape keeps a (1280, 3) kernel's shape as (3, 1280) and scrambles it.
    monkeypatch.setattr(tl_torch.keras_interchange, "dense_kernel_to_torch",
                        lambda kernel: np.ascontiguousarray(kernel.reshape(kernel.shape[::-1])))
    assert_caught(checks_convert.check_convert(models, ("other",)), where="probabilities")


def test_transposed_head_kernel_on_export_is_caught(monkeypatch, models) -> None:
    monkeypatch.setattr(tl_torch.keras_interchange, "torch_to_dense_kernel",
                        lambda weight: np.ascontiguousarray(weight.reshape(weight.shape[::-1])))
    assert_caught(checks_convert.check_convert(models, ("to-keras",)),
                  where="to-keras: Keras' probabilities")


def test_dropped_bias_is_caught(monkeypatch, models) -> None:
    monkeypatch.setattr(tl_torch.keras_interchange, "dense_bias",
                        lambda bias, units: np.zeros(units, np.float32))
    rows = checks_convert.check_convert(models, ("recipe", "other"))
    assert_caught(rows, where="from-keras, the reference's model: probabilities")
    assert_caught(rows, where="from-keras, someone else's 3 classes: probabilities")


def test_wrong_class_order_is_caught(monkeypatch, models) -> None:
    original = tl_torch.keras_interchange.class_names_for
    monkeypatch.setattr(tl_torch.keras_interchange, "class_names_for",
                        lambda *args: original(*args)[::-1])
    rows = checks_convert.check_convert(models, ("recipe", "other"))
    assert_caught(rows, where="from-keras, the reference's model: class names predicted")
    assert_caught(rows, where="from-keras, someone else's 3 classes: class names predicted")


# ---- the other bases ----------------------------------------------------------------------------

NEW_BASES = ("mobilenet_v3_large", "efficientnet_b0", "resnet50")


@pytest.mark.long
@pytest.mark.parametrize("name", NEW_BASES)
def test_13_other_bases_across_frameworks(parity, models, name) -> None:
    parity.check(checks_convert.check_base_conversions(name, models))


def test_resnet_rgb_left_unflipped_on_import_is_caught(monkeypatch, models) -> None:
    # The port's caffe without its RGB -> BGR flip: shapes and layers fit, probabilities do not.
    from tl_torch.backbones import ResNet50Base

    mean = torch.tensor(keras_inputs.CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    monkeypatch.setattr(ResNet50Base, "preprocess", lambda self, x: x - mean.to(x.dtype))
    assert_caught(checks_convert.check_base_conversions("resnet50", models, ("from-keras",)),
                  where="from-keras, resnet50: probabilities")


@pytest.mark.long
@pytest.mark.parametrize("name", NEW_BASES)
def test_other_base_head_kernel_transposed_on_export_is_caught(monkeypatch, models,
                                                                name) -> None:
    monkeypatch.setattr(tl_torch.keras_interchange, "torch_to_dense_kernel",
                        lambda weight: np.ascontiguousarray(weight.reshape(weight.shape[::-1])))
    assert_caught(checks_convert.check_base_conversions(name, models, ("to-keras",)),
                  where=f"to-keras, {name}: Keras' probabilities")


def test_efficientnet_bn_eps_lost_in_onnx_export_is_caught(monkeypatch, models) -> None:
    # An exporter whose traced copy has torch's BatchNorm eps (1e-5), not Keras' 1e-3: the file
    # runs, with the right shapes, and gives other probabilities.
    from torch import nn

    from tl_torch import onnx_export

    real = onnx_export.unfolded_copy

    def wrong(module):
        copy = real(module)
        for m in copy.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-5
        return copy

    monkeypatch.setattr(onnx_export, "unfolded_copy", wrong)
    assert_caught(checks_convert.check_base_conversions("efficientnet_b0", models, ("to-onnx",)),
                  where="to-onnx, efficientnet_b0")
