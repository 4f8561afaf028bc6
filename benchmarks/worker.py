"""What both worker processes share: the measurements they offer, and the loop that serves them.

A worker is started as ``python -m benchmarks.<framework>_worker SPEC.json RESULT_FD`` by
:mod:`benchmarks.runner`. It builds everything its configuration measures (models, compiled
graphs, data loaders), warms every measurement up, says ``ready`` on the file descriptor RESULT_FD,
then waits on stdin for one command at a time: ``{"cmd": "rep", "section": NAME}`` runs one timed
repetition of that measurement and answers with its numbers; ``{"cmd": "finish"}`` answers with
the process' own summary and ends it. While a worker waits it uses no CPU, so the runner can keep
the workers of every configuration alive and take their repetitions in turn: each framework's
samples then come from the same minutes of a machine whose load changes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from benchmarks import memory
from tl_common.machine import busy_cpu_seconds, load_average


def _nothing() -> None:
    return None


@dataclass
class Bench:
    """One measurement: ``fn`` called ``calls`` times per repetition, ``items_per_call`` each."""

    fn: Callable[[], object]
    items_per_call: float
    calls: int = 1
    warmup: int = 1
    unit: str = "images/s"
    sync: Callable[[], object] = _nothing
    info: dict[str, Any] = field(default_factory=dict)
    #: What the warm-up left to report (the port's graphs and the shapes without one).
    after_warm: Callable[[], dict[str, Any]] | None = None

    def warm(self, budget_s: float | None = None) -> float:
        """The warm-up calls; returns the first one's seconds (graph tracing, lazy set-up).

        A call slower than half of ``budget_s`` ends the warm-up after the second call."""
        start = time.perf_counter()
        self.fn()
        self.sync()
        first = time.perf_counter() - start
        for _ in range(self.warmup - 1):
            t0 = time.perf_counter()
            self.fn()
            self.sync()
            if budget_s is not None and time.perf_counter() - t0 > budget_s / 2:
                break
        return first

    def rep(self) -> dict[str, float]:
        """One timed repetition: throughput, wall and CPU seconds, other work, peak memory."""
        reset = memory.reset_peak()
        before = memory.rss_mb()
        busy0, cpu0, t0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        self.sync()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        busy1 = busy_cpu_seconds()
        other = (max(0.0, (busy1 - busy0) - cpu) / wall
                 if busy0 is not None and busy1 is not None else None)
        return {"sample": self.items_per_call * self.calls / wall, "wall_s": wall, "cpu_s": cpu,
                "other_cores": other, "peak_rss_mb": memory.peak_rss_mb(), "rss_before_mb": before,
                "peak_is_per_rep": reset}


def read_spec(argv: list[str] | None = None) -> tuple[dict[str, Any], int]:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m benchmarks.<framework>_worker SPEC.json RESULT_FD")
    return json.loads(Path(args[0]).read_text()), int(args[1])


def load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The common batch: images (N, H, W, 3) float32 in [0, 255], labels (N,) int."""
    with np.load(path) as data:
        return data["images"], data["labels"]


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message, default=str) + "\n")
    out.flush()


def serve(benches: dict[str, Bench], info: dict[str, Any], result_fd: int, *,
          budget_s: float | None, extra: dict[str, Callable[[], dict[str, Any]]] | None = None,
          t_start: float) -> None:
    """Warm every measurement up, say ready, then answer the runner's commands until finish.

    ``extra``: commands beyond ``rep`` and ``finish`` (``profile``), each answering a dict.
    """
    out = os.fdopen(result_fd, "w")
    setup: dict[str, Any] = {}
    for name, bench in list(benches.items()):
        try:
            setup[name] = {"first_call_s": bench.warm(budget_s), "unit": bench.unit,
                           "items_per_repeat": bench.items_per_call * bench.calls, **bench.info}
            if bench.after_warm is not None:
                setup[name].update(bench.after_warm())
        except Exception as err:  # one broken measurement must not lose the others
            setup[name] = {"error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc()}
            del benches[name]
        print(f"[{name}] warm: {setup[name]}", flush=True)
    _send(out, {"ready": True, "setup": setup, "load_average": load_average(),
                "setup_s": time.perf_counter() - t_start, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "rep":
            try:
                answer = benches[cmd["section"]].rep()
            except Exception as err:
                answer = {"error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()}
            _send(out, answer)
        elif cmd["cmd"] == "finish":
            break
        elif extra and cmd["cmd"] in extra:
            try:
                _send(out, extra[cmd["cmd"]]())
            except Exception as err:
                _send(out, {"error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()})
        else:
            _send(out, {"error": f"unknown command {cmd!r}"})
    _send(out, {"process_s": time.perf_counter() - t_start,
                "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "children_ru_maxrss_mb":
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "load_average": load_average()})
    out.close()
