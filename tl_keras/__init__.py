"""The Keras 3 reference of the transfer-learning recipe: ``python -m tl_keras.train``.

data.py (tf.data input pipeline), model.py (base, weights, head, freezing), train.py (the run).
"""

import os

from tl_common.compat import load_before_tensorflow

# TensorFlow's C++ INFO lines (no CUDA driver, CPU features) drown the run's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# TensorFlow uses oneDNN's kernels by default only on some x86 CPUs; elsewhere (AMD EPYC, see the
# notes in docs/performance.md) the same model trains markedly slower without them. A user's own
# setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Before TensorFlow, or a later torchvision import in this process crashes: see tl_common/compat.py.
load_before_tensorflow()

from tl_keras.model import build_base, build_model, count_params, layer_table  # noqa: E402

__all__ = ["build_base", "build_model", "count_params", "layer_table"]
