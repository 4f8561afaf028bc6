"""Tests of ``python -m tl_keras.train``: outputs, one-line errors, refusing a finished run, resume
equal to an uninterrupted run (after a simulated crash in-process, and after ``kill -9``).

Runs ``tl_keras.train.main`` in-process (eagerly) on a few generated JPEGs, 32×32 pixels, random
weights, one batch per epoch; the resume tests use the demo weights (a random base's features are
~1e-12: the head would learn nothing, and the comparisons would pass trivially) and whole epochs
of 3 batches. The runs killed with SIGKILL are subprocesses, in graph mode as users run them, of
:data:`HOOKED_TRAIN`: ``python -m tl_keras.train`` with a test hook that is inert unless set.
Run: ``TL_PARITY_CACHE=/tmp/tlcache python -m pytest tests/test_keras_train.py -q``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

import tl_keras.train as train
from tl_common.errors import UserError, run_main
from tl_common.files import load_splits
from tl_common.outputs import METRICS_FILE, read_layer_table, read_metrics
from tl_keras.data import TrainingData, epoch_order
from tl_keras.model import build_base, build_model, compile_for, set_phase

REPO = Path(__file__).resolve().parents[1]

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
def _keras_trains_eagerly(keras_eager):
    """Every in-process Keras run here trains eagerly (the ``keras_eager`` fixture)."""


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A 1 + 1 epoch run with --overwrite over a finished run that left a stale backup behind."""
    out = tmp_path_factory.mktemp("run")
    (out / METRICS_FILE).write_text('{"status": "complete"}')
    # Kept, Keras would restore it and skip epoch 1.
    (out / "backup" / "feature_extraction").mkdir(parents=True)
    (out / "backup" / "feature_extraction" / "training_metadata.json").write_text('{"epoch": 1}')
    return out, train.main(args(data_dir, out, "--overwrite"))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- resume equals an uninterrupted run ------------------------------------------------------

#: The resume runs: demo weights; 8 training images in batches of 3, so each epoch has 3 steps
#: (3, 3, 2 images), each drawing its own flips, rotations and dropout masks.
RESUME_SEED = 5


def resume_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--weights", "demo", "--image-size", "32",
            "--batch-size", "3", "--initial-epochs", "2", "--fine-tune-epochs", "2",
            "--seed", str(RESUME_SEED), "--output-dir", str(out), *extra]


def saved_arrays(out: Path) -> dict[str, np.ndarray]:
    """Every array in the run's model.keras: the weights, and the optimizer's step count and slots."""
    with zipfile.ZipFile(out / "model.keras") as zf:
        data = zf.read("model.weights.h5")
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(lambda name, obj: arrays.update({name: obj[()]})
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def assert_same_model(out: Path, reference: Path) -> None:
    """The two runs' model.keras hold the same arrays, bitwise."""
    got, expected = saved_arrays(out), saved_arrays(reference)
    assert got.keys() == expected.keys()
    different = [k for k in got if not np.array_equal(got[k], expected[k])]
    assert not different, f"{len(different)} of {len(got)} arrays differ, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted_run(data_dir, demo_weights, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, train.main(resume_args(data_dir, out))


def test_epoch_orders_depend_on_seed_and_epoch_only(data_dir):
    files = load_splits(data_dir, 0.2, RESUME_SEED).train
    assert len(files) == 8
    orders = [epoch_order(8, RESUME_SEED, e) for e in range(4)]
    assert all(sorted(order) == list(range(8)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4  # a new order every epoch
    assert np.array_equal(epoch_order(8, RESUME_SEED, 2), orders[2])
    data = TrainingData(files, 32, 3, RESUME_SEED)
    assert data.steps_per_epoch == 3 and TrainingData(files, 32, 3, RESUME_SEED, 2).steps_per_epoch == 2

    def labels(dataset) -> list[list[int]]:
        return [batch.tolist() for _, batch in dataset.as_numpy_iterator()]

    # Epochs 1..3 in one dataset are the epochs built one by one: batches never straddle two.
    together = labels(data.epochs(range(1, 4)))
    assert [len(batch) for batch in together] == [3, 3, 2] * 3
    assert together == sum((labels(data.one_epoch(e)) for e in range(1, 4)), [])
    expected = np.asarray(files.labels)[orders[2]]
    assert sum(together[3:6], []) == expected.tolist()
    # --limit-batches keeps the first batches of each epoch's order.
    limited = labels(TrainingData(files, 32, 3, RESUME_SEED, 2).epochs(range(2, 3)))
    assert sum(limited, []) == expected[:6].tolist()


def test_only_the_seed_states_are_not_backed_up(demo_weights, tmp_path):
    """Everything a training step changes is in the backup (weights, optimizer) except the
    SeedGenerator states, which EpochSeeds sets from the epoch; nothing else holds randomness."""
    base = build_base("demo", 32)
    model = build_model(base, seed=RESUME_SEED)
    set_phase(base, "feature_extraction")
    compile_for(model, "feature_extraction", 1e-4)
    model.optimizer.build(model.trainable_variables)
    saved = {id(v) for v in model.weights}
    unsaved = [v for v in model.variables if id(v) not in saved]
    assert [v.path for v in unsaved] == [v.path for v in train.seed_states(model)]
    assert [v.numpy().tolist() for v in unsaved] == [
        [RESUME_SEED, 0], [RESUME_SEED + 1, 0], [RESUME_SEED + 2, 0]]  # flip, rotation, dropout
    seeds = train.EpochSeeds()
    seeds.set_model(model)
    seeds.on_epoch_begin(3)
    assert [v.numpy().tolist() for v in unsaved] == [
        [RESUME_SEED + i, 3 * train.SEED_DRAWS_PER_EPOCH] for i in range(3)]
    # The optimizer's state is saved with the weights (Keras' save_weights): its step count and
    # learning rate, and Adam's m and v of the head's kernel and bias.
    path = tmp_path / "backup.weights.h5"
    model.save_weights(path)
    with h5py.File(path, "r") as f:
        assert len(f["optimizer/vars"]) == len(model.optimizer.variables) == 2 + 2 * 2


def test_epoch_seeds_hold_in_the_compiled_train_step():
    """In graph mode too the train step draws from the state EpochSeeds set: each step counts up
    from ``epoch * SEED_DRAWS_PER_EPOCH``. (A small model: tracing MobileNetV2 costs seconds.)"""
    model = keras.Sequential([
        keras.Input((4, 4, 3)),
        keras.layers.RandomFlip("horizontal", seed=11),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5, seed=12),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer="sgd", loss="mse")
    assert not model.run_eagerly
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append([v.numpy().tolist() for v in train.seed_states(self.model)])

    x = np.zeros((6, 4, 4, 3), np.float32)
    model.fit(x, np.zeros((6, 1)), batch_size=2, epochs=2, shuffle=False, verbose=0,
              callbacks=[train.EpochSeeds(), Record()])
    n = train.SEED_DRAWS_PER_EPOCH
    assert seen == [[[11, e * n + b], [12, e * n + b]] for e in range(2) for b in range(3)]
    assert [v.numpy().tolist() for v in train.seed_states(model)] == [[11, n + 3], [12, n + 3]]


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(uninterrupted_run, data_dir, tmp_path, monkeypatch):
    """One run that crashes three times, each resumed with --resume: after epoch 1, in feature
    extraction; at the phase boundary (phase A's last epoch backed up, its record not yet
    written); after epoch 3, in fine-tuning. Resumed the last time, it ends with the
    uninterrupted run's history, test numbers and model.keras, bitwise."""
    reference, reference_doc = uninterrupted_run
    out = tmp_path / "out"
    for i, epoch in enumerate((1, 2, 3)):
        with monkeypatch.context() as m:
            crash_after_epoch(m, epoch)
            with pytest.raises(Crash):
                train.main(resume_args(data_dir, out, *(["--resume"] if i else [])))
        assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == list(
            range(1, epoch + 1))
    doc = train.main(resume_args(data_dir, out, "--resume"))
    assert doc["history"] == reference_doc["history"]  # every float, exactly
    assert doc["test"] == reference_doc["test"]
    assert_same_model(out, reference)


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_full_disk_during_a_backup_then_resume(data_dir, tmp_path, monkeypatch, capsys):
    """The backup of epoch 2 finds the disk full (h5py writes through HDF5's C library: the
    save is made to fail after writing half a file): one line naming the backup; the backup of
    epoch 1 stays whole and loadable. --resume with another learning rate is refused in one
    line; with space back, --resume redoes epoch 2 and finishes. (Bit-exact resume from a
    backup: test_resume_equals_uninterrupted_run, whatever stopped the run.)"""
    out = tmp_path / "out"
    argv = args(data_dir, out, epochs=(2, 1))
    backup = out / "backup" / "feature_extraction" / "latest.weights.h5"
    save_weights = keras.Model.save_weights

    def full_disk_at_epoch_2(self, filepath, *args, **kwargs):
        history = json.loads((out / "history.json").read_text())
        if "backup" in str(filepath) and history[-1]["epoch"] == 2:
            Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save_weights(self, filepath, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(keras.Model, "save_weights", full_disk_at_epoch_2)
        with pytest.raises(SystemExit):
            run_main(train.main, argv)
    assert error_lines(capsys) == [
        f"error: disk full while writing {backup} (No space left on device); the files "
        "already there are unchanged: free some space and run again (with --resume for an "
        "unfinished training run)"]
    assert train.BackupAndRestore(str(backup.parent)).backed_up_epoch() == 1
    assert sorted(p.name for p in backup.parent.iterdir()) == ["latest.weights.h5"]

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):
        run_main(train.main, [*argv, "--resume", "--learning-rate", "0.001"])
    assert error_lines(capsys) == [
        f"error: cannot resume {out}: --fine-tune-learning-rate changed (1e-05 -> 0.0001), "
        "--learning-rate changed (0.0001 -> 0.001); run with the recorded settings (in "
        "run_settings.json), or use --overwrite to start over"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    doc = train.main([*argv, "--resume"])
    assert [(h["epoch"], h["phase"]) for h in doc["history"]] == [
        (1, "feature_extraction"), (2, "feature_extraction"), (3, "fine_tuning")]
    assert doc["history"][0] == json.loads(before[out / "history.json"])[0]   # not trained again


@pytest.mark.slow
def test_data_folder_gone_mid_run_is_one_line_and_resumable(data_dir, tmp_path, monkeypatch,
                                                            capsys):
    """The data folder vanishes once feature extraction is done: fine-tuning stops with one
    line quoting TensorFlow's reason; phase A's result is kept, and --resume with the data back
    finishes the run."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(data_dir, data)
    epoch_end = train.EpochLog.on_epoch_end

    def vanish_after_phase_a(self, epoch, logs=None):
        epoch_end(self, epoch, logs)
        if self.phase == "feature_extraction":
            data.rename(tmp_path / "moved away")

    with monkeypatch.context() as m:
        m.setattr(train.EpochLog, "on_epoch_end", vanish_after_phase_a)
        with pytest.raises(SystemExit):
            run_main(train.main, args(data, out))
    (line,) = error_lines(capsys)
    assert line.startswith("error: the data could not be read during training (")
    assert f"{data}/" in line and "No such file or directory" in line
    assert line.endswith("restore it, then rerun with --resume to continue from the last "
                         "finished epoch")
    assert (out / "phase_a.json").exists()
    (tmp_path / "moved away").rename(data)
    doc = train.main(args(data, out, "--resume"))
    assert [h["phase"] for h in doc["history"]] == ["feature_extraction", "fine_tuning"]


# ---- resume after kill -9, in graph mode -----------------------------------------------------

HOOKED_TRAIN = '''\
"""python -m tl_keras.train with a test hook (tests/test_keras_train.py), inert unless set:
TL_TEST_PAUSE_AT="epoch,batch" (0-based): write the pid to $TL_TEST_MARKER when that training
step is about to start and wait there, for the test to kill -9 the process or to send it a
signal (the wait ends once the trainer has recorded one)."""
import os
import signal
import time
from pathlib import Path

import tl_keras.train as train
from tl_common.errors import run_main

PAUSE_AT = os.environ.get("TL_TEST_PAUSE_AT")


class PausingEpochSeeds(train.EpochSeeds):
    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if PAUSE_AT and f"{self.epoch},{batch}" == PAUSE_AT:
            marker = Path(os.environ["TL_TEST_MARKER"])
            marker.with_suffix(".tmp").write_text(str(os.getpid()))
            os.replace(marker.with_suffix(".tmp"), marker)  # never seen half-written
            stop = getattr(signal.getsignal(signal.SIGINT), "__self__")  # the StopRequests
            deadline = time.monotonic() + 600
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.05)


train.EpochSeeds = PausingEpochSeeds
if __name__ == "__main__":
    # Ctrl-C as a terminal delivers it, also where the tests were started with it ignored (nohup,
    # a background job), which the trainer would keep so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_main(train.main)
'''
#: Where the run is killed (0-based epoch, batch about to start): in epoch 4, fine-tuning,
#: after its first step; the backup holds epoch 3.
KILL_AT = "3,1"
#: How long a subprocess may take to reach its pause point or to finish (2 loaded CPU cores).
SUBPROCESS_TIMEOUT_S = 300
#: How long a run may take to stop after SIGINT: the step under way, then the way out of fit
#: (measured about 1 s here; the bound leaves room for 2 loaded cores).
STOP_WITHIN_S = 10


def start_run(script: Path, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """The run's stdout goes to ``log``, its stderr to ``log`` with the suffix ``.err``."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), **env)
    if "TL_TEST_PAUSE_AT" not in env:
        environment.pop("TL_TEST_PAUSE_AT", None)
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, env=environment,
                                stdout=out, stderr=err)


def interrupt_when_paused(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    """Wait for the run's pause point and send it SIGINT (Ctrl-C): it must exit 130 within
    :data:`STOP_WITHIN_S`, with one ``error:`` line, the last on its stderr, and no traceback."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended (rc {proc.returncode}) or timed out before its pause point:\n"
                        + log.with_suffix(".err").read_text()[-3000:])
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    seconds = time.monotonic() - sent
    err = log.with_suffix(".err").read_text()
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        err.splitlines()[-1]] == [f"error: stopped by SIGINT: {train.INTERRUPTED}"]
    assert seconds < STOP_WITHIN_S


def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"run timed out:\n{log.with_suffix('.err').read_text()[-3000:]}")
    assert rc == 0, log.with_suffix(".err").read_text()[-3000:]


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.update({name: obj[()]})
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def resume_state(out: Path) -> dict[str, object]:
    """What --resume reads in a stopped run's folder: the backup (arrays and epoch), the history,
    phase A's weights and history (its record's time taken is not compared)."""
    backup = out / "backup" / "fine_tuning"
    return {"epoch": train.BackupAndRestore(str(backup)).backed_up_epoch(),
            "backup": h5_arrays(backup / "latest.weights.h5"),
            "phase_a_weights": h5_arrays(out / "phase_a.weights.h5"),
            "history": json.loads((out / "history.json").read_text()),
            "phase_a_history": json.loads((out / "phase_a.json").read_text())["history"]}


def assert_same_state(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and key in ("backup", "phase_a_weights"):
            assert a[key].keys() == b[key].keys()
            assert all(np.array_equal(a[key][k], b[key][k]) for k in a[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.long
@pytest.mark.slow
def test_resume_after_ctrl_c_and_kill_equals_uninterrupted_run(data_dir, demo_weights, tmp_path,
                                                               kill_when_paused):
    """A graph-mode run gets SIGINT (Ctrl-C) in epoch 4, fine-tuning, after its first step: it
    stops after the step under way, with one line, leaving phase A's result and the backup of
    epoch 3. Resumed with --resume, it is killed with SIGKILL at the same step, which leaves the
    same state, bitwise. Resumed again, it ends with the uninterrupted run's history, test
    numbers and model.keras, bitwise. Its first three epochs, in another process than the
    uninterrupted run's, are that run's too: graph mode (oneDNN on) is deterministic across
    processes."""
    script = tmp_path / "hooked_train.py"
    script.write_text(HOOKED_TRAIN)
    runs = {name: tmp_path / name for name in ("stopped", "uninterrupted")}
    out = runs["stopped"]

    def paused_run(name: str, *extra: str) -> subprocess.Popen:
        return start_run(script, resume_args(data_dir, out, *extra), tmp_path / f"{name}.log",
                         TL_TEST_PAUSE_AT=KILL_AT, TL_TEST_MARKER=str(tmp_path / f"{name}.marker"))

    procs = {"interrupted": paused_run("interrupted"),
             "uninterrupted": start_run(script, resume_args(data_dir, runs["uninterrupted"]),
                                        tmp_path / "uninterrupted.log")}
    try:
        interrupt_when_paused(procs["interrupted"], tmp_path / "interrupted.marker",
                              tmp_path / "interrupted.log")
        # What the stop left: phase A's record, the backup of epoch 3, no finished run.
        assert not (out / METRICS_FILE).exists()
        state = resume_state(out)
        assert state["epoch"] == 3
        procs["killed"] = paused_run("killed", "--resume")
        kill_when_paused(procs["killed"], tmp_path / "killed.marker", tmp_path / "killed.log",
                         SUBPROCESS_TIMEOUT_S)
        assert "feature extraction is finished" in (tmp_path / "killed.log").read_text()
        assert_same_state(resume_state(out), state)
        procs["resumed"] = start_run(script, resume_args(data_dir, out, "--resume"),
                                     tmp_path / "resumed.log")
        for name in ("uninterrupted", "resumed"):
            finish(procs[name], tmp_path / f"{name}.log")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reference = read_metrics(runs["uninterrupted"])
    assert state["history"] == reference["history"][:3]  # determinism: every float, exactly
    doc = read_metrics(out)
    assert doc["history"] == reference["history"] and doc["test"] == reference["test"]
    assert_same_model(out, runs["uninterrupted"])
