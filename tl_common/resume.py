"""The settings an unfinished run was started with, kept beside its resumable state, so that
``--resume`` never mixes two runs: a change that would make the resumed run differ from an
uninterrupted one is refused with one line naming it; nothing else is compared.

``run_settings.json`` in ``--output-dir`` is written before the first epoch (once the data has
been read: it records the file lists) and read by ``--resume``, in two steps: the settings as
soon as the folder is locked, the weights file and the file lists once they are read.

Compared (a change breaks bit-exact resume): every setting that enters the numbers
(:data:`COMPARED`); the data folder and a weights file by their real paths (another spelling —
relative, ``~``, through a symlink — is the same file); the sha256 of the weights file, the
class names and the sha256 of each split's file list; for the port also Lightning's
accelerator, devices, strategy and precision. Not compared (safe to change): the spelling of
``--output-dir``, ``--config``, ``--resume``/``--overwrite``, and ``--skip-bad-images`` as long
as the file lists stay the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tl_common.bases import DEFAULT_BASE
from tl_common.errors import UserError
from tl_common.outputs import write_json
from tl_common.settings import Settings, flag
from tl_common.weights import is_named_source

RECORD_FILE = "run_settings.json"

#: The settings that decide the numbers of a run (Settings fields).
COMPARED = ("image_size", "batch_size", "initial_epochs", "fine_tune_epochs", "fine_tune_at",
            "learning_rate", "fine_tune_learning_rate", "dropout", "test_fraction", "seed",
            "limit_batches", "weights")


def data_source(settings: Settings) -> str:
    """Where the images come from, one spelling per folder: ``demo`` (``demo-hard`` for the hard
    set), ``cats_and_dogs_filtered`` (the recipe's, found or downloaded), or the real path of
    ``--data-dir``."""
    if settings.demo:
        return "demo" if settings.demo_set == "easy" else f"demo-{settings.demo_set}"
    if settings.data_dir is None:
        return "cats_and_dogs_filtered"
    return os.path.realpath(os.path.expanduser(settings.data_dir))


def recorded_settings(settings: Settings, **framework: object) -> dict[str, Any]:
    """The settings part of the record: effective values (the defaults applied), keyed by flag."""
    values: dict[str, Any] = {name: getattr(settings, name) for name in COMPARED}
    source = settings.weights_source
    values["weights"] = source if is_named_source(source) else os.path.realpath(source)
    values["fine_tune_learning_rate"] = settings.fine_tuning_lr
    values["data_dir"] = data_source(settings)
    if settings.base != DEFAULT_BASE:
        # Recorded only when it is not the recipe's: records written before --base existed
        # (all MobileNetV2) still resume.
        values["base"] = settings.base
    values.update(framework)
    return values


def recorded_inputs(weights: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The inputs part: what the weights file and the file lists were
    (:func:`tl_common.weights.weights_record`, :meth:`tl_common.files.DataSplits.summary`)."""
    inputs: dict[str, Any] = {"weights file": weights.get("sha256"),
                              "class names": list(data["class_names"])}
    for split, files in data["files"].items():
        inputs[f"{split} file list"] = files["sha256"]
    return inputs


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}…"
    return repr(value) if isinstance(value, str) else str(value)


class ResumeRecord:
    """``run_settings.json`` of one output folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / RECORD_FILE

    def read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.path} ({err}): use --overwrite to start over"
                            ) from None
        if not isinstance(record, dict):
            raise UserError(f"{self.path} is not a settings record: use --overwrite to start over")
        return record

    def write(self, settings: dict[str, Any], inputs: dict[str, Any]) -> None:
        write_json(self.path, {"settings": settings, "inputs": inputs})

    def check(self, part: str, current: dict[str, Any]) -> bool:
        """Refuse with one line if ``current`` differs from the recorded ``part`` (``settings``
        or ``inputs``); False when there is no record (a run from before records were kept)."""
        record = self.read()
        if record is None:
            return False
        recorded = record.get(part, {})
        changes = []
        for key in sorted(set(recorded) | set(current)):
            old, new = recorded.get(key), current.get(key)
            if old != new:
                name = flag(key) if part == "settings" else f"the {key}"
                changes.append(f"{name} changed ({_show(old)} -> {_show(new)})")
        if changes:
            raise UserError(f"cannot resume {self.path.parent}: {', '.join(changes)}; run with "
                            "the recorded settings (in " + RECORD_FILE + "), or use --overwrite "
                            "to start over")
        return True
