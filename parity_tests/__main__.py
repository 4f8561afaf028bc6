"""``python -m parity_tests``: run the parity suite and print its report.

- ``python -m parity_tests [--report-dir DIR] [pytest options]`` runs every check (pytest on this
  package), prints the table (check, Keras value, torch value, |diff|, tolerance, pass/fail),
  writes ``DIR/parity_report.json`` and ``DIR/parity_report.md`` (default ``parity_report``) and
  exits non-zero on any failure. It sets ``TL_PARITY_TRAINERS=1``, ``TL_PARITY_FREE_RUNNING=1`` and
  ``TL_PARITY_SEEDS=1`` (unless set otherwise), so the report holds what the test command leaves
  out for time: the checks that run both trainers' ``main`` (14 and 15), the free-running
  training rows (reported, not judged) and the seed study on the hard demo (17: about 16 minutes
  on 2 cores; ``TL_PARITY_SEEDS=0`` leaves it out).
- ``python -m parity_tests compare RUN_A RUN_B [--output DIR]`` puts two finished runs'
  ``metrics.json`` side by side and overlays their learning curves.
- ``python -m parity_tests seeds [--seeds N] [--output DIR] [--torch-flags "..."]`` runs both
  trainers over N seeds on the hard demo and judges the port against the reference's
  seed-to-seed band (:mod:`parity_tests.seeds`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("compare", "seeds"):
        from tl_common.errors import UserError, fail

        if argv[0] == "compare":
            from parity_tests.compare import main as command
        else:
            from parity_tests.seeds import main as command
        try:
            return command(argv[1:])
        except UserError as err:
            fail(str(err))
    import pytest

    report_dir = "parity_report"
    if "--report-dir" in argv:
        i = argv.index("--report-dir")
        report_dir = argv[i + 1]
        del argv[i:i + 2]
    # What the test command leaves out for time is part of the report: the checks that run both
    # trainers (14, 15), the free-running rows (parity_tests.checks_steps), the seed study (17).
    os.environ.setdefault("TL_PARITY_TRAINERS", "1")
    os.environ.setdefault("TL_PARITY_FREE_RUNNING", "1")
    os.environ.setdefault("TL_PARITY_SEEDS", "1")
    here = str(Path(__file__).parent)
    return int(pytest.main([here, "--parity-report", report_dir, "-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
