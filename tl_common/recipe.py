"""The recipe's facts, each written once (TensorFlow's "transfer learning and fine-tuning" with
MobileNetV2): the settings' defaults, both trainers' models, the converter, the parity suite and
the benchmarks read them here, and the planted mistakes of the parity suite patch them here.

Framework-free: plain numbers, no torch, no TensorFlow.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

#: Fine-tuning unfreezes the base from this Keras layer index on (``base.layers[100:]``).
FINE_TUNE_AT = 100
#: The Keras layer at ``FINE_TUNE_AT`` in MobileNetV2: a check that the base is the recipe's.
FINE_TUNE_LAYER = "block_11_expand_relu"
#: Dropout before the classifier.
DROPOUT = 0.2
#: Adam's learning rate in feature extraction.
LEARNING_RATE = 1e-4
#: RMSprop's learning rate in fine-tuning is feature extraction's divided by this ("a tenth";
#: a division, not a product with 0.1, which rounds 1e-4 to another float than 1e-5).
FINE_TUNE_LR_DIVISOR = 10
#: RMSprop's learning rate in fine-tuning, by default.
FINE_TUNE_LEARNING_RATE = LEARNING_RATE / FINE_TUNE_LR_DIVISOR

#: ``RandomFlip("horizontal")``: each image flipped left-right with probability 1/2.
FLIP_MODE = "horizontal"
#: ``RandomRotation(0.2)``: an angle drawn from ±0.2 turns (±72°).
ROTATION_FACTOR = 0.2
#: What the rotation fills the corners with (d c b a | a b c d | d c b a).
ROTATION_FILL_MODE = "reflect"

#: The reference's random layers draw from the run's seed plus these offsets: distinct, so that
#: no two draws are tied (the same seed would tie each image's rotation to its flip).
FLIP_SEED_OFFSET = 0
ROTATION_SEED_OFFSET = 1
DROPOUT_SEED_OFFSET = 2
HEAD_INIT_SEED_OFFSET = 3

#: MobileNetV2's ``preprocess_input``: ``x / PIXEL_SCALE - PIXEL_OFFSET`` takes [0, 255] pixels
#: to [-1, 1].
PIXEL_SCALE = 127.5
PIXEL_OFFSET = 1.0


def fine_tune_learning_rate(learning_rate: float) -> float:
    """Fine-tuning's rate when none is given: feature extraction's over
    :data:`FINE_TUNE_LR_DIVISOR`."""
    return learning_rate / FINE_TUNE_LR_DIVISOR


def scale_pixels(x: T) -> T:
    """``x / 127.5 - 1``: [0, 255] pixels -> MobileNetV2's [-1, 1] (numpy arrays, torch and
    Keras tensors alike)."""
    return x / PIXEL_SCALE - PIXEL_OFFSET
