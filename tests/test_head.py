"""One head and one decision rule for both frameworks (``tl_common/head.py``): the logit's sign
decides two classes everywhere (accuracy, printed predictions, ``tl_torch.predict``), also where a
float32 sigmoid rounds to exactly 0.5. Run: ``python -m pytest tests/test_head.py -q``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_keras.model as keras_model
import tl_torch
from tl_common.head import decide, head_units
from tl_torch.module import TransferModule

#: Logits whose float32 sigmoid is exactly 0.5 (|logit| < ~3e-8), and clear ones.
NEAR_ZERO = [1e-9, -1e-9, 0.0, 2e-8, -2e-8]
CLEAR = [3.0, -0.5]


def test_one_head_definition():
    assert keras_model.head_units is head_units
    assert [head_units(n) for n in (2, 3, 10)] == [1, 3, 10]
    with pytest.raises(ValueError, match="at least 2"):
        head_units(1)


def test_decide_follows_the_logit_sign_near_zero():
    logits = np.array(NEAR_ZERO + CLEAR, dtype=np.float32)
    assert (torch.sigmoid(torch.tensor(NEAR_ZERO)) == 0.5).all()   # where p > 0.5 would fail
    labels, probs = decide(logits[:, None])                          # Keras' (N, 1)
    assert labels.tolist() == [1, 0, 0, 1, 0, 1, 0]
    assert probs[:5] == pytest.approx([0.5] * 5, abs=1e-7)
    assert probs[5:] == pytest.approx([1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(-0.5))])


@pytest.mark.parametrize("num_classes", [2, 3])
def test_the_port_decides_as_tl_common(num_classes):
    """TransferModule.probabilities (accuracy, printed predictions, predict) is decide's rule."""
    module = TransferModule(tl_torch.build_base("none", 32), num_classes=num_classes, fast=False)
    if num_classes == 2:
        logits = torch.tensor(NEAR_ZERO + CLEAR)
    else:
        logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels, probs = module.probabilities(logits)
    want_labels, want_probs = decide(logits.numpy())
    assert labels.tolist() == want_labels.tolist()
    assert probs.numpy() == pytest.approx(want_probs, rel=1e-6)
    # The accuracy counts the same classes.
    module.train_acc.reset()
    module.train_acc.update(module.probabilities(logits)[0], torch.as_tensor(want_labels))
    assert float(module.train_acc.compute()) == 1.0


def test_public_surface():
    assert {"TransferModule", "ImageFolderDataModule", "fold"} <= set(tl_torch.__all__)
    assert tl_torch.TransferModule is TransferModule


def test_probabilities_are_decided_by_the_same_rule():
    """Scores known only as probabilities (a sigmoid or softmax Keras head) go through
    ``decide`` too: class 1 above one half, exactly one half is class 0 (logit 0), saturated
    probabilities decided by their side; N classes: the largest."""
    from tl_common.head import logits_of

    p = np.array([0.5, 0.5 + 1e-12, 0.5 - 1e-12, 0.0, 1.0, 0.93])
    assert decide(logits_of(p))[0].tolist() == [0, 1, 0, 0, 1, 1]
    assert logits_of(np.array([0.93]))[0] == pytest.approx(np.log(0.93 / 0.07))
    softmax = np.array([[0.2, 0.5, 0.3], [0.0, 0.1, 0.9], [0.6, 0.4, 0.0]])
    assert decide(logits_of(softmax))[0].tolist() == [1, 2, 0]
