"""Check 12 of the parity suite: N > 2 classes in both frameworks (``checks_multiclass.py``).

Run alone: ``python -m pytest parity_tests/test_multiclass.py -q``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity_tests import checks_multiclass


@pytest.mark.slow
def test_12_more_than_two_classes(parity, tmp_path: Path) -> None:
    parity.check(checks_multiclass.check_multiclass(tmp_path))
