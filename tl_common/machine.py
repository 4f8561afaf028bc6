"""What a measurement ran on: CPU, cores, memory, load, package versions, settings (read without
importing torch or TensorFlow). The benchmarks record it beside their numbers; the parity report
names the machine its rows were measured on."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

#: Packages whose versions decide the numbers.
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "tensorflow", "keras", "numpy",
            "pillow")
#: Environment variables that change either framework's speed.
SPEED_ENV = ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
             "KMP_AFFINITY", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
             "CUDA_VISIBLE_DEVICES", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "LD_PRELOAD",
             "TL_PARITY_CACHE", "TL_PARITY_CACHE_BYTES")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "cpu MHz", "vendor_id", "cpu family", "model") \
                and key not in info:
            info[key] = value.strip()
    return info


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``: every column but
    idle and iowait), to tell how much other work ran beside a measurement."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.25, window_s: float = 2.0) -> dict:
    """Wait up to ``max_wait_s`` until the other work on the machine uses less than
    ``threshold_cores`` over ``window_s``; returns how long it waited and the last load seen."""
    import time

    start = time.perf_counter()
    seen = None
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window_s)
        b1 = busy_cpu_seconds()
        if b0 is None or b1 is None:
            return {"waited_s": 0.0, "other_cores": None, "quiet": None}
        seen = (b1 - b0) / window_s
        waited = time.perf_counter() - start
        if seen < threshold_cores or waited >= max_wait_s:
            return {"waited_s": waited, "other_cores": seen, "quiet": seen < threshold_cores}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe() -> dict[str, object]:
    """The machine section of benchmark.json (read without importing torch or TensorFlow)."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu_model": cpu.get("model name", platform.processor() or "unknown"),
        "cpu_vendor": cpu.get("vendor_id"),
        "cpu_family": cpu.get("cpu family"),
        "cpu_model_number": cpu.get("model"),
        "cpu_mhz": cpu.get("cpu MHz"),
        "simd": sorted(f for f in flags if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16",
                                                 "amx_bf16", "avx_vnni")),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "env": {k: os.environ[k] for k in SPEED_ENV if k in os.environ},
    }
