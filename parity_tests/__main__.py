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

USAGE = """\
usage: python -m parity_tests [--report-dir DIR] [PYTEST OPTIONS]
       python -m parity_tests compare RUN_A RUN_B [--output DIR]
       python -m parity_tests seeds [--seeds N] [--output DIR] [--torch-flags "..."]

The parity suite: the Keras reference and the PyTorch port compared check by check.

  (no command)  run every check and print the report: check, Keras value, torch value, |diff|,
                tolerance, pass/fail; write DIR/parity_report.json and DIR/parity_report.md
                (--report-dir, default parity_report); exit non-zero on any failure.
  compare       two finished runs' metrics.json side by side, their curves overlaid
                (comparison.png); see python -m parity_tests compare --help.
  seeds         both trainers over N seeds on the hard demo, the port judged against the
                reference's seed-to-seed band; see python -m parity_tests seeds --help.

Opt-in checks (environment variables; the report sets the first three to 1 unless set):
  TL_PARITY_TRAINERS=1     checks 14 and 15: both trainers' main run and recorded, and
                           tl_torch.predict against the saved Keras model (about a minute);
                           check 20's training steps and epochs per base (about 3 minutes)
  TL_PARITY_FREE_RUNNING=1 the free-running training rows (reported, not judged)
  TL_PARITY_SEEDS=1        check 17, the seed study on the hard demo (about 16 minutes on
                           2 cores); TL_PARITY_SEEDS=0 leaves it out of the report
  TL_PARITY_WEIGHTS=FILE   a Keras weights file of your own for the numeric checks

pytest options: anything else is passed to pytest, e.g.
  python -m parity_tests -k padding -x      only the checks whose name matches, stop at a failure
  python -m parity_tests -n 2               two workers (pytest-xdist)
  python -m pytest parity_tests --help      all of pytest's options
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Ours, not pytest's: pytest's own help is one command away (USAGE says which).
    if argv[:1] not in (["compare"], ["seeds"]) and ("-h" in argv or "--help" in argv):
        print(USAGE, end="")
        return 0
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
    os.environ.setdefault("TL_LONG_TESTS", "1")
    here = str(Path(__file__).parent)
    return int(pytest.main([here, "--parity-report", report_dir, "-p", "no:cacheprovider", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
