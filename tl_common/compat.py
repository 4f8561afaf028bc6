"""Loading TensorFlow and PyTorch in one process (the parity suite does).

PyTorch's CUDA builds bring Triton, whose native library bundles its own LLVM. Loaded *after*
TensorFlow's (which bundles another), it crashes the process with a segmentation fault; loaded
before, both work (measured with tensorflow 2.21, torch 2.14.1, triton from torch's wheel: every
order that imports ``triton`` after ``tensorflow`` crashed, every other order ran). ``torchvision``
and ``torch._dynamo`` import Triton, so a process that imports TensorFlow first and torchvision later
dies. Call :func:`load_before_tensorflow` before the first ``import tensorflow``/``import keras``.

Where TensorFlow came first anyway (``import keras`` in a notebook, then ``import tl_torch``),
:func:`block_triton_after_tensorflow` makes Triton unimportable for the rest of the process:
torch and torchvision then run without it (they treat it as not installed), at the cost of
``torch.compile``'s GPU kernels in that process, instead of crashing it.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings


def load_before_tensorflow() -> None:
    """Import Triton if it is installed and TensorFlow is not loaded yet; otherwise do nothing."""
    if "triton" in sys.modules or "tensorflow" in sys.modules:
        return
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def block_triton_after_tensorflow() -> bool:
    """If TensorFlow is loaded and Triton is installed but not loaded, make ``import triton`` fail
    (an ImportError, which torch handles as "not installed") and warn in one line; True if so."""
    if "tensorflow" not in sys.modules or "triton" in sys.modules:
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # import then raises ImportError
    warnings.warn("TensorFlow was imported before PyTorch: Triton is disabled in this process "
                  "(torch.compile's GPU kernels); import tl_torch before tensorflow/keras to keep it",
                  RuntimeWarning, stacklevel=3)
    return True
