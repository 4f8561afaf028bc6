"""A run's outputs, the same for both frameworks: ``metrics.json``, ``learning_curves.png`` and
``layer_table.csv`` in ``--output-dir``, each written atomically (a crashed run never leaves a
half-written file that a later run would read as finished)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tl_common.errors import UserError, disk_full, disk_full_is_one_line, is_disk_full

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
CURVES_FILE = "learning_curves.png"
LAYER_TABLE_FILE = "layer_table.csv"

PHASES = ("feature_extraction", "fine_tuning")
HISTORY_KEYS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy")
LAYER_TABLE_COLUMNS = ("index", "type", "name", "trainable")


# ---- atomic files ----------------------------------------------------------------------------
#
# Every file a run writes goes to a temporary file beside its name, is fsynced and then renamed
# over the name: a kill, a signal or a full disk at any moment leaves the previous version whole
# (or none), never a half-written one. A full disk or quota is one line naming the file
# (tl_common.errors.disk_full); the temporary file is removed.
#
# mkstemp makes its file 0600 (private while it is written); once renamed it is the user's
# output, so it gets the mode any other program's new file would get under the user's umask.

def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux' /proc);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(name, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    with disk_full_is_one_line(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            try:
                os.fchmod(fd, new_file_mode())
                view = memoryview(data)
                while view:  # os.write may write less than asked
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike[str], tmp_name: str) -> Iterator[Path]:
    """For writers that want a file name (Keras, h5py): yields ``tmp_name`` beside ``path`` to
    write, then fsyncs it and renames it over ``path``; on any failure the temporary file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(tmp_name)
    with disk_full_is_one_line(path):
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# ---- the output folder -----------------------------------------------------------------------

@dataclass(frozen=True)
class RunDir:
    """The output folder of one run, and the rules for reusing one."""

    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def curves(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def layer_table(self) -> Path:
        return self.path / LAYER_TABLE_FILE

    def is_finished(self) -> bool:
        try:
            return json.loads(self.metrics.read_text()).get("status") == "complete"
        except (OSError, ValueError):
            return False

    def prepare(self, *, resume: bool, overwrite: bool, has_state: bool) -> None:
        """Create the folder, or refuse to reuse one that holds another run's outputs.

        ``has_state``: the framework found a checkpoint or backup of an unfinished run here.
        """
        self.create()
        self.check_reuse(resume=resume, overwrite=overwrite, has_state=has_state)

    def create(self) -> list[Path]:
        """Create the folder; one line if it is a file or cannot be written to. Returns the
        folders it made, outermost first (for :func:`removed_if_unused`)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--output-dir={str(self.path)!r} is a file, not a folder")
        folder = self.path.absolute()
        made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-")
            probe.close()
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(self.path, err) from None
            raise UserError(f"--output-dir={str(self.path)!r} is not writable "
                            f"({err.strerror}): choose a folder you can write to") from None
        return made

    def check_reuse(self, *, resume: bool, overwrite: bool, has_state: bool) -> None:
        """Refuse to reuse a folder that holds a finished run (without ``--overwrite``) or an
        unfinished one (without ``--resume``); read-only."""
        if resume and self.is_finished():
            raise UserError(f"{self.path} holds a finished run: nothing to resume; pass "
                            "--overwrite to run it again")
        if resume or overwrite:
            return
        if self.is_finished():
            raise UserError(f"{self.path} already holds a finished run: choose another "
                            "--output-dir, or pass --overwrite to replace it")
        if has_state:
            raise UserError(f"{self.path} holds an unfinished run: pass --resume to continue it, "
                            "or --overwrite to start afresh")

    def clear_outputs(self, *others: str) -> None:
        """Remove a finished run's outputs before an ``--overwrite`` run starts: ``metrics.json``
        first, so that from here on a killed run never leaves a folder that reads as finished,
        then the shared outputs and ``others`` (the framework's own files and folders)."""
        self.metrics.unlink(missing_ok=True)
        for name in (CURVES_FILE, LAYER_TABLE_FILE, *others):
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def removed_if_unused(made: Sequence[Path]) -> Iterator[None]:
    """A run that fails before writing anything leaves no empty folder behind: on the way out
    with an error, the folders in ``made`` (:meth:`RunDir.create`'s) that are still empty are
    removed, innermost first. ``os.rmdir`` removes empty folders only, so nothing written is lost
    and a folder the user already had is never in ``made``."""
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or gone): keep it and the folders around it
                break
        raise


# ---- metrics.json ----------------------------------------------------------------------------

def history_entry(epoch: int, phase: str, logs: dict[str, float]) -> dict[str, Any]:
    """One epoch of history in the shared schema (``epoch`` counts from 1, as Keras prints it)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    entry: dict[str, Any] = {"epoch": epoch, "phase": phase}
    for key in HISTORY_KEYS[2:]:
        entry[key] = float(logs[key])
    return entry


def metrics_document(*, framework: str, versions: dict[str, str], settings: dict[str, Any],
                     data: dict[str, Any], weights: dict[str, Any],
                     counts: dict[str, dict[str, int]], history: list[dict[str, Any]],
                     test: dict[str, float] | None, timings: dict[str, float],
                     status: str) -> dict[str, Any]:
    """``metrics.json``: one schema for both frameworks, so two runs compare key by key."""
    return {
        "schema_version": SCHEMA_VERSION,
        "framework": framework,
        "status": status,
        "versions": {"python": platform.python_version(), **versions},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count()},
        "settings": settings,
        "data": data,
        "weights": weights,
        "counts": counts,
        "history": history,
        "test": test,
        "timings": timings,
    }


def finish_run(run_dir: RunDir, *, framework: str, table: Iterable[Sequence[Any]],
               curves_title: str, **document: Any) -> dict[str, Any]:
    """The end of a run, the same in both trainers: ``layer_table.csv``, ``learning_curves.png``,
    then ``metrics.json`` (``document``: :func:`metrics_document`'s arguments but ``status``),
    written last, since a complete ``metrics.json`` marks a finished run. Returns the document."""
    write_layer_table(run_dir.layer_table, table)
    plot_learning_curves(run_dir.curves, {framework: document["history"]}, title=curves_title)
    doc = metrics_document(framework=framework, status="complete", **document)
    write_json(run_dir.metrics, doc)
    return doc


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a run's ``metrics.json`` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path} has schema_version {doc.get('schema_version')!r}; "
                        f"expected {SCHEMA_VERSION}")
    return doc


# ---- layer table -----------------------------------------------------------------------------

def format_layer_table(rows: Iterable[Sequence[Any]]) -> str:
    """The recipe's table: index, layer type, name, trainable, one line per base layer."""
    rows = list(rows)
    widths = [max(len(str(r[i])) for r in [LAYER_TABLE_COLUMNS, *rows]) for i in range(4)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(LAYER_TABLE_COLUMNS, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def write_layer_table(path: str | os.PathLike[str], rows: Iterable[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LAYER_TABLE_COLUMNS)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def show_layer_table(rows: Sequence[Sequence[Any]], path: str | os.PathLike[str] | None, *,
                     print_all: bool, echo: Callable[[str], object] = print) -> None:
    """The recipe's table at the start of fine-tuning: written to ``path`` (``layer_table.csv``)
    and summed up in one line on the console; ``print_all`` (``--print-layers``) prints it all."""
    if path is not None:
        write_layer_table(path, rows)
    if print_all:
        echo(format_layer_table(rows))
    trainable = [r for r in rows if str(r[3]) == "True"]
    where = (f"from index {trainable[0][0]} ({trainable[0][2]})" if trainable
             else "none of them")
    full = f"in {path}" if path is not None else "not written"
    echo(f"base layers: {len(rows)}, {len(rows) - len(trainable)} frozen, {len(trainable)} "
         f"trainable {where}; the full table {full}"
         + ("" if print_all else " (--print-layers prints it here)"))


def read_layer_table(path: str | os.PathLike[str]) -> list[tuple[int, str, str, bool]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [(int(r["index"]), r["type"], r["name"], r["trainable"] == "True") for r in reader]


def format_counts(phase: str, trainable: int, non_trainable: int) -> str:
    return (f"[{phase}] trainable params: {trainable:,}  non-trainable params: "
            f"{non_trainable:,}  total: {trainable + non_trainable:,}")


# ---- learning curves -------------------------------------------------------------------------

def plot_learning_curves(path: str | os.PathLike[str], runs: dict[str, list[dict[str, Any]]],
                         title: str) -> None:
    """Accuracy and loss per epoch, training and validation, a marker where fine-tuning starts.

    ``runs`` maps a label to a history (one run, or several overlaid for a comparison).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fine_tune_starts = set()
    for i, (label, history) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        epochs = [h["epoch"] for h in history]
        prefix = f"{label}: " if len(runs) > 1 else ""
        for ax, key in zip(axes, ("accuracy", "loss"), strict=True):
            ax.plot(epochs, [h[key] for h in history], "-o", ms=3, color=color,
                    label=f"{prefix}training {key}")
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "--s", ms=3, color=color,
                    label=f"{prefix}validation {key}")
        starts = [h["epoch"] for h in history if h["phase"] == "fine_tuning"]
        if starts:
            fine_tune_starts.add(min(starts) - 0.5)
    for ax, key in zip(axes, ("accuracy", "loss"), strict=True):
        for x in sorted(fine_tune_starts):
            ax.axvline(x, color="grey", linestyle=":")
            ax.annotate("start fine-tuning", (x, 0.5), xycoords=("data", "axes fraction"),
                        rotation=90, va="center", ha="right", color="grey")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if key == "accuracy" else "upper right", fontsize=8)
    axes[0].set_title(title)
    axes[1].set_xlabel("epoch")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
