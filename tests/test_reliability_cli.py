"""Both trainers on what users actually have: a corrupt file, bad arguments, a NaN loss, a
finished run resumed or overwritten, N classes for predict; one-line errors and nothing lost.

Each case runs ``python -m tl_keras.train`` and ``python -m tl_torch.train`` in-process
(``run_main(main, argv)``, as the command line does) on folders generated here, and checks the
exit status, that stderr holds exactly one ``error: ...`` line and no traceback, and what the
output folder holds afterwards. Run: ``python -m pytest tests/test_reliability_cli.py -q``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import lightning
import numpy as np
import pytest
import torch
from PIL import Image

import tl_keras.train as keras_train
import tl_torch.predict as predict
import tl_torch.train as torch_train
from tl_common.demo import draw_animal
from tl_common.download import cache_home, keras_home, sha256_of
from tl_common.errors import USER_ERROR_EXIT, UserError, run_main
from tl_common.files import BAD_IMAGES_FILE
from tl_common.outputs import METRICS_FILE, RunDir, read_metrics, write_json
from tl_common.settings import build_parser, parse, settings_from
from tl_common.weights import weights_record
from tl_torch.module import TransferModule
from tl_torch.weights import build_base

FRAMEWORKS = {"keras": keras_train.main, "torch": torch_train.main}
#: A real-looking folder: drawn cats and dogs (the demo's drawing), 6 + 6 to train, 5 + 5 to
#: validate; small images so that the runs that do train are quick.
PER_CLASS = {"train": 6, "validation": 5}
NAN_LEARNING_RATE = "1e38"   # Adam's first step moves every head weight by ~1e38: logits overflow
NAN_ERROR = re.compile(r"error: loss became (nan|inf|-inf) at epoch 1 step 2; lower "
                       r"--learning-rate or check the data")


@pytest.fixture(scope="module")
def cats_and_dogs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cats_and_dogs_filtered")
    for s, (split, count) in enumerate(PER_CLASS.items()):
        for label, name in enumerate(("cats", "dogs")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([7, s, label, i])
                image = draw_animal(rng, dog=bool(label)).resize((64, 56))
                image.save(root / split / name / f"{name[:-1]}.{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module", autouse=True)
def _keras_trains_eagerly(keras_eager):
    """Every in-process Keras run here trains eagerly (the ``keras_eager`` fixture)."""


def argv(data: Path, out: Path, *extra: str, weights: str = "none") -> list[str]:
    return ["--data-dir", str(data), "--weights", weights, "--image-size", "32", "--batch-size",
            "4", "--limit-batches", "2", "--initial-epochs", "1", "--fine-tune-epochs", "1",
            "--output-dir", str(out), *extra]


def one_error_line(framework: str, args: list[str], capsys) -> str:
    """Run a trainer's command line; it must exit 2 with one ``error:`` line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(FRAMEWORKS[framework], args)
    assert exit_info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def fake_finished_run(out: Path, framework: str) -> None:
    """What a finished run leaves that matters here: a complete metrics.json and the model."""
    out.mkdir(parents=True)
    write_json(out / METRICS_FILE, {"schema_version": 1, "status": "complete"})
    (out / ("model.keras" if framework == "keras" else "model.ckpt")).write_bytes(b"old model")


# ---- the Done-when: a corrupt file in a real-looking folder ------------------------------------

def test_corrupt_file_stops_both_trainers_before_training(cats_and_dogs, tmp_path, capsys):
    data = tmp_path / "cats_and_dogs_filtered"
    shutil.copytree(cats_and_dogs, data)
    corrupt = data / "train" / "cats" / "cat.0666.jpg"
    good = (cats_and_dogs / "train" / "cats" / "cat.0000.jpg").read_bytes()
    corrupt.write_bytes(good[:len(good) * 3 // 5])   # cut off mid-download
    lines = {}
    for framework in FRAMEWORKS:
        out = tmp_path / framework
        line = one_error_line(framework, argv(data, out), capsys)
        assert line == (f"error: 1 unreadable image file: {corrupt} (truncated JPEG (the data ends "
                        "before the image does)); fix or remove it, or pass --skip-bad-images to "
                        "train without them")
        # Stopped before training: no checkpoint, backup, history or model; only the list.
        assert sorted(p.name for p in out.iterdir()) == [BAD_IMAGES_FILE]
        lines[framework] = line
    assert lines["keras"] == lines["torch"]   # the same list, the same words


# ---- bad arguments -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wrong_weights(tmp_path_factory) -> Path:
    """A Keras weights file of another model (two Dense layers)."""
    path = tmp_path_factory.mktemp("weights") / "other_model.weights.h5"
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.save_weights(path)
    return path


BAD_ARGUMENTS = [
    (["--fine-tune-at", "155"], "--fine-tune-at=155 is not accepted: expected a Keras layer index "
                                "in 0..154"),
    (["--fine-tune-at", "-1"], "--fine-tune-at=-1 is not accepted"),
    (["--initial-epochs", "0"], "--initial-epochs=0 is not accepted: expected a positive integer"),
    (["--fine-tune-epochs", "-2"], "--fine-tune-epochs=-2 is not accepted"),
    (["--batch-size", "0"], "--batch-size=0 is not accepted: expected a positive integer"),
    (["--image-size", "31"], "--image-size=31 is not accepted: MobileNetV2 needs at least 32"),
    (["--weights", "imagenett"], "--weights='imagenett' is not accepted: expected one of imagenet, "
                                 "demo, none"),
    (["--learning-rate", "0"], "--learning-rate=0.0 is not accepted: expected a positive number"),
    (["--demo-set", "medium"], "--demo-set='medium' is not accepted: expected one of easy, hard"),
    (["--demo-set", "hard"], "--demo-set=hard needs --demo: it chooses the demo's data"),
]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(("extra", "expected"), BAD_ARGUMENTS,
                         ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_before_any_work(framework, extra, expected, cats_and_dogs,
                                                  tmp_path, capsys):
    out = tmp_path / "out"
    line = one_error_line(framework, argv(cats_and_dogs, out) + extra, capsys)
    assert expected in line
    assert not out.exists()   # refused before anything was created


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_weights_file_of_another_model_is_one_line(framework, wrong_weights, cats_and_dogs,
                                                   tmp_path, capsys):
    out = tmp_path / "out"
    line = one_error_line(framework, argv(cats_and_dogs, out, weights=str(wrong_weights)), capsys)
    assert line.startswith(f"error: --weights={str(wrong_weights)!r}: ")
    assert "MobileNetV2" in line or "does not fit the base" in line
    # Before the data was read, nothing written: the folder the run made is not left behind.
    assert not out.exists()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_unwritable_output_dir_is_one_line(framework, cats_and_dogs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = one_error_line(framework, argv(cats_and_dogs, blocker / "out"), capsys)
    assert line.startswith(f"error: --output-dir={str(blocker / 'out')!r} is not writable")


# ---- finished runs: --resume refuses, --overwrite clears first ---------------------------------

@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_of_a_finished_run_is_refused_alike(framework, cats_and_dogs, tmp_path, capsys):
    out = tmp_path / "out"
    fake_finished_run(out, framework)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = one_error_line(framework, argv(cats_and_dogs, out, "--resume"), capsys)
    assert line == (f"error: {out} holds a finished run: nothing to resume; pass --overwrite to "
                    "run it again")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_nan_loss_stops_an_overwrite_run_that_never_looks_finished(framework, cats_and_dogs,
                                                                  tmp_path, capsys):
    """--overwrite removes the old metrics.json first; the new run's loss turns infinite at its
    second step and the run stops with one line: nothing in the folder reads as finished, and no
    checkpoint or backup of the broken weights is left for --resume."""
    out = tmp_path / "out"
    fake_finished_run(out, framework)
    line = one_error_line(framework, argv(cats_and_dogs, out, "--overwrite", "--learning-rate",
                                          NAN_LEARNING_RATE, weights="demo"), capsys)
    assert NAN_ERROR.fullmatch(line), line
    assert not RunDir(out).is_finished() and not (out / METRICS_FILE).exists()
    assert not (out / "model.keras").exists() and not (out / "model.ckpt").exists()
    assert not (out / "checkpoints").exists()                 # torch: no epoch checkpoint
    assert not (out / "backup").exists() and not (out / "history.json").exists()   # keras
    # The settings record alone is nothing to resume: a plain rerun is not refused.
    assert not keras_train.RunState(out).exists()


# ---- checkpoints are written atomically ---------------------------------------------------------

def test_checkpoint_write_cut_short_leaves_the_last_one(tmp_path, monkeypatch):
    """A kill during a checkpoint write (here: torch.save failing half-way) leaves the previous
    checkpoint whole and no temporary file behind; the temporary file is in the same folder."""
    io_plugin = torch_train.AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint({"epoch": 1}, path)
    assert torch.load(path)["epoch"] == 1
    save = torch.save

    def save_half(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        save(obj, buf)
        f.write(buf.getvalue()[:20])
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="killed"):
        io_plugin.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# ---- paths under the home folder ------------------------------------------------------------

@pytest.fixture
def home_with_weights(tmp_path, monkeypatch, demo_weights) -> Path:
    """A home folder (``$HOME``) holding ``w.h5``, a copy of the demo weights; the caches stay
    where they are, so nothing is downloaded or generated again."""
    monkeypatch.setenv("TL_PARITY_CACHE", str(cache_home()))
    monkeypatch.setenv("KERAS_HOME", str(keras_home()))
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(demo_weights, home / "w.h5")
    monkeypatch.setenv("HOME", str(home))
    assert Path("~/w.h5").expanduser() == home / "w.h5"
    return home


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("how", ["flag", "config"])
def test_tilde_paths_are_expanded_when_settings_are_parsed(framework, how, home_with_weights,
                                                           tmp_path):
    home = home_with_weights
    if how == "flag":
        args = ["--weights=~/w.h5", "--data-dir=~/data", "--output-dir=~/out"]
    else:  # a config file reaches no shell either
        config = tmp_path / "exp.yaml"
        config.write_text("weights: ~/w.h5\ndata_dir: ~/data\noutput_dir: ~/out\n")
        args = ["--config", str(config)]
    parser = build_parser(framework, "test")
    settings = settings_from(parse(parser, args), framework)
    assert (settings.weights, settings.data_dir, settings.output_dir) == (
        str(home / "w.h5"), str(home / "data"), str(home / "out"))
    # Named sources are not paths.
    assert settings_from(parse(parser, ["--weights", "demo"]), framework).weights == "demo"


def test_weights_record_is_the_same_for_every_spelling_of_a_file(home_with_weights, demo_weights,
                                                                monkeypatch):
    expected = {"source": "file", "path": str(home_with_weights / "w.h5"),
                "sha256": sha256_of(demo_weights)}
    monkeypatch.chdir(home_with_weights)
    for spelling in ("~/w.h5", str(home_with_weights / "w.h5"), "w.h5", "./w.h5"):
        assert weights_record(spelling, 32) == expected, spelling
    assert weights_record("none", 32) == {"source": "none", "path": None, "sha256": None}
    assert weights_record("demo", 32) == {"source": "demo", "path": str(demo_weights),
                                          "sha256": sha256_of(demo_weights)}


@pytest.mark.slow
def test_weights_under_home_finish_with_the_same_record_in_both(cats_and_dogs, home_with_weights,
                                                                demo_weights, capsys):
    """``--weights=~/w.h5`` trains to the end and writes metrics.json (it used to die after
    training, in the checksum of '<cwd>/~/w.h5'); both frameworks record the file alike."""
    records = {}
    for framework in FRAMEWORKS:
        out = home_with_weights / framework
        run_main(FRAMEWORKS[framework], argv(cats_and_dogs, out, weights="~/w.h5"))
        records[framework] = read_metrics(out)["weights"]
    assert records["keras"] == records["torch"] == {
        "source": "file", "path": str(home_with_weights / "w.h5"),
        "sha256": sha256_of(demo_weights)}


@pytest.fixture
def odd_paths(tmp_path, cats_and_dogs, demo_weights, monkeypatch) -> dict[str, Path]:
    """Every odd path at once. The data in a folder with spaces and non-ASCII characters,
    reached through a symlinked folder under ``~``; the weights file under ``~`` (spaces,
    non-ASCII); a config file with a space and non-ASCII in its name, given by a relative
    path, naming the data and the weights with ``~`` and the output folder relative to the
    working folder, which is the data folder: the output lands inside the data, beside
    ``train/`` and ``validation/``."""
    monkeypatch.setenv("TL_PARITY_CACHE", str(cache_home()))
    monkeypatch.setenv("KERAS_HOME", str(keras_home()))
    home = tmp_path / "hôme dir"
    home.mkdir()
    real = tmp_path / "réal data" / "cats and dogs"
    shutil.copytree(cats_and_dogs, real)
    (home / "dätä sets").symlink_to(tmp_path / "réal data")
    weights = home / "wéights dir" / "w 1.h5"
    weights.parent.mkdir()
    shutil.copy(demo_weights, weights)
    cwd = home / "dätä sets" / "cats and dogs"
    (cwd / "cönfig 1.yaml").write_text(
        "data_dir: ~/dätä sets/cats and dogs\nweights: ~/wéights dir/w 1.h5\n"
        "image_size: 32\nbatch_size: 4\nlimit_batches: 2\ninitial_epochs: 1\n"
        "fine_tune_epochs: 1\n", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    return {"home": home, "real": real, "cwd": cwd, "weights": weights}


def check_odd_paths_run(paths: dict[str, Path], output: str) -> None:
    out = paths["real"] / output   # through the symlink, into the real folder
    doc = read_metrics(out)
    assert doc["status"] == "complete"
    assert doc["data"]["class_names"] == ["cats", "dogs"]   # the output folder is no class
    assert doc["data"]["root"] == str(paths["cwd"])
    assert doc["weights"]["path"] == str(paths["weights"])


@pytest.mark.slow
def test_odd_paths_through_the_port_command_line(odd_paths):
    """As a user types it, under the C locale: ``python -m tl_torch.train --config 'cönfig
    1.yaml' --output-dir 'runs/ñ out'`` in the data folder."""
    env = dict(os.environ, HOME=str(odd_paths["home"]), LC_ALL="C", LANG="C",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "tl_torch.train", "--config", "cönfig 1.yaml",
                             "--output-dir", "runs/ñ out"], cwd=odd_paths["cwd"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    check_odd_paths_run(odd_paths, "runs/ñ out")


@pytest.mark.slow
def test_odd_paths_through_the_reference(odd_paths, monkeypatch):
    monkeypatch.chdir(odd_paths["cwd"])
    run_main(keras_train.main, ["--config", "cönfig 1.yaml", "--output-dir", "runs/ñ keras"])
    check_odd_paths_run(odd_paths, "runs/ñ keras")


# ---- N classes in predict ------------------------------------------------------------------------

def test_predict_with_three_classes(tmp_path, capsys):
    """predict prints the largest softmax probability's class and that probability."""
    classes = ["birds", "cats", "dogs"]
    module = TransferModule(build_base("none", 32), num_classes=3, seed=1).eval()
    with torch.no_grad():   # a head that tells the three apart by colour
        module.classifier.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": lightning.__version__},
               run / "model.ckpt")
    write_json(run / METRICS_FILE, {"schema_version": 1, "status": "complete",
                                    "weights": {"source": "none"},
                                    "data": {"class_names": classes},
                                    "settings": {"image_size": 32}})
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(((250, 10, 10), (10, 250, 10), (10, 10, 250))):
        Image.new("RGB", (40, 30), colour).save(images / f"{i}.png")
    run_main(predict.main, [str(run), str(images)])
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    loaded, names, size = predict.load_run(run)
    from tl_torch.data import load_images

    with torch.no_grad():
        probs = torch.softmax(loaded(load_images(sorted(map(str, images.iterdir())), size)), -1)
    assert [p for p, _, _ in printed] == [str(images / f"{i}.png") for i in range(3)]
    for (_, name, prob), row in zip(printed, probs, strict=True):
        assert name == classes[int(row.argmax())]
        assert float(prob) == pytest.approx(float(row.max()), abs=5e-5)   # 4 decimals printed


def test_predict_refuses_a_head_that_does_not_fit_the_classes(tmp_path):
    module = TransferModule(build_base("none", 32), num_classes=3)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "pytorch-lightning_version": lightning.__version__},
               run / "model.ckpt")
    write_json(run / METRICS_FILE, {"schema_version": 1, "weights": {"source": "none"},
                                    "data": {"class_names": ["cats", "dogs"]},
                                    "settings": {"image_size": 32}})
    with pytest.raises(UserError, match="has a head for 3 classes, but .* lists 2"):
        predict.load_run(run)
