"""The recipe's classifier head, framework-free: how many logits it has, and how logits become a
class (both frameworks' accuracy, printed predictions and ``tl_torch.predict`` follow this rule).
"""

from __future__ import annotations

import numpy as np


def head_units(num_classes: int) -> int:
    """Logits of the head: the recipe's single logit for two classes, one per class beyond."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; a classifier needs at least 2")
    return 1 if num_classes == 2 else num_classes


def decide(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class index, probability of that class) per image, from logits ``(N,)``/``(N, 1)`` (two
    classes) or ``(N, classes)``.

    One logit: class 1 where ``logit > 0``, the rule Keras' ``BinaryAccuracy(threshold=0.0)``
    counts by (a float32 sigmoid rounds logits within ~3e-8 of 0 to exactly 0.5, where
    ``p > 0.5`` would say class 0), with probability ``sigmoid(|logit|)``, free of ``1 - p``'s
    cancellation. N logits: the largest, with its softmax probability.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim == 1:
        return (logits > 0).astype(np.int64), 1.0 / (1.0 + np.exp(-np.abs(logits)))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs.argmax(axis=-1), probs.max(axis=-1)


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Logits that the head's probabilities came from: one probability (of class 1) -> its logit
    ``log p - log(1 - p)``; N probabilities -> ``log p`` (softmax's logits up to a constant).
    Scores known only as probabilities (a Keras model ending in a sigmoid or softmax) are then
    decided by :func:`decide` too; p = 0 and 1 give infinite logits, decided as their sign says."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p) if p.ndim == 1 else np.log(p)
