"""Resident memory of the running process, per measured section, and glibc's freed-memory setting.

Linux keeps a process' peak resident set (``VmHWM``) and lets the process reset it by writing
``5`` to ``/proc/self/clear_refs``: each section resets it first, so its peak is its own (not
counting what earlier sections left resident, which ``rss_before_mb`` shows). Where the reset is
refused, the peak is the process' peak so far and is marked so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

#: glibc ``mallopt`` parameters (malloc.h), the ones tl_torch.runtime.keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the peak resident set to the current one; False where Linux refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_mb() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mb() -> float:
    """Peak resident set since the last :func:`reset_peak` (else since the process started)."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: the whole process' peak (KiB on Linux, bytes on macOS)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = maxrss // 1024 if sys.platform == "darwin" else maxrss
    return kib / 1024


def keep_freed_memory_glibc() -> bool:
    """The same ``mallopt`` calls as ``tl_torch.runtime.keep_freed_memory`` (no mmap for large
    blocks, no trimming), without importing torch: for the Keras process. True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
