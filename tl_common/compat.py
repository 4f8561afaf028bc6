"""Loading TensorFlow and PyTorch in one process (the parity suite does).

PyTorch's CUDA builds bring Triton, whose native library bundles its own LLVM. Loaded *after*
TensorFlow's (which bundles another), it crashes the process with a segmentation fault; loaded
before, both work (measured with tensorflow 2.21, torch 2.14.1, triton from torch's wheel: every
order that imports ``triton`` after ``tensorflow`` crashed, every other order ran). ``torchvision``
and ``torch._dynamo`` import Triton, so a process that imports TensorFlow first and torchvision later
dies. Call :func:`load_before_tensorflow` before the first ``import tensorflow``/``import keras``.
"""

from __future__ import annotations

import importlib.util
import sys


def load_before_tensorflow() -> None:
    """Import Triton if it is installed and TensorFlow is not loaded yet; otherwise do nothing."""
    if "triton" in sys.modules or "tensorflow" in sys.modules:
        return
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401
