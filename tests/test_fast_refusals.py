"""Both trainers refuse a bad flag or a locked output folder before their frameworks load.

A refusal that waits for Lightning, torchmetrics, torch or TensorFlow to import takes seconds
(``import lightning`` alone is several seconds on two cores); checked before, it is about as quick
as Python's own start. Run: ``python -m pytest tests/test_fast_refusals.py -q``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tl_common.lock import OutputLock

REPO = Path(__file__).resolve().parents[1]
TRAINERS = ("tl_torch.train", "tl_keras.train")
#: The frameworks that must not have loaded when a trainer refuses.
HEAVY = ("torch", "lightning", "torchmetrics", "tensorflow", "keras")
#: Repetitions of each timing; the fastest counts: other processes on the machine only ever add
#: time, so the minimum is the measure least decided by them.
REPEATS = 3
#: Refusal time over a bare ``python -c pass`` start, both measured here. The target is a refusal
#: under 2 s on a quiet two-core machine, where a bare start takes about a tenth of a second: about
#: 20 bare starts. What the trainers load before refusing (jsonargparse, numpy, the project's
#: tl_common and, for Keras, Triton ahead of TensorFlow) stays well under that, while loading
#: torch alone already comes close to it and Lightning or TensorFlow far exceed it.
MAX_RATIO = 20.0


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def fastest(argv: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """The fastest of :data:`REPEATS` runs of ``argv`` (wall seconds), and the last run."""
    best, result = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True,
                                timeout=300)
        best = min(best, time.perf_counter() - start)
    return best, result


def loaded_modules(stderr: str) -> set[str]:
    """The top-level modules that ``python -X importtime`` reports as imported."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.fixture(scope="module")
def bare_start(tmp_path_factory) -> float:
    seconds, result = fastest([sys.executable, "-c", "pass"], tmp_path_factory.mktemp("bare"))
    assert result.returncode == 0
    return seconds


def refusal_cases(tmp_path: Path) -> dict[str, list[str]]:
    locked = tmp_path / "locked"
    locked.mkdir()
    return {"bad flag": ["--demo", "--batch-size", "0", "--output-dir", str(tmp_path / "a")],
            "unknown flag": ["--demo", "--no-such-flag"],
            "locked folder": ["--demo", "--output-dir", str(locked)]}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_refusals_come_before_the_frameworks_load(trainer, bare_start, tmp_path) -> None:
    cases = refusal_cases(tmp_path)
    with OutputLock(tmp_path / "locked"):
        for case, args in cases.items():
            argv = [sys.executable, "-X", "importtime", "-m", trainer, *args]
            seconds, result = fastest(argv, tmp_path)
            errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            assert result.returncode == 2, (case, result.stderr[-2000:])
            assert len(errors) == 1 and "Traceback" not in result.stderr, (case, errors)
            if case == "locked folder":
                assert "in use by another run" in errors[0]
            heavy = loaded_modules(result.stderr) & set(HEAVY)
            assert not heavy, f"{trainer}, {case}: {sorted(heavy)} loaded before the refusal"
            ratio = seconds / bare_start
            print(f"{trainer} {case}: {seconds:.2f} s, {ratio:.1f}x a bare start "
                  f"({bare_start:.3f} s)")
            assert ratio < MAX_RATIO, (case, seconds, bare_start)


@pytest.mark.slow
def test_the_probe_sees_a_framework_load(tmp_path) -> None:
    """The import probe is not vacuous: a command that does load torch is seen to."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert "torch" in loaded_modules(result.stderr)
