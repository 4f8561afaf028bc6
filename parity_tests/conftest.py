"""pytest wiring of the parity suite: the ``parity`` fixture that records rows, the report at the
end of the session, and the models and data the checks share (built once per session).

Under pytest-xdist (``-n``) each worker records the rows of the checks it ran and hands them to
the controlling process when it finishes (``workeroutput``); the report is printed there, in the
suite's order whichever worker ran which check."""

from __future__ import annotations

import fcntl
import json
import re

import pytest

from parity_tests.report import format_table, write_report
from parity_tests.rows import Row, describe_failures, failures
from tl_common.compat import load_before_tensorflow

load_before_tensorflow()  # before the checks import TensorFlow: see tl_common/compat.py
# TensorFlow reads its settings (oneDNN or Eigen kernels) when it loads: as the Keras reference
# sets them, whichever check imports Keras first.
import tl_keras  # noqa: E402, F401

_ROWS: list[Row] = []
_ENVIRONMENT: dict = {}


@pytest.fixture(scope="session", autouse=True)
def numerics_settings() -> None:
    """TF32 off and deterministic algorithms for the comparisons; what the report says of them."""
    from parity_tests import environment

    environment.configure()
    _ENVIRONMENT.update(environment.describe())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``trainers`` (both trainers' main, recorded: about a minute) run only when
    TL_PARITY_TRAINERS=1, and ``seeds`` (both trainers over 5 seeds and a planted mistake: about
    16 minutes on 2 cores) only when TL_PARITY_SEEDS=1; ``python -m parity_tests`` sets both."""
    from parity_tests import checks_trainers, seeds

    for marker, module, what in (("trainers", checks_trainers, "runs both trainers"),
                                 ("seeds", seeds, "runs both trainers over 5 seeds")):
        if module.enabled():
            continue
        skip = pytest.mark.skip(reason=f"{what}: set {module.ENV}=1 (python -m parity_tests does)")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


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


@pytest.fixture
def seed_study_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One folder for the seed study's runs (check 17), so that its planted mistake
    (test_mistakes.py) reruns only the port and reuses the reference's runs: the session's, or
    under xdist the one all workers share. A test holds the folder's lock while it runs, so that
    in two workers the second waits and reuses the first's runs."""
    base = tmp_path_factory.getbasetemp()
    in_worker = hasattr(request.config, "workerinput")
    folder = (base.parent if in_worker else base) / "seeds"
    folder.mkdir(exist_ok=True)
    with open(folder.parent / "seeds.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


def _suite_order(row: Row) -> tuple[int, str]:
    number = re.match(r"\d+", row.group)
    return (int(number.group()) if number else 1_000, row.group)


def _json_value(value):
    return value.item() if hasattr(value, "item") else str(value)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In an xdist worker: hand the rows and the environment to the controlling process."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["parity_rows"] = json.dumps([r.as_dict() for r in _ROWS],
                                                 default=_json_value)
        workeroutput["parity_environment"] = json.dumps(_ENVIRONMENT, default=_json_value)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """In the controlling process: collect a finished xdist worker's rows."""
    output = getattr(node, "workeroutput", None) or {}
    _ROWS.extend(Row(**row) for row in json.loads(output.get("parity_rows", "[]")))
    if not _ENVIRONMENT:
        _ENVIRONMENT.update(json.loads(output.get("parity_environment", "{}")))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _ROWS:
        return
    rows = sorted(_ROWS, key=_suite_order)
    terminalreporter.section("parity report")
    if _ENVIRONMENT:
        from parity_tests.environment import summary

        terminalreporter.write_line(summary(_ENVIRONMENT))
    terminalreporter.write_line(format_table(rows))
    directory = config.getoption("--parity-report")
    if directory:
        for path in write_report(rows, directory, _ENVIRONMENT):
            terminalreporter.write_line(f"wrote {path}")
