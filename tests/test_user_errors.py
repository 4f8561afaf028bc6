"""What a user meets when something is wrong: ``tl_torch.predict`` with an unreadable file, output
files under the user's umask, errors in the order a user needs them, offline hints that name an
option that works offline, and no empty output folder left by a run that failed early.

Run: ``python -m pytest tests/test_user_errors.py -q`` (``-m "not slow"`` for the quick ones).
"""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
import urllib.error
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

import tl_keras.train as keras_train
import tl_torch.predict as predict
import tl_torch.train as torch_train
from tl_common import download as download_module
from tl_common.demo import draw_animal
from tl_common.download import download
from tl_common.errors import USER_ERROR_EXIT, UserError, run_main
from tl_common.images import check_image
from tl_common.outputs import (
    METRICS_FILE,
    RunDir,
    atomic_write_bytes,
    plot_learning_curves,
    removed_if_unused,
    replaced_atomically,
    write_json,
    write_layer_table,
)
from tl_torch.module import TransferModule
from tl_torch.train import AtomicCheckpointIO
from tl_torch.weights import build_base

FRAMEWORKS = {"keras": keras_train.main, "torch": torch_train.main}
REPO = Path(__file__).resolve().parents[1]


def jpeg(path: Path, seed: int, dog: bool) -> Path:
    image = draw_animal(np.random.default_rng([11, seed, int(dog)]), dog=dog).resize((48, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cats_and_dogs")
    for split, count in (("train", 4), ("validation", 5)):
        for label, name in enumerate(("cats", "dogs")):
            for i in range(count):
                jpeg(root / split / name / f"{name[:-1]}.{i}.jpg", 10 * count + i, bool(label))
    return root


def argv(data: Path, out: Path, *extra: str, weights: str = "none") -> list[str]:
    return ["--data-dir", str(data), "--weights", weights, "--image-size", "32", "--batch-size",
            "4", "--limit-batches", "2", "--initial-epochs", "1", "--fine-tune-epochs", "1",
            "--output-dir", str(out), *extra]


def error_line(main, args: list[str], capsys) -> str:
    """The one ``error:`` line of a command that must exit with a user error, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, args)
    assert exit_info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---- predict: an unreadable file among good ones ------------------------------------------------

@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory) -> Path:
    """A run folder holding a model.ckpt of two classes (random head), as predict reads it."""
    module = TransferModule(build_base("none", 32), num_classes=2, seed=3,
                            class_names=["cats", "dogs"], image_size=32)
    run = tmp_path_factory.mktemp("run")
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": lightning.__version__}, run / "model.ckpt")
    return run


@pytest.fixture
def folder_with_a_truncated_jpeg(tmp_path) -> tuple[Path, Path, list[Path]]:
    folder = tmp_path / "photos"
    good = [jpeg(folder / f"{i}.jpg", i, bool(i % 2)) for i in range(5)]
    bad = folder / "2b_truncated.jpg"
    data = good[0].read_bytes()
    bad.write_bytes(data[: len(data) * 3 // 5])  # cut off mid-download
    return folder, bad, good


def test_predict_skips_an_unreadable_file_with_one_line(two_class_run, folder_with_a_truncated_jpeg,
                                                         capsys):
    folder, bad, good = folder_with_a_truncated_jpeg
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(predict.main, [str(two_class_run), str(folder)])
    assert exit_info.value.code == predict.SKIPPED_EXIT == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    # Every readable file predicted, in order, the bad one among them left out.
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(p) for p in sorted(good)]
    lines = err.strip().splitlines()
    # The trainers' words for the same file (their check before training).
    assert lines[0] == f"skipped 1 unreadable image file: {bad} ({check_image(bad)})"
    assert "truncated JPEG" in lines[0]
    assert lines[1] == ("error: 1 of 6 files could not be read and were skipped (named above); "
                        "the other 5 were predicted")
    assert len(lines) == 2


def test_predict_without_bad_files_exits_zero(two_class_run, folder_with_a_truncated_jpeg, capsys):
    folder, bad, good = folder_with_a_truncated_jpeg
    bad.unlink()
    run_main(predict.main, [str(two_class_run), str(folder)])  # no SystemExit: status 0
    assert len(capsys.readouterr().out.splitlines()) == len(good)


def test_predict_function_names_the_file_it_cannot_read(two_class_run,
                                                        folder_with_a_truncated_jpeg):
    _, bad, _ = folder_with_a_truncated_jpeg
    module, names, size = predict.load_run(two_class_run)
    with pytest.raises(UserError, match=f"unreadable image file: {bad} \\(truncated JPEG"):
        list(predict.predict(module, [bad], names, size))


@pytest.mark.slow
def test_predict_command_exit_status(two_class_run, folder_with_a_truncated_jpeg):
    """The real command line: status 1, the good files on stdout, no traceback."""
    folder, bad, good = folder_with_a_truncated_jpeg
    proc = subprocess.run([sys.executable, "-m", "tl_torch.predict", str(two_class_run),
                           str(folder)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 1, proc.stderr
    # Python's traceback (tl_torch.fast may quote TorchScript's in a warning on tiny images).
    assert not re.search(r"^Traceback \(most recent call last\)", proc.stderr, re.M)
    assert str(bad) in proc.stderr
    assert len(proc.stdout.splitlines()) == len(good)


# ---- output files follow the umask ---------------------------------------------------------------

@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_follow_the_umask(umask, tmp_path, monkeypatch):
    expected = 0o666 & ~umask
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    write_json(tmp_path / METRICS_FILE, {"status": "complete"})
    write_layer_table(tmp_path / "layer_table.csv", [(0, "InputLayer", "input_layer", False)])
    history = [{"epoch": 1, "phase": "feature_extraction", "loss": 1.0, "accuracy": 0.5,
                "val_loss": 1.0, "val_accuracy": 0.5}]
    plot_learning_curves(tmp_path / "curves.png", {"run": history}, title="t")
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, tmp_path / "model.ckpt")
    with replaced_atomically(tmp_path / "w.h5", ".w.tmp.h5") as tmp:  # a writer's own open()
        tmp.write_bytes(b"h5")
    monkeypatch.setattr(download_module.urllib.request, "urlopen",
                        lambda url, timeout: _Response(b"weights"))
    download("https://example.invalid/w.h5", tmp_path / "cache" / "w.h5", what="w", way_out="-")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 7
    assert {p.name: oct(mode(p)) for p in files} == {p.name: oct(expected) for p in files}
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left


class _Response(io.BytesIO):
    headers: dict = {}


@pytest.mark.slow
def test_a_whole_run_follows_the_umask(umask, data_dir, tmp_path):
    out = tmp_path / "run"
    run_main(torch_train.main, argv(data_dir, out))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"metrics.json", "model.ckpt", "learning_curves.png", "layer_table.csv",
            "base.weights.h5", "last.ckpt"} <= {p.name for p in files}
    assert {str(p.relative_to(out)): oct(mode(p)) for p in files} == {
        str(p.relative_to(out)): oct(0o666 & ~umask) for p in files}


# ---- errors in the order a user needs them; offline hints; no empty folder ----------------------

@pytest.fixture
def offline(tmp_path, monkeypatch) -> list[str]:
    """No network, an empty Keras cache; returns the URLs that were tried."""
    tried: list[str] = []

    def no_network(url, *args, **kwargs):
        tried.append(str(url))
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(download_module.urllib.request, "urlopen", no_network)
    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", no_network)
    return tried


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_mistyped_data_dir_comes_before_the_weights_download(framework, offline, data_dir,
                                                             tmp_path, capsys):
    typo, out = tmp_path / "cats_and_dgos", tmp_path / "new" / "run"
    line = error_line(FRAMEWORKS[framework], argv(typo, out, weights="imagenet"), capsys)
    assert line == (f"error: --data-dir={str(typo)!r} is not a folder: expected a folder with "
                    "train/ and validation/ class folders")
    assert offline == []  # nothing was downloaded first
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_offline_imagenet_names_offline_options_and_leaves_no_folder(framework, offline,
                                                                     data_dir, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    line = error_line(FRAMEWORKS[framework], argv(data_dir, out, weights="imagenet"), capsys)
    assert line.startswith("error: ") and "could not download the ImageNet weights" in line
    assert "--weights demo" in line and "--demo " in line
    assert "--weights none" not in line  # it learns nothing: no way out
    assert offline  # it did try
    assert not (tmp_path / "new").exists()  # the run made both folders, and removed both


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_early_failure_keeps_the_users_own_folders(framework, offline, data_dir, tmp_path,
                                                   capsys):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    for out in (empty, full):
        error_line(FRAMEWORKS[framework], argv(data_dir, out, weights="imagenet"), capsys)
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert [p.name for p in full.iterdir()] == ["notes.txt"]


def test_removed_if_unused_removes_only_empty_folders_it_made(tmp_path):
    run_dir = RunDir(tmp_path / "a" / "b" / "c")
    made = run_dir.create()
    assert made == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    (tmp_path / "a" / "kept.txt").write_text("written before the failure")
    with pytest.raises(RuntimeError), removed_if_unused(made):
        raise RuntimeError("fails before writing anything")
    assert (tmp_path / "a" / "kept.txt").exists() and not (tmp_path / "a" / "b").exists()
    made = RunDir(tmp_path / "x").create()
    with removed_if_unused(made):
        pass  # no failure: the folder stays
    assert (tmp_path / "x").is_dir()
