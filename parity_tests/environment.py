"""Where the parity suite ran: the CPU, the kernel libraries and their settings, threads, device.

Float32 results depend on all of these (oneDNN's instruction set, TensorFlow's oneDNN or Eigen
kernels, thread counts, GPUs' TF32), which is why the suite's float32 bands are measured in the
run (tl_common.bands) and why its report says what they were measured on.
:func:`configure` makes the comparisons exact where a setting would otherwise make them loose:
TF32 off in both frameworks on GPUs, deterministic algorithms where torch has them.
"""

from __future__ import annotations

import os
from typing import Any

#: Environment variables that select kernels or threads in either framework.
NUMERICS_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "CUDA_VISIBLE_DEVICES",
                "NVIDIA_TF32_OVERRIDE")


def configure() -> None:
    """TF32 off for the comparisons (both frameworks), deterministic torch algorithms on GPUs."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    import tensorflow as tf

    tf.config.experimental.enable_tensor_float_32_execution(False)


def describe() -> dict[str, Any]:
    """The machine and the numerics settings in force, for the report."""
    import tensorflow as tf
    import torch

    from tl_common.machine import describe as machine

    found = machine()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": found["cpu_model"],
        "simd": found["simd"],
        "logical_cpus": found["logical_cpus"],
        "platform": found["platform"],
        "versions": {k: v for k, v in found["versions"].items() if v},
        "settings": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
        "torch": {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": torch.backends.mkldnn.is_available(),
            "threads": torch.get_num_threads(),
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if gpus else None,
        },
        "tensorflow": {
            "onednn": tensorflow_onednn(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
            "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
        },
        "device": ", ".join(gpus) if gpus else "CPU",
    }


def tensorflow_onednn() -> bool:
    """Whether TensorFlow runs oneDNN's CPU kernels (TF_ENABLE_ONEDNN_OPTS, or its default for
    this CPU, as read when TensorFlow loaded)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def summary(info: dict[str, Any]) -> str:
    """One paragraph for the terminal and the Markdown report."""
    settings = ", ".join(f"{k}={v}" for k, v in info["settings"].items()) or "none"
    return (f"machine: {info['cpu']} ({info['logical_cpus']} logical CPUs; "
            f"{' '.join(info['simd']) or 'no AVX'}), device {info['device']}; "
            f"torch {info['versions'].get('torch')} (ATen {info['torch']['cpu_capability']}, "
            f"{info['torch']['threads']} threads), TensorFlow {info['versions'].get('tensorflow')} "
            f"({'oneDNN' if info['tensorflow']['onednn'] else 'Eigen'} kernels, intra-op threads "
            f"{info['tensorflow']['intra_op_threads']}, TF32 {info['tensorflow']['tf32']}); "
            f"settings: {settings}")
