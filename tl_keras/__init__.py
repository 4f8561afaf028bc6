"""The Keras 3 reference of the transfer-learning recipe: ``python -m tl_keras.train``.

data.py (tf.data input pipeline), model.py (base, weights, head, freezing), train.py (the run).
The names below load with their module on first use (``tl_keras.build_model``): ``python -m
tl_keras.train`` checks its command line before TensorFlow loads.
"""

import importlib
import os
from typing import Any

from tl_common.compat import load_before_tensorflow

# TensorFlow's C++ INFO lines (no CUDA driver, CPU features) drown the run's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# TensorFlow uses oneDNN's kernels by default only on some x86 CPUs; elsewhere (AMD EPYC, see the
# notes in docs/performance.md) the same model trains markedly slower without them. A user's own
# setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Before TensorFlow, or a later torchvision import in this process crashes: see tl_common/compat.py.
load_before_tensorflow()

__all__ = ["build_base", "build_model", "count_params", "layer_table"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("tl_keras.model"), name)
    globals()[name] = value
    return value
