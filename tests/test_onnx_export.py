"""``tl_torch/onnx_export.py``: the exported file checked against the module it came from, and an
export that prints no warnings (the two the exporter raises are understood: see there).
Run: ``python -m pytest tests/test_onnx_export.py -q``.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from tl_torch.model import MobileNetV2Base
from tl_torch.module import TransferModule
from tl_torch.onnx_export import check_onnx, write_onnx

pytestmark = [pytest.mark.slow,  # traces the whole network
              pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="no onnx")]

SIZE = 64


def classifier(bias: list[float]) -> TransferModule:
    """A 3-class module whose logits are set by the head's bias (a random base's features are
    near zero): distinct probabilities per class, so that a wrong file shows."""
    module = TransferModule(MobileNetV2Base(), num_classes=3, class_names=["a", "b", "c"],
                            image_size=SIZE).eval()
    with torch.no_grad():
        module.classifier.bias.copy_(torch.tensor(bias))
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    module = classifier([0.5, 2.0, -1.0])
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_onnx(module, SIZE, path)
    return module, path, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_export_is_quiet(exported):
    assert exported[2] == []


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
def test_exported_file_checked_against_its_module(exported):
    module, path, _ = exported
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 255
    parity = check_onnx(module, path, images)
    assert parity.passed and parity.same_classes and parity.images == 4
    # The same check fails the file against another module (the classes' logits swapped).
    wrong = check_onnx(classifier([2.0, 0.5, -1.0]), path, images)
    assert wrong.passed is False and wrong.same_classes is False
