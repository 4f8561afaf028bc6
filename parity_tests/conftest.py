"""pytest wiring of the parity suite: the ``parity`` fixture that records rows, the report at the
end of the session, and the models and data the checks share (built once per session)."""

from __future__ import annotations

import pytest

from parity_tests.report import format_table, write_report
from parity_tests.rows import Row, describe_failures, failures

_ROWS: list[Row] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--parity-report", default=None, metavar="DIR",
                     help="write parity_report.json and parity_report.md into DIR")


class Recorder:
    """Records a check's rows for the report and fails the test on any failing row."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def record(self, rows: list[Row] | Row) -> list[Row]:
        rows = [rows] if isinstance(rows, Row) else list(rows)
        self.rows += rows
        _ROWS.extend(rows)
        return rows

    def check(self, rows: list[Row] | Row) -> None:
        """Record, then assert that every row passed (the message lists the failing ones)."""
        rows = self.record(rows)
        assert rows, "a check must produce at least one row"
        assert not failures(rows), "\n" + describe_failures(rows)


@pytest.fixture
def parity() -> Recorder:
    return Recorder()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _ROWS:
        return
    terminalreporter.section("parity report")
    terminalreporter.write_line(format_table(_ROWS))
    directory = config.getoption("--parity-report")
    if directory:
        for path in write_report(_ROWS, directory):
            terminalreporter.write_line(f"wrote {path}")
