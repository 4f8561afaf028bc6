"""The parity report: every row of every check, as a terminal table, JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from parity_tests.rows import Row

#: |diff| is the port's error; "keras err" the reference's own error in the same run, where the
#: row's band is measured (tl_common.bands), and "ratio" the one over the other.
COLUMNS = ("check", "keras", "torch", "|diff|", "keras err", "ratio", "tolerance", "result")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _ratio(row: Row) -> str:
    if row.keras_error is None or row.diff is None:
        return ""
    if row.keras_error == 0:
        return "0" if row.diff == 0 else "inf"
    return f"{row.diff / row.keras_error:.2f}"


def _cells(row: Row) -> tuple[str, ...]:
    if row.judged:
        result = "pass" if row.passed else "FAIL"
    else:  # reported, summed up by a judged row
        result = "(within)" if row.passed else "(over)"
    return (row.check, row.keras, row.torch, _number(row.diff), _number(row.keras_error),
            _ratio(row), row.tolerance, result)


def format_table(rows: Sequence[Row]) -> str:
    """A fixed-width table grouped by the suite's numbered items."""
    if not rows:
        return "no parity rows recorded"
    widths = [max(len(c[i]) for c in [COLUMNS, *map(_cells, rows)]) for i in range(len(COLUMNS))]
    widths[0] = min(widths[0], 58)
    line = "  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True))
    out = [line, "-" * len(line)]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            out.append(f"[{group}]")
        cells = list(_cells(row))
        cells[0] = cells[0] if len(cells[0]) <= widths[0] else cells[0][: widths[0] - 3] + "..."
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    failed = sum(not r.passed and r.judged for r in rows)
    judged = sum(r.judged for r in rows)
    out.append(f"{judged} judged rows, {judged - failed} passed, {failed} failed; "
               f"{len(rows) - judged} reported rows (in parentheses)")
    return "\n".join(out)


def format_markdown(rows: Sequence[Row], environment: dict | None = None) -> str:
    judged = [r for r in rows if r.judged]
    out = ["# Parity report: Keras reference vs PyTorch port", "",
           f"{len(judged)} judged rows, {sum(r.passed for r in judged)} passed, "
           f"{sum(not r.passed for r in judged)} failed; {len(rows) - len(judged)} reported rows "
           "(each step of a trajectory, in parentheses: summed up by a judged row).", ""]
    if environment:
        from parity_tests.environment import summary

        out += [summary(environment) + ".", "",
                "Float32 rows: |diff| is the port's error, *keras err* the reference's own error "
                "measured in the same run (against float64, or its spread on TensorFlow's other "
                "kernels), and the tolerance a stated multiple of it (tl_common/bands.py).", ""]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            out += ["", f"## {group}", "", "| " + " | ".join(COLUMNS) + " | note |",
                    "|" + "---|" * (len(COLUMNS) + 1)]
        cells = [c.replace("|", "\\|") for c in (*_cells(row), row.note)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(rows: Sequence[Row], directory: str | os.PathLike[str],
                 environment: dict | None = None) -> list[Path]:
    from tl_common.outputs import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"machine": environment or {"platform": platform.platform(), "cpus": os.cpu_count()},
           "rows": [r.as_dict() for r in rows],
           "passed": sum(r.passed and r.judged for r in rows),
           "failed": sum(not r.passed and r.judged for r in rows)}
    json_path, md_path = directory / "parity_report.json", directory / "parity_report.md"
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(md_path, format_markdown(rows, environment))
    return [json_path, md_path]
