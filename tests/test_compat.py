"""TensorFlow and PyTorch in one process, in either order (``tl_common/compat.py``).

TensorFlow's wheels load their LLVM globally; Triton (which torchvision, torchmetrics and
Lightning import through ``torch._dynamo``) loaded after it crashes the process. ``import keras``
then ``import tl_torch`` must work (Triton is left out, with one warning line) and train.
Run: ``python -m pytest tests/test_compat.py -q``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Keras first, then the port: build, train one step with Lightning, predict.
KERAS_THEN_TORCH = """
import keras
import tl_torch

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tl_torch.module import TransferModule

module = TransferModule(tl_torch.build_base("none", 32))
images = torch.rand(4, 3, 32, 32) * 255
loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1])), batch_size=2)
trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(module, loader)
with torch.no_grad():
    print("logits", tuple(module.eval()(images).shape))
"""


@pytest.mark.slow
def test_keras_then_tl_torch_works_with_one_warning_line():
    result = subprocess.run([sys.executable, "-c", KERAS_THEN_TORCH], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]   # a crash is -11 (SIGSEGV)
    assert "logits (4,)" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "Triton is disabled" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "import tl_torch before tensorflow/keras" in warnings[0]


def test_triton_is_blocked_only_after_tensorflow(monkeypatch):
    import importlib.util

    from tl_common import compat

    if importlib.util.find_spec("triton") is None and "triton" not in sys.modules:
        pytest.fail("this check needs Triton installed (it comes with torch's Linux wheels)")
    # The process's own module table, restored afterwards (Triton may be loaded here already).
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    assert compat.block_triton_after_tensorflow() is False   # no TensorFlow: nothing to do
    assert "triton" not in sys.modules
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    with pytest.warns(RuntimeWarning, match="import tl_torch before tensorflow/keras"):
        assert compat.block_triton_after_tensorflow() is True
    assert sys.modules["triton"] is None
    with pytest.raises(ImportError):
        import triton  # noqa: F401
