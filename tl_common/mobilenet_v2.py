"""MobileNetV2's shape (alpha 1.0), framework-free: the port builds its base from it, and the
benchmarks count the base's floating-point work from it. Keras' ``keras.applications.MobileNetV2``
has the same numbers."""

from __future__ import annotations

#: ``len(keras.applications.MobileNetV2(include_top=False).layers)``, the InputLayer included.
KERAS_BASE_LAYERS = 154
#: The smallest square input the network takes (five stride-2 stages leave 1 x 1 at 32).
MIN_IMAGE_SIZE = 32

FIRST_FILTERS = 32
LAST_FILTERS = 1280
#: Inverted residual blocks: expansion t, output channels c, repeats n, first stride s.
#: Block 0 ("expanded_conv") is the t=1 one; Keras numbers the others block_1 .. block_16.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
