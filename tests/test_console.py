"""What a person reads on the console: the trainers without the framework noise this project
causes (and understands), the layer table summed up, epochs from 1; ``python -m parity_tests
--help`` and ``compare``'s rows.

Run: ``python -m pytest tests/test_console.py -q`` (``-m "not slow"`` for the quick ones).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import tl_torch.train as torch_train
from parity_tests.__main__ import main as parity_main
from parity_tests.compare import main as compare_main
from tl_common.demo import draw_animal
from tl_common.interrupts import StopRequests
from tl_common.outputs import RunDir, read_layer_table, show_layer_table
from tl_common.settings import Settings
from tl_keras.console import CUINIT_FAILED, has_nvidia_driver, stderr_without
from tl_torch.console import LIGHTNING_INFO_LOGGER, LITLOGGER_TIP, quiet_lightning

REPO = Path(__file__).resolve().parents[1]
BASE_LAYERS = 154


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cats_and_dogs")
    for split, count in (("train", 4), ("validation", 5)):
        for label, name in enumerate(("cats", "dogs")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = draw_animal(np.random.default_rng([5, count, label, i]), dog=bool(label))
                image.resize((48, 40)).save(root / split / name / f"{i}.jpg", quality=90)
    return root


def run_command(module: str, *args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    """``python -m module args`` as a user runs it (stdout and stderr as the terminal shows)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
                          preexec_fn=lambda: os.umask(umask))


def screen_lines(console: str) -> list[str]:
    return re.split(r"[\r\n]+", console)


def trainer_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--initial-epochs", "1", "--fine-tune-epochs", "1", "--output-dir", str(out), *extra]


# ---- Lightning: the tip and the limit notes ------------------------------------------------------

class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def lightning_info(settings: Settings, tmp_path: Path, *, quiet: bool) -> list[str]:
    """What Lightning logs while the port's trainer is built (its rank-zero info messages)."""
    log = logging.getLogger(LIGHTNING_INFO_LOGGER)
    saved = list(log.filters)
    if quiet:
        quiet_lightning()
    else:
        log.filters.clear()
    records = Records()
    log.addHandler(records)
    try:
        ns = SimpleNamespace(accelerator="cpu", devices="1", strategy="auto", precision="32-true")
        torch_train.build_trainer(settings, ns, RunDir(tmp_path), torch_train.KerasHistory(),
                                  StopRequests("stopped"))
    finally:
        log.removeHandler(records)
        log.filters[:] = saved
    return records.messages


def test_lightning_tip_is_left_out(tmp_path):
    assert any(m.startswith(LITLOGGER_TIP) for m in lightning_info(Settings(), tmp_path,
                                                                    quiet=False))  # the control
    assert not any("litlogger" in m for m in lightning_info(Settings(), tmp_path, quiet=True))


def test_no_limit_notes_unless_the_user_set_a_limit(tmp_path):
    assert not any("was configured so" in m
                   for m in lightning_info(Settings(), tmp_path, quiet=True))
    notes = [m for m in lightning_info(Settings(limit_batches=1), tmp_path, quiet=True)
             if "was configured so" in m]
    assert len(notes) == 3  # --limit-batches 1: the user's own choice, which Lightning confirms


# ---- the layer table ----------------------------------------------------------------------------

def test_layer_table_is_summed_up_and_written(tmp_path):
    rows = [(i, "Conv2D", f"layer_{i}", i >= 3) for i in range(5)]
    lines: list[str] = []
    show_layer_table(rows, tmp_path / "layer_table.csv", print_all=False, echo=lines.append)
    assert lines == [f"base layers: 5, 3 frozen, 2 trainable from index 3 (layer_3); the full "
                     f"table in {tmp_path / 'layer_table.csv'} (--print-layers prints it here)"]
    assert read_layer_table(tmp_path / "layer_table.csv") == rows
    lines.clear()
    show_layer_table(rows, None, print_all=True, echo=lines.append)
    assert len(lines) == 2 and len(lines[0].splitlines()) == 6  # header + 5 rows, then the summary


# ---- TensorFlow's cuInit line ------------------------------------------------------------------

def test_stderr_without_drops_only_the_chosen_lines(capfd):
    with stderr_without(lambda line: CUINIT_FAILED in line):
        os.write(2, f"E0000 cuda_platform.cc:52] {CUINIT_FAILED}: UNKNOWN ERROR (303)\n".encode())
        os.write(2, b"E0000 some real error\n")
        print("from python", file=sys.stderr)
    err = capfd.readouterr().err
    assert CUINIT_FAILED not in err
    assert "E0000 some real error\n" in err and "from python\n" in err


@pytest.mark.slow
def test_keras_finds_its_devices_without_the_cuinit_line():
    if has_nvidia_driver():
        pytest.skip("an NVIDIA driver is installed: a cuInit failure here is a real error, shown")
    control = subprocess.run([sys.executable, "-c", "import tensorflow as tf; "
                              "tf.config.list_physical_devices()"], capture_output=True,
                             text=True, check=False)
    if CUINIT_FAILED not in control.stderr:
        pytest.skip("this TensorFlow build does not try CUDA: nothing to leave out")
    found = subprocess.run([sys.executable, "-c", "from tl_keras.console import find_devices; "
                            "print(find_devices())"], capture_output=True, text=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert found.returncode == 0, found.stderr
    assert "/physical_device:CPU:0" in found.stdout
    assert CUINIT_FAILED not in found.stderr


# ---- the trainers' consoles ---------------------------------------------------------------------

@pytest.mark.slow
def test_port_console(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_command("tl_torch.train", *trainer_args(data_dir, out))
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert "litlogger" not in console and "was configured so" not in console
    assert "module(s) in eval mode" not in console
    # A progress bar redraws itself after a carriage return: each redraw is a line here.
    notes = [line for line in screen_lines(console) if "stay in inference mode" in line]
    assert len(notes) == 1 and notes[0].startswith("note: ")
    # Epochs 1..2 as in metrics.json, never Lightning's 0-based count.
    shown = set(re.findall(r"Epoch (\d+)/2", console))
    assert shown == {"1", "2"}, console
    assert not re.search(r"Epoch 0\b", console)
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
    # (in a log file, after the progress bar's last redraw: tqdm clears it on terminals only)
    summary = re.findall(r"base layers: .*", console)
    assert summary == [f"base layers: {BASE_LAYERS}, 100 frozen, 54 trainable from index 100 "
                       f"(block_11_expand_relu); the full table in {out / 'layer_table.csv'} "
                       "(--print-layers prints it here)"]
    assert "block_16_project_BN" not in console  # the table's rows are not printed
    assert len(read_layer_table(out / "layer_table.csv")) == BASE_LAYERS


@pytest.mark.slow
def test_reference_console_and_print_layers(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_command("tl_keras.train", *trainer_args(data_dir, out, "--limit-batches", "1",
                                                       "--print-layers", "--initial-epochs", "2"))
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    if not has_nvidia_driver():
        assert CUINIT_FAILED not in console
    assert "block_16_project_BN" in console  # --print-layers: the whole table
    assert any(line.startswith(f"base layers: {BASE_LAYERS}, 100 frozen")
               for line in screen_lines(console))
    assert len(read_layer_table(out / "layer_table.csv")) == BASE_LAYERS
    # Keras counts from 1 (and names no epoch in a phase of one epoch).
    assert "Epoch 1/2" in console and "Epoch 0" not in console


# ---- python -m parity_tests ---------------------------------------------------------------------

def test_parity_tests_help_is_its_own(capsys):
    assert parity_main(["--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: python -m parity_tests")
    for needed in ("compare RUN_A RUN_B", "seeds", "TL_PARITY_TRAINERS", "TL_PARITY_SEEDS",
                   "--report-dir", "python -m pytest parity_tests --help"):
        assert needed in text, needed
    assert text.index("TL_PARITY_SEEDS") < text.index("pytest options")
    assert len(lines) < 60  # not pytest's hundreds of lines


def metrics(framework: str, initial: int, fine: int) -> dict:
    history = [{"epoch": e, "phase": "feature_extraction" if e <= initial else "fine_tuning",
                "loss": 1.0 / e, "accuracy": 0.5, "val_loss": 1.0 / e, "val_accuracy": 0.5}
               for e in range(1, initial + fine + 1)]
    files = {s: {"sha256": "0" * 64} for s in ("train", "validation", "test")}
    counts = {p: {"trainable": 1, "non_trainable": 2} for p in ("feature_extraction",
                                                                 "fine_tuning")}
    return {"schema_version": 1, "framework": framework, "status": "complete",
            "settings": {"initial_epochs": initial, "fine_tune_epochs": fine, "batch_size": 32,
                         "limit_batches": None},
            "weights": {"source": "demo", "sha256": "1" * 64}, "data": {"files": files},
            "counts": counts, "history": history, "test": {"loss": 0.1, "accuracy": 0.9},
            "timings": {"total_s": 1.0}}


@pytest.mark.parametrize(("b_schedule", "label", "warned"), [
    ((10, 10), "feature_extraction epoch 10 loss", False),
    ((2, 10), "feature_extraction A epoch 10 vs B epoch 2 loss", True),
])
def test_compare_names_both_epochs_and_warns_of_other_schedules(tmp_path, capsys, b_schedule,
                                                                label, warned):
    for name, doc in (("a", metrics("keras", 10, 10)), ("b", metrics("torch", *b_schedule))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(doc))
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert any(line.startswith(label) for line in text.splitlines()), text
    assert "/" not in text.split("feature_extraction", 1)[1].split("loss", 1)[0]
    warning = [line for line in text.splitlines() if line.startswith("warning: ")]
    if warned:
        assert warning == ["warning: the two runs had different schedules (A vs B: "
                           "--initial-epochs 10 vs 2): their epochs are not the same point of "
                           "training"]
    else:
        assert warning == []


@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_print_layers_is_a_shared_flag(framework):
    from tl_common.settings import build_parser, parse, settings_from

    parser = (torch_train.build_arg_parser() if framework == "torch"
              else build_parser("keras", "the reference"))
    assert settings_from(parse(parser, ["--print-layers"]), framework).print_layers is True
    assert settings_from(parse(parser, []), framework).print_layers is False
