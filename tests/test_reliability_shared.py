"""What users do to a run beyond bad files and bad arguments: Ctrl-C and SIGTERM, two runs in one
output folder, a full disk, odd paths, resuming with other settings, files from elsewhere.

Mostly framework-free pieces (tl_common.lock, .interrupts, .resume, .outputs, .demo) and both
trainers' command lines up to the point where they refuse; the whole-trainer cases (a SIGINT in
fine-tuning then --resume, a full disk during a checkpoint write, data that changes mid-run) are
in tests/test_torch_train.py and tests/test_keras_train.py, beside the kill -9 cases they mirror,
and the odd-path runs of both trainers in tests/test_reliability_cli.py.
Run: ``python -m pytest tests/test_reliability_shared.py -q``.
"""

from __future__ import annotations

import builtins
import dataclasses
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import lightning
import numpy as np
import pytest
import torch
from PIL import Image

import tl_common.demo as demo
import tl_keras.train as keras_train
import tl_torch.convert as convert
import tl_torch.keras_weights as keras_weights
import tl_torch.predict as predict
import tl_torch.train as torch_train
from tl_common.data import check_output_dir_placement
from tl_common.errors import USER_ERROR_EXIT, Interrupted, UserError, run_main
from tl_common.files import FileList, ImageFile
from tl_common.interrupts import StopRequests
from tl_common.lock import LOCK_FILE, OutputLock
from tl_common.outputs import METRICS_FILE, write_json
from tl_common.resume import RECORD_FILE, ResumeRecord, recorded_inputs, recorded_settings
from tl_common.settings import Settings, build_parser, parse, settings_from
from tl_torch.data import ImageFiles, ImageReadError
from tl_torch.model import MobileNetV2Base

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"keras": keras_train.main, "torch": torch_train.main}
#: A second run on a locked folder must stop within this (the issue's bound).
LOCKED_STOP_S = 10


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def one_error_line(main, args: list[str], capsys, status: int = USER_ERROR_EXIT) -> str:
    """Run a command line in-process; it must exit ``status`` with one ``error:`` line on stderr
    and no traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, args)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---- two runs, one output folder ---------------------------------------------------------------

HOLD_LOCK = """\
import sys, time
from tl_common.lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def locked_dir(tmp_path):
    """An output folder locked by another live process (the lock alone, no torch or Keras)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_second_run_on_a_locked_output_dir_stops_at_once(framework, locked_dir, tmp_path, capsys):
    out, holder = locked_dir
    lock_before = (out / LOCK_FILE).read_bytes()
    args = ["--data-dir", str(tmp_path / "data"), "--weights", "none", "--output-dir", str(out)]
    started = time.monotonic()
    line = one_error_line(FRAMEWORKS[framework], args, capsys)
    elapsed = time.monotonic() - started
    assert re.fullmatch(
        rf"error: {re.escape(str(out))} is in use by another run \(pid {holder.pid} on host "
        rf"{re.escape(socket.gethostname())}, since [-0-9: ]+; lock file "
        rf"{re.escape(str(out / LOCK_FILE))}\): wait for it to end, or choose another "
        r"--output-dir", line), line
    assert elapsed < LOCKED_STOP_S
    # Nothing touched: the owner's lock is as it was, and nothing else was written.
    assert (out / LOCK_FILE).read_bytes() == lock_before
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


def test_lock_left_by_a_killed_run_is_taken_over_with_a_warning(locked_dir, capsys):
    out, holder = locked_dir
    holder.kill()
    holder.wait()
    assert (out / LOCK_FILE).exists()   # a kill -9 leaves the file, but not the lock
    capsys.readouterr()
    with OutputLock(out):
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"warning: taking over {out / LOCK_FILE}: "
                                                   f"its owner (pid {holder.pid} on host ")
        assert err[0].endswith("ended without releasing it")
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    assert not (out / LOCK_FILE).exists()


def test_lock_is_released_on_errors_and_taken_again(tmp_path):
    with pytest.raises(RuntimeError), OutputLock(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()
        raise RuntimeError("a failing run")
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputLock(tmp_path), pytest.raises(UserError, match="is in use by another run"):
        OutputLock(tmp_path).acquire()   # a second lock on the same file, same process


# ---- Ctrl-C and SIGTERM ------------------------------------------------------------------------

@pytest.fixture
def ctrl_c_live():
    """Ctrl-C handled as Python handles it in a terminal, for one test, also where pytest was
    started with it ignored (nohup, a background job): StopRequests keeps an ignored Ctrl-C
    ignored, as it should, and these tests would then see no handler of theirs."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_in_training_waits_for_the_safe_point(signum, status, ctrl_c_live):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequests("state kept") as stop:
        reached_safe_point = False
        with pytest.raises(Interrupted) as info:
            with stop.deferred():
                os.kill(os.getpid(), signum)
                time.sleep(0.01)   # the handler has run: it recorded the signal, raised nothing
                assert stop.signum == signum
                reached_safe_point = True
        assert reached_safe_point
        assert (info.value.exit_status, str(info.value)) == (
            status, f"stopped by {signal.Signals(signum).name}: state kept")
    assert {s: signal.getsignal(s) for s in before} == before   # handlers restored


def test_ctrl_c_ignored_at_start_stays_ignored():
    """A run started with SIGINT ignored (nohup, a background job of a script) keeps it so."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests("state kept"):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_outside_training_raises_at_once():
    with StopRequests("state kept"), pytest.raises(Interrupted) as info:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert info.value.signum == signal.SIGTERM


def test_a_forked_data_loader_worker_keeps_pythons_own_ctrl_c(ctrl_c_live):
    """Ctrl-C in a terminal reaches DataLoader workers too; forked, they inherit the handler,
    which then raises KeyboardInterrupt there, as torch's workers expect (they exit quietly)."""
    with StopRequests("state kept") as stop:
        pid = os.fork()
        if pid == 0:   # the child: nothing but this, then out
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
                os._exit(3)
            except KeyboardInterrupt:
                os._exit(7)
            except BaseException:
                os._exit(9)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
        assert stop.signum is None   # the training process was not asked to stop


@pytest.mark.parametrize(("error", "status", "line"), [
    (Interrupted(signal.SIGINT, "kept"), 130, "error: stopped by SIGINT: kept"),
    (Interrupted(signal.SIGTERM, "kept"), 143, "error: stopped by SIGTERM: kept"),
    (KeyboardInterrupt(), 130, "error: interrupted (SIGINT); rerun with --resume to continue a "
                               "training run from its last finished epoch"),
])
def test_run_main_turns_signals_into_one_line_and_the_shells_status(error, status, line, capsys):
    def main(argv):
        raise error

    assert one_error_line(main, [], capsys, status) == line


SECOND_CTRL_C = """\
import signal
import time
from tl_common.interrupts import StopRequests
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal (see ctrl_c_live)
with StopRequests("kept", on_abort=lambda: print("released", flush=True)) as stop:
    with stop.deferred():
        print("training", flush=True)
        while True:
            time.sleep(0.05)
"""


def test_second_ctrl_c_stops_at_once():
    proc = subprocess.Popen([sys.executable, "-c", SECOND_CTRL_C], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "training"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)   # recorded; the loop goes on (no safe point in it)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert err.splitlines() == ["error: stopped at once by a second SIGINT: kept"]
    assert out.split() == ["released"]


# ---- full disks --------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_full_disk_while_writing_metrics_json_keeps_the_previous_one(code, tmp_path, monkeypatch,
                                                                     fill_disk):
    path = tmp_path / METRICS_FILE
    write_json(path, {"status": "complete", "n": 1})
    before = path.read_bytes()
    failed = fill_disk(monkeypatch, METRICS_FILE, code)
    with pytest.raises(UserError) as info:
        write_json(path, {"status": "complete", "n": 2, "padding": "x" * 10_000})
    monkeypatch.undo()
    assert failed   # the write did fail half-way
    assert str(info.value) == (
        f"disk full while writing {path} ({os.strerror(code)}); the files already there are "
        "unchanged: free some space and run again (with --resume for an unfinished training run)")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [METRICS_FILE]


def test_full_disk_from_any_writer_is_one_line(capsys):
    """Writers that are not ours (Lightning's CSV log) fail with a bare OSError: one line too."""
    def main(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/logs/metrics.csv")

    line = one_error_line(main, [], capsys)
    assert line.startswith("error: disk full while writing /runs/x/logs/metrics.csv (No space ")


def test_full_disk_while_generating_the_demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_PARITY_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "DEMO_IMAGES_PER_CLASS", {"train": 2, "validation": 1})
    save = Image.Image.save
    saved = []

    def save_until_full(self, fp, *args, **kwargs):
        if len(saved) == 3:   # the fourth image finds the disk full, half-way
            Path(fp).write_bytes(b"\xff\xd8\xff half a JPEG")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(fp)
        return save(self, fp, *args, **kwargs)

    root = demo.demo_data_path()
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", save_until_full)
        with pytest.raises(UserError, match=rf"^disk full while writing {re.escape(str(root))} "
                                            r"\(No space left on device\)"):
            demo.demo_data_root()
    assert list(tmp_path.iterdir()) == []   # no half set, nothing that looks finished
    assert demo.demo_data_root() == root    # space back: generated whole
    assert (root / ".complete").exists() and len(list(root.rglob("*.jpg"))) == 6


def test_demo_cache_generated_once_when_asked_for_at_once(tmp_path, monkeypatch):
    """Two callers at once on an empty cache (two trainers started together, or two test
    workers): one generates, the other waits and takes the finished folder; neither removes
    the other's."""
    monkeypatch.setenv("TL_PARITY_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "DEMO_IMAGES_PER_CLASS", {"train": 2, "validation": 1})
    generate = demo.generate_demo_data
    calls = []

    def slow_generate(root, demo_set="easy"):
        calls.append(root)
        time.sleep(0.5)   # long enough for the other caller to arrive meanwhile
        generate(root, demo_set)

    monkeypatch.setattr(demo, "generate_demo_data", slow_generate)
    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: demo.demo_data_root(), range(2)))
    assert roots == [demo.demo_data_path()] * 2
    assert len(calls) == 1
    assert (roots[0] / ".complete").exists() and len(list(roots[0].rglob("*.jpg"))) == 6
    assert [p.name for p in tmp_path.iterdir()] == [roots[0].name]   # no lock or temporary left


def test_full_disk_while_exporting_the_base_keeps_the_previous_file(tmp_path, monkeypatch):
    """base.weights.h5 is written by h5py (HDF5's C library): its file cannot be had."""
    path = tmp_path / "base.weights.h5"
    path.write_bytes(b"the previous export")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(keras_weights.h5py, "File", no_space)
    with pytest.raises(UserError, match=rf"^disk full while writing {re.escape(str(path))} "):
        keras_weights.save_keras_weights(MobileNetV2Base(), path)
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ---- resume with other settings ----------------------------------------------------------------

def test_resume_refuses_changes_that_break_bit_exact_resume(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    settings = Settings(data_dir=str(data), output_dir=str(tmp_path / "out"))
    record = ResumeRecord(tmp_path)
    record.write(recorded_settings(settings, precision="32-true"), {"train file list": "a" * 64})
    assert record.path == tmp_path / RECORD_FILE

    def refused(changed: Settings, **framework) -> str:
        with pytest.raises(UserError) as info:
            record.check("settings", recorded_settings(changed, **framework))
        return str(info.value)

    assert refused(dataclasses.replace(settings, learning_rate=1e-3), precision="32-true") == (
        f"cannot resume {tmp_path}: --fine-tune-learning-rate changed (1e-05 -> 0.0001), "
        "--learning-rate changed (0.0001 -> 0.001); run with the recorded settings (in "
        "run_settings.json), or use --overwrite to start over")
    line = refused(dataclasses.replace(settings, batch_size=8, seed=1, image_size=96,
                                       initial_epochs=3, fine_tune_at=90, weights="demo"),
                   precision="bf16-mixed")
    for part in ("--batch-size changed (32 -> 8)", "--seed changed (42 -> 1)",
                 "--image-size changed (160 -> 96)", "--initial-epochs changed (10 -> 3)",
                 "--fine-tune-at changed (100 -> 90)", "--weights changed ('imagenet' -> 'demo')",
                 "--precision changed ('32-true' -> 'bf16-mixed')"):
        assert part in line
    other = tmp_path / "other"
    other.mkdir()
    assert f"--data-dir changed ({str(data)!r} -> {str(other)!r})" in refused(
        dataclasses.replace(settings, data_dir=str(other)), precision="32-true")
    with pytest.raises(UserError, match=r"the train file list changed \(sha256 aaaaaaaaaaaa… -> "
                                        r"sha256 bbbbbbbbbbbb…\)"):
        record.check("inputs", {"train file list": "b" * 64})


def test_resume_accepts_what_does_not_change_the_numbers(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    settings = Settings(data_dir=str(data), output_dir=str(tmp_path / "out"))
    record = ResumeRecord(tmp_path)
    record.write(recorded_settings(settings), {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for same in (dataclasses.replace(settings, data_dir="data"),            # relative
                 dataclasses.replace(settings, data_dir="~/data"),          # under ~
                 dataclasses.replace(settings, data_dir=str(tmp_path / "link")),   # a symlink
                 dataclasses.replace(settings, output_dir="out", skip_bad_images=True,
                                     fine_tune_learning_rate=1e-5)):        # the default, spelled
        assert record.check("settings", recorded_settings(same)) is True
    assert ResumeRecord(tmp_path / "elsewhere").check("settings", {}) is False   # no record


def test_recorded_inputs_are_the_weights_and_the_file_lists():
    data = {"class_names": ["cats", "dogs"],
            "files": {split: {"sha256": split[0] * 64} for split in ("train", "validation", "test")}}
    assert recorded_inputs({"sha256": "w" * 64}, data) == {
        "weights file": "w" * 64, "class names": ["cats", "dogs"], "train file list": "t" * 64,
        "validation file list": "v" * 64, "test file list": "t" * 64}


# ---- an output folder inside the data folder ---------------------------------------------------

@pytest.mark.parametrize(("inside", "refused"), [
    ("train/out", True), ("validation/cats/out", True), ("train", True),
    ("link-to-train/out", True),   # through a symlink: the real path counts
    ("runs/out", False), (".", False),
])
def test_output_dir_inside_the_data(inside, refused, tmp_path):
    data = tmp_path / "data"
    (data / "train" / "cats").mkdir(parents=True)
    (data / "validation" / "cats").mkdir(parents=True)
    (data / "link-to-train").symlink_to(data / "train")
    settings = Settings(data_dir=str(data), output_dir=str(data / inside))
    if not refused:
        check_output_dir_placement(settings)
        return
    with pytest.raises(UserError) as info:
        check_output_dir_placement(settings)
    assert str(info.value).startswith(f"--output-dir={str(data / inside)!r} is inside {data}/")
    assert str(info.value).endswith(f"choose a folder outside {data / 'train'} and "
                                    f"{data / 'validation'} (e.g. {data / 'runs'})")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_output_dir_in_the_training_images_is_refused_before_anything_is_created(
        framework, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "train" / "cats").mkdir(parents=True)
    out = data / "train" / "run"
    line = one_error_line(FRAMEWORKS[framework], ["--data-dir", str(data), "--weights", "none",
                                                  "--output-dir", str(out)], capsys)
    assert "is inside" in line and not out.exists()


# ---- paths: ~, relative, spaces, non-ASCII, config files ---------------------------------------

@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_odd_paths_in_flags_and_config_files_are_read_as_given(framework, tmp_path, monkeypatch):
    home = tmp_path / "hôme dir"
    (home / "données à voir").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    config = home / "mön config.yaml"
    config.write_text("data_dir: ~/données à voir\noutput_dir: 'runs/ñ out'\n"
                      "weights: ./wéights/w.h5\n", encoding="utf-8")
    parser = build_parser(framework, "test")
    for args in (["--config", str(config)],
                 ["--config", "mön config.yaml"],   # relative, non-ASCII, a space
                 ["--data-dir", "~/données à voir", "--output-dir", "runs/ñ out",
                  "--weights", "./wéights/w.h5"]):
        settings = settings_from(parse(parser, args), framework)
        assert settings.data_dir == str(home / "données à voir")
        assert settings.output_dir == "runs/ñ out"
        assert settings.weights == "./wéights/w.h5"


# ---- files from elsewhere: no code runs when they are read ------------------------------------

class Payload:
    """Unpickled, it creates ``marker``: what a malicious checkpoint would do (run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def plant_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker),
                "pytorch-lightning_version": lightning.__version__}, path)


def assert_payload_is_live(path: Path, marker: Path) -> None:
    """Not vacuous: read without weights_only, the file does run its code."""
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_predict_refuses_a_planted_pickle(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "ran"
    plant_payload(run / "model.ckpt", marker)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    line = one_error_line(predict.main, [str(run), str(image)], capsys)
    assert line.startswith(f"error: {run / 'model.ckpt'} is not a readable checkpoint of this project "
                           "holding plain data only (Weights only load failed")
    assert_payload_is_live(run / "model.ckpt", marker)


def test_resume_refuses_a_planted_pickle_before_any_work(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "ran"
    last = out / "checkpoints" / "last.ckpt"
    plant_payload(last, marker)
    line = one_error_line(torch_train.main, ["--data-dir", str(tmp_path / "no data"),
                                             "--weights", "none", "--output-dir", str(out),
                                             "--resume"], capsys)
    assert line.startswith(f"error: {last} is not a readable checkpoint of this project "
                           "holding plain data only (Weights only load failed")
    assert line.endswith("use --overwrite to start over")
    assert_payload_is_live(last, marker)


def test_lightning_resume_path_reads_plain_data_only(tmp_path):
    """The checkpoint IO Lightning resumes through reads with weights_only=True, whatever it is
    asked: the planted file is refused there too."""
    path, marker = tmp_path / "last.ckpt", tmp_path / "ran"
    plant_payload(path, marker)
    with pytest.raises(UserError, match="holding plain data only"):
        torch_train.AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert_payload_is_live(path, marker)


@pytest.fixture(scope="module")
def lambda_models(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """A .keras and an .h5 model whose Lambda layer creates ``marker`` when the model is built."""
    root = tmp_path_factory.mktemp("lambda")
    marker = root / "ran"
    # The path as a constant of the function's code (Keras saves the code, not its defaults).
    function = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(function)])
    marker.unlink()   # building it ran the function once
    files = {kind: root / f"payload.{kind}" for kind in ("keras", "h5")}
    for path in files.values():
        model.save(path)
    assert not marker.exists()
    return files, marker


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_keras_trainer_refuses_a_lambda_layer(kind, lambda_models, tmp_path, capsys):
    files, marker = lambda_models
    line = one_error_line(keras_train.main, ["--data-dir", str(tmp_path), "--weights",
                                             str(files[kind]), "--output-dir",
                                             str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: --weights={str(files[kind])!r}: Keras could not load the "
                           f"model in {files[kind]}: ")
    assert "Lambda" in line and "safe_mode" in line
    assert not marker.exists()


def test_convert_and_torch_trainer_refuse_a_lambda_layer(lambda_models, tmp_path, capsys):
    files, marker = lambda_models
    line = one_error_line(convert.main, ["from-keras", str(files["keras"]),
                                         str(tmp_path / "converted")], capsys)
    assert str(files["keras"]) in line
    line = one_error_line(torch_train.main, ["--data-dir", str(tmp_path), "--weights",
                                             str(files["keras"]), "--output-dir",
                                             str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: --weights={str(files['keras'])!r}: ")
    assert not marker.exists()
    keras.models.load_model(files["keras"], safe_mode=False)   # not vacuous: it runs code
    assert marker.exists()


# ---- the data changes during a run (the port's loader) -----------------------------------------

@pytest.mark.parametrize("change", ["vanished", "corrupt"])
def test_image_unreadable_during_training_is_one_line_from_a_worker(change, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    files = FileList(folder, ("a",), (ImageFile("0.png", 0), ImageFile("1.png", 0)))
    if change == "vanished":
        (folder / "1.png").unlink()
        reason = "No such file or directory"
    else:
        (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not any more")
        reason = "truncated PNG"
    loader = torch.utils.data.DataLoader(ImageFiles(files, 8), batch_size=2, num_workers=1)
    batches = iter(loader)
    with pytest.raises(ImageReadError) as info:
        next(batches)
    message = str(info.value)
    # Ends the worker at once: left to garbage collection (in a later test), torch's iterator
    # waits 5 s for it (measured here: 0.03 s this way, 5.3 s by del and gc.collect()).
    batches._shutdown_workers()
    assert "\n" not in message
    assert message.startswith(f"{folder / '1.png'} cannot be read any more ({reason}")
    assert message.endswith("restore it, then rerun with --resume to continue from the last "
                            "finished epoch")
