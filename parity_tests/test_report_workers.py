"""The parity report when the tests run in pytest-xdist workers (``-n``, the README's command):
every worker's rows reach the report the controlling process prints, in the suite's order.

Runs a made-up suite of two files in a subprocess, with this suite's conftest as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = '''
from parity_tests.rows import Row


def test_{name}(parity):
    parity.check(Row("{group}", "{check}", "1", "1", 0.0, "exact", True))
'''


@pytest.mark.slow  # three processes that import TensorFlow and torch
def test_rows_of_every_worker_reach_the_report(tmp_path):
    # Files in the opposite of the suite's order: the report sorts by check number.
    (tmp_path / "test_a.py").write_text(CHECK.format(name="late", group="10 head",
                                                     check="row from the first file"))
    (tmp_path / "test_b.py").write_text(CHECK.format(name="early", group="2 trainable counts",
                                                     check="row from the second file"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadfile", "-p",
         "parity_tests.conftest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "--parity-report", str(tmp_path / "report"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in out
    report = out.split("parity report", 1)[1]
    assert "2 judged rows, 2 passed, 0 failed" in report
    assert report.index("[2 trainable counts]") < report.index("[10 head]")
    assert "row from the first file" in report and "row from the second file" in report
    written = (tmp_path / "report" / "parity_report.md").read_text()
    assert "row from the first file" in written and "row from the second file" in written
