"""``python -m parity_tests compare RUN_A RUN_B``: two finished runs side by side.

Prints what both ``metrics.json`` files say (framework, weights, data digests, counts, the last
epoch of each phase, test results, timings) with the difference where it is a number, flags
differences in the data and counts that make a comparison meaningless, and writes
``comparison.png``: both learning curves overlaid.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tl_common.errors import run_main
from tl_common.outputs import plot_learning_curves, read_metrics


def _last_of_phase(history: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    entries = [h for h in history if h["phase"] == phase]
    return entries[-1] if entries else None


def comparison_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(what, run A, run B, |diff| or a remark) for the quantities a reader compares."""
    rows: list[tuple[str, Any, Any, str]] = []

    def add(what: str, va: Any, vb: Any) -> None:
        if isinstance(va, int | float) and isinstance(vb, int | float) and not isinstance(va, bool):
            remark = f"{abs(va - vb):.4g}"
        else:
            remark = "same" if va == vb else "DIFFERENT"
        rows.append((what, va, vb, remark))

    add("framework", a["framework"], b["framework"])
    add("weights", a["weights"]["source"], b["weights"]["source"])
    add("weights sha256", (a["weights"].get("sha256") or "-")[:16], (b["weights"].get("sha256") or "-")[:16])
    for split in ("train", "validation", "test"):
        add(f"{split} files sha256", a["data"]["files"][split]["sha256"][:16],
            b["data"]["files"][split]["sha256"][:16])
    for phase in ("feature_extraction", "fine_tuning"):
        for kind in ("trainable", "non_trainable"):
            add(f"{phase} {kind} params", a["counts"][phase][kind], b["counts"][phase][kind])
    for phase in ("feature_extraction", "fine_tuning"):
        ea, eb = _last_of_phase(a["history"], phase), _last_of_phase(b["history"], phase)
        if ea is None or eb is None:
            continue
        # Both runs' epochs named: the last epoch of a phase need not be the same in the two.
        epochs = (f"epoch {ea['epoch']}" if ea["epoch"] == eb["epoch"]
                  else f"A epoch {ea['epoch']} vs B epoch {eb['epoch']}")
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            add(f"{phase} {epochs} {key}", ea[key], eb[key])
    if a.get("test") and b.get("test"):
        for key in ("loss", "accuracy"):
            add(f"test {key}", a["test"][key], b["test"][key])
    for key in sorted(set(a["timings"]) & set(b["timings"])):
        add(f"time {key}", round(a["timings"][key], 2), round(b["timings"][key], 2))
    return rows


#: The settings that make up a run's schedule: runs that differ in one compare unlike epochs.
SCHEDULE_SETTINGS = ("initial_epochs", "fine_tune_epochs", "batch_size", "limit_batches")


def schedule_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``--flag A vs B`` for each schedule setting in which the two runs differ."""
    sa, sb = a.get("settings", {}), b.get("settings", {})
    return [f"--{key.replace('_', '-')} {sa.get(key)} vs {sb.get(key)}"
            for key in SCHEDULE_SETTINGS if sa.get(key) != sb.get(key)]


def format_rows(rows: list[tuple[str, Any, Any, str]], names: tuple[str, str]) -> str:
    header = ("", names[0], names[1], "|diff|")
    cells = [header] + [(w, f"{va:.4f}" if isinstance(va, float) else str(va),
                         f"{vb:.4f}" if isinstance(vb, float) else str(vb), r)
                        for w, va, vb, r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity_tests compare", description=__doc__)
    parser.add_argument("run_a", help="a run's output folder or its metrics.json")
    parser.add_argument("run_b")
    parser.add_argument("--output", default=None,
                        help="folder for comparison.png (default: the current folder)")
    args = parser.parse_args(argv)
    a, b = read_metrics(args.run_a), read_metrics(args.run_b)
    names = (f"A: {a['framework']}", f"B: {b['framework']}")
    rows = comparison_rows(a, b)
    print(format_rows(rows, names))
    mismatched = [w for w, _, _, r in rows if r == "DIFFERENT" and ("sha256" in w or "params" in w)]
    if mismatched:
        print(f"note: the runs differ in {', '.join(mismatched)}: their numbers are not comparable "
              "one to one")
    if schedule := schedule_differences(a, b):
        print(f"warning: the two runs had different schedules (A vs B: {', '.join(schedule)}): "
              "their epochs are not the same point of training")
    out = Path(args.output or ".")
    out.mkdir(parents=True, exist_ok=True)
    label = {names[0]: a["history"], names[1]: b["history"]}
    if names[0] == names[1]:
        label = {f"A ({args.run_a})": a["history"], f"B ({args.run_b})": b["history"]}
    plot_learning_curves(out / "comparison.png", label, title="learning curves, overlaid")
    print(f"wrote {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    run_main(main)
