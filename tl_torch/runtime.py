"""Process-wide settings and what this torch can compute here, for the entry points.

:func:`keep_freed_memory` is a setting of the C library's allocator, made once by a program's
entry point (``tl_torch.train``, ``tl_torch.predict``, the benchmarks), never by a library import.
:func:`bf16_support` asks torch, under the current settings (``ONEDNN_MAX_CPU_ISA`` included),
whether bf16 has kernels here and whether the CPU computes it natively; the trainer warns with
what bf16 costs where it does not (:func:`bf16_cost_warning`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tl_torch import internals

#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4

#: oneDNN's ISA levels (``ONEDNN_MAX_CPU_ISA``) from which bf16 arithmetic is native, where the
#: CPU has it: AVX512-BF16, and the AMX levels above it.
_NATIVE_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                     "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16",
                     "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT", "")


def keep_freed_memory() -> bool:
    """Keep freed memory in the process (glibc only); True if applied.

    glibc maps every large tensor fresh from the kernel and returns it on free, so each
    activation pays its page faults again at every batch; kept in the heap, it is reused."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl...)
        return False


@dataclass(frozen=True)
class Bf16Support:
    """What torch can do in bf16 on this CPU under the current settings."""

    kernels: bool   # oneDNN has bf16 convolutions (emulated or native)
    native: bool    # and the CPU computes bf16 itself (AVX512-BF16 or AMX), not capped off

    def __str__(self) -> str:
        if self.native:
            return "native bf16 (oneDNN bf16 kernels on AVX512-BF16 or AMX)"
        if self.kernels:
            return "bf16 emulated by oneDNN in float32 arithmetic (no AVX512-BF16 or AMX here)"
        return "no oneDNN bf16 kernels under the current settings (torch's reference kernels)"


def bf16_support() -> Bf16Support:
    """Asked of torch: oneDNN's own answer (which follows ``ONEDNN_MAX_CPU_ISA``), torch's CPU
    capabilities, and the ISA cap where one is set."""
    kernels = internals.bf16_kernels()
    capabilities = getattr(torch.cpu, "_is_avx512_bf16_supported", None), \
        getattr(torch.cpu, "_is_amx_tile_supported", None)
    cpu = any(callable(probe) and probe() for probe in capabilities)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
    return Bf16Support(kernels=kernels, native=kernels and cpu and cap in _NATIVE_BF16_ISAS)


def bf16_slowdown(repeats: int = 3) -> float:
    """bf16 time over float32 time of a small block (1x1 and depthwise convolutions, channels
    last), the best of ``repeats``: what ``--precision bf16-mixed`` costs here, measured."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, 40, 40, generator=generator).contiguous(memory_format=torch.channels_last)
    expand = torch.randn(384, 96, 1, 1, generator=generator)
    depthwise = torch.randn(384, 1, 3, 3, generator=generator)

    def best(dtype: torch.dtype) -> float:
        a, w1, w2 = x.to(dtype), expand.to(dtype), depthwise.to(dtype)
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):   # the first call builds the kernels
                start = time.perf_counter()
                F.conv2d(F.conv2d(a, w1), w2, padding=1, groups=384)
                times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(torch.bfloat16) / best(torch.float32)


def bf16_cost_warning(precision: str, accelerator: str) -> str | None:
    """A one-line warning for ``--precision bf16-*`` on a CPU without native bf16, with what it
    costs there (measured on the spot); None where bf16 is native or not asked for."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if "bf16" not in precision or not on_cpu:
        return None
    support = bf16_support()
    if support.native:
        return None
    return (f"warning: --precision {precision} on this CPU runs {support}: a convolution block "
            f"measured {bf16_slowdown():.1f}x the time of 32-true here, and bf16 also changes "
            "the numbers; 32-true is the fast choice on this machine")
