"""What ``python -m tl_keras.train`` shows on its console, beyond the recipe's own lines.

TensorFlow looks for a GPU the first time it lists its devices and, on a machine without
NVIDIA's driver, logs ``failed call to cuInit`` as an error: true but expected there, and it
reads as if the run had gone wrong. :func:`find_devices` lists the devices once, at the start,
and drops that one line only where no NVIDIA driver is installed (where one is, cuInit failing
is a real fault and is shown). Everything else TensorFlow writes meanwhile is shown as written.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

#: The line TensorFlow logs when CUDA cannot start (``cuda_platform.cc``).
CUINIT_FAILED = "failed call to cuInit"
#: Present wherever NVIDIA's kernel driver is loaded (Linux).
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def has_nvidia_driver() -> bool:
    return NVIDIA_DRIVER.exists()


@contextlib.contextmanager
def stderr_without(drop: Callable[[str], bool]) -> Iterator[None]:
    """Hold back what is written to file descriptor 2 inside (TensorFlow's C++ logging writes
    there, past ``sys.stderr``), then write it out without the lines ``drop`` picks."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not drop(line)))
            sys.stderr.flush()


def find_devices() -> list[str]:
    """TensorFlow's devices (its names), found now; ``failed call to cuInit`` left out where
    there is no NVIDIA driver to fail (module docstring)."""
    import tensorflow as tf

    expected = not has_nvidia_driver()
    with stderr_without(lambda line: expected and CUINIT_FAILED in line):
        return [device.name for device in tf.config.list_physical_devices()]
