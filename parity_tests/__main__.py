"""``python -m parity_tests``: run the parity suite and print its report.

- ``python -m parity_tests [--report-dir DIR] [pytest options]`` runs every check (pytest on this
  package), prints the table (check, Keras value, torch value, |diff|, tolerance, pass/fail),
  writes ``DIR/parity_report.json`` and ``DIR/parity_report.md`` (default ``parity_report``) and
  exits non-zero on any failure. It sets ``TL_PARITY_TRAINERS=1`` and ``TL_PARITY_FREE_RUNNING=1``
  (unless set otherwise), so the report holds what the test command leaves out for time: the
  checks that run both trainers' ``main`` (14 and 15; skipped under plain ``pytest`` without the
  variable) and the free-running training rows (reported, not judged).
- ``python -m parity_tests compare RUN_A RUN_B [--output DIR]`` puts two finished runs'
  ``metrics.json`` side by side and overlays their learning curves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from parity_tests.compare import main as compare_main
        from tl_common.errors import UserError, fail

        try:
            return compare_main(argv[1:])
        except UserError as err:
            fail(str(err))
    import pytest

    report_dir = "parity_report"
    if "--report-dir" in argv:
        i = argv.index("--report-dir")
        report_dir = argv[i + 1]
        del argv[i:i + 2]
    # What the test command leaves out for time is part of the report: the checks that run both
    # trainers (14, 15), and the free-running rows (parity_tests.checks_steps).
    os.environ.setdefault("TL_PARITY_TRAINERS", "1")
    os.environ.setdefault("TL_PARITY_FREE_RUNNING", "1")
    here = str(Path(__file__).parent)
    return int(pytest.main([here, "--parity-report", report_dir, "-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
