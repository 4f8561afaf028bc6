"""Starting the worker processes, taking their repetitions in turn, and the demo runs.

Every configuration runs in a fresh interpreter of its own (TensorFlow and torch never share a
process). The workers are started one after the other; each builds and warms up everything it
measures, then waits. Then, repetition by repetition and measurement by measurement, each worker
that offers that measurement is asked for one repetition, in an order that rotates: the samples
of both frameworks come from the same minutes, and a burst of other work on a shared machine falls
on neighbouring repetitions of both (the report pairs them). Worker output goes to ``DIR/logs/``;
the parent reads each worker's peak resident memory from ``wait4`` when it ends.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from benchmarks import config as C
from tl_common.machine import busy_cpu_seconds, load_average, wait_for_quiet

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Seconds a worker may take to build and warm up, and to answer one command.
SETUP_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 600
DEMO_TIMEOUT_S = 1800
#: A worker is not started with less memory than this available (each holds ~1.2-1.7 GB).
MIN_AVAILABLE_MB = 2500


def _available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Finished:
    """A child process that ended: exit code, wall seconds, peak resident memory, log file."""

    returncode: int
    wall_s: float
    maxrss_mb: float
    log: Path
    timed_out: bool


def _reap(proc: subprocess.Popen, timeout_s: float) -> tuple[int, float, bool]:
    """Wait for ``proc`` (killed after ``timeout_s``); its exit code and peak RSS from wait4."""
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timed_out = timer.finished.is_set()  # set by now only if it fired
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    return proc.returncode, usage.ru_maxrss / 1024, timed_out  # ru_maxrss: KiB on Linux


def run_child(cmd: list[str], *, env: dict[str, str], log: Path, timeout_s: float) -> Finished:
    """Run ``cmd`` from the repository root, output to ``log``; its own rusage via ``wait4``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        code, maxrss, timed_out = _reap(proc, timeout_s)
    return Finished(code, time.perf_counter() - t0, maxrss, log, timed_out)


def make_batch(path: Path, data_root: Path, n: int = C.BATCH_SIZE) -> None:
    """The batch every in-memory measurement uses: ``n`` demo training images, decoded and resized
    to 160x160 once here (Pillow, bilinear), float32 in [0, 255], NHWC, with their labels."""
    from PIL import Image

    from tl_common.files import load_splits

    files = load_splits(data_root, 0.2, C.SEED).train
    order = np.random.default_rng(C.SEED).permutation(len(files))[:n]
    paths, labels = files.paths, files.labels
    images = np.empty((len(order), C.IMAGE_SIZE, C.IMAGE_SIZE, 3), np.float32)
    for i, j in enumerate(order):
        with Image.open(paths[j]) as img:
            images[i] = np.asarray(img.convert("RGB").resize((C.IMAGE_SIZE, C.IMAGE_SIZE),
                                                             Image.BILINEAR), np.float32)
    np.savez(path, images=images, labels=np.asarray([labels[j] for j in order], np.int64))


def settle(max_wait_s: float, say: Callable[[str], None]) -> dict[str, Any] | None:
    """Wait (up to ``max_wait_s``) for other work on the machine to stop."""
    if max_wait_s <= 0:
        return None
    quiet = wait_for_quiet(max_wait_s, window_s=min(2.0, max_wait_s))
    if not quiet["quiet"] and quiet["other_cores"] is not None:
        say(f"        (other work still using {quiet['other_cores']:.1f} cores after "
            f"{quiet['waited_s']:.0f} s: going on)")
    return quiet


@dataclass
class Worker:
    """A live worker process and what it has answered so far."""

    cfg: C.Config
    proc: subprocess.Popen
    answers: IO[str]
    log: Path
    t0: float
    result: dict[str, Any] = field(default_factory=dict)
    dead: str | None = None

    def ask(self, cmd: dict[str, Any], timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        if self.dead:
            return {"error": self.dead}
        if cmd is not None:
            try:
                self.proc.stdin.write(json.dumps(cmd) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self.dead = f"worker ended (exit code {self.proc.poll()}): see {self.log}"
                return {"error": self.dead}
        return self.receive(timeout_s)

    def receive(self, timeout_s: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.answers], [], [], timeout_s)
        line = self.answers.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.dead = (f"no answer within {timeout_s:.0f} s" if not ready else
                         "worker ended") + f": see {self.log}"
            return {"error": self.dead}
        return json.loads(line)


def start_worker(cfg: C.Config, spec: dict[str, Any], work: Path, logs: Path) -> Worker:
    spec_path = work / f"{cfg.name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    read_fd, write_fd = os.pipe()
    log = logs / f"{cfg.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **cfg.env, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{cfg.framework}_worker", str(spec_path),
             str(write_fd)], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=REPO_ROOT, pass_fds=(write_fd,), text=True)
    os.close(write_fd)
    return Worker(cfg, proc, os.fdopen(read_fd), log, time.perf_counter())


def _record(section: dict[str, Any], answer: dict[str, Any], seq: int, rep: int) -> None:
    for key, target in (("sample", "samples"), ("wall_s", "wall_s"), ("cpu_s", "cpu_s"),
                        ("other_cores", "other_cores")):
        if answer.get(key) is not None:
            section.setdefault(target, []).append(answer[key])
    section.setdefault("seq", []).append(seq)
    section.setdefault("rep", []).append(rep)
    section["peak_rss_mb"] = max(section.get("peak_rss_mb") or 0.0, answer["peak_rss_mb"])
    if answer.get("rss_before_mb") is not None:  # what the repetition itself added
        rise = answer["peak_rss_mb"] - answer["rss_before_mb"]
        section["peak_rise_mb"] = max(section.get("peak_rise_mb") or 0.0, rise)


def run_workers(configs: list[C.Config], *, sizes: C.Sizes, work: Path, logs: Path,
                batch_file: Path, data_root: Path, profile_dir: Path | None, wait_quiet_s: float,
                say: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """Start every configuration's worker, take ``sizes.repeats`` repetitions of each measurement
    in turn, finish them; the results by configuration name (a list of one, as ``report`` reads)."""
    workers: list[Worker] = []
    results: dict[str, list[dict[str, Any]]] = {}
    for i, cfg in enumerate(configs, start=1):
        base = {"config": cfg.to_dict(), "sections": {}}
        results[cfg.name] = [base]
        available = _available_mb()
        if available is not None and available < MIN_AVAILABLE_MB:
            base["error"] = f"not started: {available:.0f} MB of memory available"
            say(f"[{i}/{len(configs)}] {cfg.name}: {base['error']}")
            continue
        base_note = "" if cfg.base == C.DEFAULT_BASE else f" [{cfg.base}]"
        say(f"[{i}/{len(configs)}] starting {cfg.name}{base_note}: {cfg.label} ...")
        settle(wait_quiet_s, say)
        spec = {"config": cfg.to_dict(), "sizes": sizes.to_dict(), "batch_file": str(batch_file),
                "data_root": str(data_root),
                "profile_dir": str(profile_dir) if profile_dir and cfg.primary else None}
        w = start_worker(cfg, spec, work, logs)
        ready = w.receive(SETUP_TIMEOUT_S)
        if "error" in ready:
            base["error"] = ready["error"]
            say(f"        failed: {ready['error']}")
            _reap(w.proc, 60)
            continue
        base.update({k: v for k, v in ready.items() if k != "ready"})
        for name, setup in ready["setup"].items():
            base["sections"][name] = ({"error": setup["error"]} if "error" in setup else
                                      {"unit": setup["unit"], "first_call_s": setup["first_call_s"],
                                       "items_per_repeat": setup["items_per_repeat"],
                                       "info": {k: v for k, v in setup.items() if k not in
                                                ("unit", "first_call_s", "items_per_repeat")}})
        say(f"        ready in {ready['setup_s']:.0f} s")
        workers.append(w)

    # Repetitions in turn: measurement by measurement, the workers' order rotating.
    order = [s for cfg in configs for s in results[cfg.name][0]["sections"]]
    sections = list(dict.fromkeys(order))
    spent = dict.fromkeys(sections, 0.0)
    seq = 0
    say(f"measuring: {len(sections)} measurements x {sizes.repeats} repetitions, "
        f"{len(workers)} workers in turn")
    for rep in range(sizes.repeats):
        settle(min(wait_quiet_s, 2.0), say)
        for name in sections:
            takers = [w for w in workers if not w.dead and "error" not in
                      results[w.cfg.name][0]["sections"].get(name, {"error": "absent"})]
            # A worker whose one repetition outlasts the whole budget (bf16 emulated on a CPU
            # without it) gives one sample; the others stop once the budget is spent.
            takers = [w for w in takers if not any(
                t > sizes.budget_s for t in results[w.cfg.name][0]["sections"][name].get("wall_s", []))]
            if not takers or (rep >= C.MIN_REPEATS
                              and spent[name] > sizes.budget_s * len(takers)):
                continue
            shift = rep % len(takers)
            for w in takers[shift:] + takers[:shift]:
                answer = w.ask({"cmd": "rep", "section": name})
                section = results[w.cfg.name][0]["sections"][name]
                if "error" in answer:
                    section["error"] = answer["error"]
                    say(f"        {w.cfg.name} {name}: {answer['error']}")
                    continue
                seq += 1
                _record(section, answer, seq, rep)
                spent[name] += answer["wall_s"]
        say(f"        repetition {rep + 1}/{sizes.repeats} done")

    for w in workers:
        base = results[w.cfg.name][0]
        if profile_dir and w.cfg.primary and w.cfg.framework == "torch":
            say(f"profiling {w.cfg.name} ...")
            base["profile"] = w.ask({"cmd": "profile"})
        final = w.ask({"cmd": "finish"})
        code, maxrss, _ = _reap(w.proc, 120)
        base.update({k: v for k, v in final.items() if k != "error"})
        base.update(returncode=code, maxrss_mb=maxrss, wall_s=time.perf_counter() - w.t0,
                    log=str(w.log))
        if w.dead:
            base["error"] = w.dead
        w.answers.close()
    return results


def run_demo(framework: str, *, logs: Path, wait_quiet_s: float,
             say: Callable[[str], None]) -> dict[str, Any]:
    """``python -m tl_<framework>.train --demo`` into a temporary folder: wall time, its own
    phase timings from metrics.json, peak memory, test accuracy."""
    say(f"demo: python -m tl_{framework}.train --demo ...")
    quiet = settle(wait_quiet_s, say)
    busy0 = busy_cpu_seconds()
    with tempfile.TemporaryDirectory(prefix=f"tl-bench-demo-{framework}-") as tmp:
        out = Path(tmp) / "run"
        load = load_average()
        child = run_child([sys.executable, "-m", f"tl_{framework}.train", "--demo",
                           "--output-dir", str(out)], env=dict(os.environ),
                          log=logs / f"demo-{framework}.log", timeout_s=DEMO_TIMEOUT_S)
        result: dict[str, Any] = {"wall_s": child.wall_s, "maxrss_mb": child.maxrss_mb,
                                  "returncode": child.returncode, "log": str(child.log),
                                  "load_average_before": load, "load_average_after": load_average(),
                                  "quiet_before": quiet}
        busy1 = busy_cpu_seconds()
        if busy0 is not None and busy1 is not None:
            # Busy cores over the run, the demo's own included: 2 on a 2-core machine is full.
            result["machine_busy_cores"] = (busy1 - busy0) / child.wall_s
        metrics = out / "metrics.json"
        if child.returncode == 0 and metrics.exists():
            doc = json.loads(metrics.read_text())
            result["timings"] = doc.get("timings")
            result["test"] = doc.get("test")
            result["epochs"] = len(doc.get("history", []))
        else:
            result["error"] = f"exit code {child.returncode}: see {child.log}"
    say(f"        {child.wall_s:.0f} s, peak RSS {child.maxrss_mb:.0f} MB"
        + ("" if child.returncode == 0 else f", {result['error']}"))
    return result
