"""bf16 against float32, in each framework: the port under CPU/GPU autocast against its own float32,
Keras' ``mixed_bfloat16`` policy against its float32 (oneDNN on), in (a), (b), (c) and, for the
port, the base forward alone (:func:`benchmarks.report.bf16_lines` renders it).

The port's target: bf16 at least :data:`TARGET_GAIN` times its float32 throughput in (a) and (c)
on a CPU with native bf16. The base forward's own gain bounds them: (c) is the base plus a few
passes; (a) adds the augmentation's sampling, the loss and the optimizer, which autocast keeps in
float32. :func:`base_bound` says where each step would stand if only its base gained.
"""

from __future__ import annotations

from operator import truediv
from typing import Any

from benchmarks import config as C
from benchmarks import report
from benchmarks.stats import bootstrap_interval, ratio

#: The port's bf16 throughput at least this many times its float32 in :data:`TARGET_ROWS`.
TARGET_GAIN = 1.8
TARGET_ROWS = ("a", "c")
#: The rows compared: (row, section, what).
ROWS = (("a", C.TRAIN_A, "phase-A training step"), ("b", C.TRAIN_B, "phase-B training step"),
        ("c", C.INFER, "inference, whole model"), ("g1", C.BASE_FORWARD, "base forward alone"))


def _gain(results: dict[str, list[dict[str, Any]]], summary: dict[str, Any], section: str,
          bf16: str, fp32: str) -> dict[str, Any] | None:
    """One framework's bf16 ÷ float32 in one section: of the medians, paired by repetition, and
    the bootstrap interval of the first; None where either was not measured."""
    in_bf16, in_fp32 = (summary.get(name, {}).get(section, {}).get("median")
                        for name in (bf16, fp32))
    if in_bf16 is None or in_fp32 is None:
        return None
    paired, quiet = report.paired_ratios(results, section, fp32, section, port=bf16)
    groups = [report.pooled(results.get(name, []), section) for name in (bf16, fp32)]
    return {"bf16": in_bf16, "float32": in_fp32, "ratio": ratio(in_bf16, in_fp32),
            "ratio_paired": paired,
            "ratio_quiet": quiet,
            "interval": bootstrap_interval(groups, truediv, level=report.INTERVAL_LEVEL)}


def base_bound(step: dict[str, Any], base: dict[str, Any]) -> float:
    """The gain a step would reach if its base forward gained as much as the base forward alone
    and the rest of it stayed as in float32: seconds per image, float32 step over the step with
    the base's float32 time replaced by its bf16 time."""
    step32 = 1.0 / step["float32"]
    return step32 / (step32 - 1.0 / base["float32"] + 1.0 / base["bf16"])


def gains(summary: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> list[dict]:
    """Per row of :data:`ROWS`: the port's and Keras' bf16 gains and, in :data:`TARGET_ROWS`, the
    port's verdict (``met``; ``decided``: False where the target lies inside the interval).
    Empty when the run measured no bf16."""
    if C.TORCH_BF16.name not in summary and C.KERAS_BF16.name not in summary:
        return []
    out = [{"row": row, "measure": what,
            "port": _gain(results, summary, section, C.TORCH_BF16.name, C.TORCH.name),
            "keras": _gain(results, summary, section, C.KERAS_BF16.name, C.KERAS_ONEDNN.name)}
           for row, section, what in ROWS]
    base = next(entry["port"] for entry in out if entry["row"] == "g1")
    for entry in out:
        port = entry["port"]
        if entry["row"] in TARGET_ROWS and port is not None:
            interval = port["interval"]
            entry.update(target=TARGET_GAIN, met=port["ratio"] >= TARGET_GAIN,
                         decided=None if interval is None else
                         not interval[0] < TARGET_GAIN < interval[1],
                         base_bound=None if base is None else base_bound(port, base))
    return out

