"""The parity report: every row of every check, as a terminal table, JSON and Markdown."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from parity_tests.rows import Row

COLUMNS = ("check", "keras", "torch", "|diff|", "tolerance", "result")


def _diff(row: Row) -> str:
    return "" if row.diff is None else f"{row.diff:.3g}"


def _cells(row: Row) -> tuple[str, ...]:
    return (row.check, row.keras, row.torch, _diff(row), row.tolerance,
            "pass" if row.passed else "FAIL")


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
    failed = sum(not r.passed for r in rows)
    out.append(f"{len(rows)} rows, {len(rows) - failed} passed, {failed} failed")
    return "\n".join(out)


def format_markdown(rows: Sequence[Row]) -> str:
    out = ["# Parity report: Keras reference vs PyTorch port", "",
           f"{len(rows)} rows, {sum(r.passed for r in rows)} passed, "
           f"{sum(not r.passed for r in rows)} failed.", ""]
    group = None
    for row in rows:
        if row.group != group:
            group = row.group
            out += ["", f"## {group}", "", "| " + " | ".join(COLUMNS) + " | note |",
                    "|" + "---|" * (len(COLUMNS) + 1)]
        cells = [c.replace("|", "\\|") for c in (*_cells(row), row.note)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(rows: Sequence[Row], directory: str | os.PathLike[str]) -> list[Path]:
    from tl_common.outputs import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "rows": [r.as_dict() for r in rows],
           "passed": sum(r.passed for r in rows), "failed": sum(not r.passed for r in rows)}
    json_path, md_path = directory / "parity_report.json", directory / "parity_report.md"
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(md_path, format_markdown(rows))
    return [json_path, md_path]
