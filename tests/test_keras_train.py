"""Tests of ``python -m tl_keras.train``: outputs, one-line errors, refusing a finished run, resume.

Runs ``tl_keras.train.main`` in-process on a few generated JPEGs, 32×32 pixels, random weights,
one batch per epoch. Run: ``python -m pytest tests/test_keras_train.py -q``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import tl_keras.train as train
from tl_common.errors import UserError, run_main
from tl_common.outputs import METRICS_FILE, read_layer_table, read_metrics

#: Images per class: 4 to train on; 5 in validation, of which round(5 * 0.2) = 1 goes to test.
PER_CLASS = {"train": 4, "validation": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in PER_CLASS.items():
        for name in ("cats", "dogs"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not square: resized
                Image.fromarray(pixels).save(root / split / name / f"{name[:-1]}.{i}.jpg")
    return root


def args(data_dir: Path, out: Path, *extra: str, epochs: tuple[int, int] = (1, 1)) -> list[str]:
    return ["--data-dir", str(data_dir), "--weights", "none", "--image-size", "32",
            "--batch-size", "4", "--limit-batches", "1", "--initial-epochs", str(epochs[0]),
            "--fine-tune-epochs", str(epochs[1]), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module", autouse=True)
def eager():
    """Train eagerly: tracing MobileNetV2's train step costs seconds per phase, and nothing these
    tests check (epochs, files, resume) depends on it. The traced path runs in the demo."""
    compile_for = train.compile_for

    def compile_eagerly(model: keras.Model, phase: str, learning_rate: float) -> None:
        compile_for(model, phase, learning_rate)
        model.run_eagerly = True

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "compile_for", compile_eagerly)
        yield


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A 1 + 1 epoch run with --overwrite over a finished run that left a stale backup behind."""
    out = tmp_path_factory.mktemp("run")
    (out / METRICS_FILE).write_text('{"status": "complete"}')
    # Kept, Keras would restore it and skip epoch 1.
    (out / "backup" / "feature_extraction").mkdir(parents=True)
    (out / "backup" / "feature_extraction" / "training_metadata.json").write_text('{"epoch": 1}')
    return out, train.main(args(data_dir, out, "--overwrite"))


def test_metrics_json(finished_run):
    out, returned = finished_run
    doc = read_metrics(out)
    assert doc == json.loads(json.dumps(returned))
    assert set(doc) == {"schema_version", "framework", "status", "versions", "machine", "settings",
                        "data", "weights", "counts", "history", "test", "timings"}
    assert doc["framework"] == "keras" and doc["status"] == "complete"
    assert set(doc["versions"]) == {"python", "tensorflow", "keras"}
    # Parameter counts do not depend on the input size: the recipe's numbers at 32 pixels too.
    assert doc["counts"] == {"feature_extraction": {"trainable": 1_281, "non_trainable": 2_257_984},
                             "fine_tuning": {"trainable": 1_862_721, "non_trainable": 396_544}}
    # Both epochs: --overwrite removed the stale backup.
    assert [(h["epoch"], h["phase"]) for h in doc["history"]] == [
        (1, "feature_extraction"), (2, "fine_tuning")]
    assert all(0 <= h["accuracy"] <= 1 and h["loss"] > 0 for h in doc["history"])
    assert doc["data"]["files"]["test"]["count"] == 2
    assert doc["weights"] == {"source": "none", "path": None, "sha256": None}
    assert set(doc["test"]) == {"loss", "accuracy"}
    assert set(doc["timings"]) == {"feature_extraction_s", "fine_tuning_s", "test_s", "total_s"}


def test_other_outputs(finished_run):
    out, _ = finished_run
    table = read_layer_table(out / "layer_table.csv")
    assert len(table) == 154
    assert table[100] == (100, "ReLU", "block_11_expand_relu", True)
    assert table[99][3] is False
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(out / "model.keras") as zf:
        assert "config.json" in zf.namelist()
    # Nothing of the resume state is left behind by a finished run.
    assert sorted(p.name for p in out.iterdir()) == [
        "layer_table.csv", "learning_curves.png", METRICS_FILE, "model.keras"]


def test_finished_run_is_not_overwritten(finished_run, data_dir):
    out, _ = finished_run
    with pytest.raises(UserError, match="already holds a finished run.*--overwrite"):
        train.main(args(data_dir, out))
    with pytest.raises(UserError, match="nothing to resume"):
        train.main(args(data_dir, out, "--resume"))


@pytest.mark.parametrize(("argv", "expected"), [
    (["--fine-tune-at", "200"], "--fine-tune-at=200"),
    (["--image-size", "16"], "--image-size=16"),
    (["--epochs", "3"], "--epochs"),
    (["--weights", "missing.h5"], "missing.h5"),
])
def test_bad_arguments_are_one_line(data_dir, tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, args(data_dir, tmp_path / "out") + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err


class Crash(Exception):
    """A simulated kill of the process."""


def crash_after_epoch(monkeypatch, epoch: int) -> None:
    """Raise once Keras has backed up ``epoch`` (counted from 1)."""
    backup_epoch_end = train.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, index, logs=None):
        backup_epoch_end(self, index, logs)
        if index + 1 == epoch:
            raise Crash(f"after epoch {epoch}")

    monkeypatch.setattr(train.BackupAndRestore, "on_epoch_end", on_epoch_end)


def crash_while_backing_up(monkeypatch, out: Path, epoch: int) -> None:
    """Die half-way through writing the backup of ``epoch``: a truncated HDF5 file is left."""
    save_weights = keras.Model.save_weights

    def cut_short(self, filepath, *args, **kwargs):
        history = json.loads((out / "history.json").read_text())
        if "backup" in str(filepath) and history[-1]["epoch"] == epoch:
            Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n cut short")
            raise Crash(f"while backing up epoch {epoch}")
        return save_weights(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", cut_short)


def test_resume_after_crashes_in_both_phases(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = args(data_dir, out, epochs=(2, 2))
    # A --resume with nothing to resume starts from the beginning; it dies after epoch 1 of 4.
    with monkeypatch.context() as m:
        crash_after_epoch(m, 1)
        with pytest.raises(Crash):
            train.main([*argv, "--resume"])
    assert "nothing to resume" in capsys.readouterr().out
    assert (out / "backup" / "feature_extraction").is_dir()
    with pytest.raises(UserError, match="unfinished run.*--resume"):
        train.main(argv)
    # Resumed in feature extraction; dies while backing up epoch 4, in fine-tuning.
    with monkeypatch.context() as m:
        crash_while_backing_up(m, out, 4)
        with pytest.raises(Crash):
            train.main([*argv, "--resume"])
    assert (out / "phase_a.json").exists() and (out / "backup" / "fine_tuning").is_dir()
    assert not (out / "backup" / "feature_extraction").exists()  # superseded by phase_a.*
    # Resumed in fine-tuning from the backup of epoch 3: feature extraction is skipped, and
    # epoch 4 is redone.
    doc = train.main([*argv, "--resume"])
    assert "feature extraction is finished" in capsys.readouterr().out
    assert [(h["epoch"], h["phase"]) for h in doc["history"]] == [
        (1, "feature_extraction"), (2, "feature_extraction"), (3, "fine_tuning"),
        (4, "fine_tuning")]
    assert not (out / "backup").exists() and not (out / "phase_a.json").exists()
