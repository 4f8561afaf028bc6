"""Test order for the whole suite (``tests`` and ``parity_tests``).

The slowest test files run first. Under pytest-xdist (the README's ``-n auto``, whole files per
worker, taken in this order: ``--no-loadscope-reorder`` in ``pyproject.toml``), a slow file that
started last would run alone while the other workers wait. Seconds of test time per file, one
``-n auto --durations=0`` run of the full command on a 2-core AMD EPYC (Zen 4): the order only has to be
roughly right, and a file not listed here runs after these, in collection order.
"""

from __future__ import annotations

import os

import pytest

SLOWEST_FIRST = (
    "tests/test_torch_fast.py",          # 292 s
    "parity_tests/test_multiclass.py",   # 111 s
    "parity_tests/test_parity.py",       # 97 s
    "tests/test_keras_train.py",         # 74 s
    "parity_tests/test_bases.py",        # 67 s
    "tests/test_convert_bases.py",       # 57 s
    "tests/test_console.py",             # 52 s
    "parity_tests/test_mistakes.py",     # 52 s
    "tests/test_torch_train.py",         # 46 s
    "tests/test_backbones_folding.py",   # 45 s
    "tests/test_reliability_cli.py",     # 43 s
    "parity_tests/test_convert.py",      # 35 s
    "parity_tests/test_report_workers.py",  # 27 s
    "tests/test_backbones.py",           # 27 s
)


#: Tests marked ``long`` run only where this is 1 (``python -m parity_tests`` and CI set it).
LONG_ENV = "TL_LONG_TESTS"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    # A stable sort: each file's tests keep their order.
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
    if os.environ.get(LONG_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"end to end across processes: set {LONG_ENV}=1 "
                                   "(CI and python -m parity_tests do)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
