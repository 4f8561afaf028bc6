"""``python -m tl_torch.train --init-from``: a run that starts from a trained model.ckpt (a
converted Keras model, or a tl_torch run), and its one-line refusals. The step-for-step agreement
with Keras of a converted model's fine-tuning is parity check 19 (parity_tests/checks_init_from.py).

Run: ``TL_PARITY_CACHE=/tmp/tlcache python -m pytest tests/test_torch_init_from.py -q``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tl_torch.train as train
from tl_common.errors import UserError
from tl_common.outputs import read_metrics
from tl_common.settings import build_parser, parse, settings_from

PER_CLASS = {"train": {"cats": 4, "dogs": 4}, "validation": {"cats": 3, "dogs": 3}}
SIZE = 32


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs")) -> Path:
    rng = np.random.default_rng(2)
    for split, counts in PER_CLASS.items():
        for name, count in zip(classes, counts.values(), strict=True):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


def args(data: Path, out: Path, *extra: str, size: int = SIZE) -> list[str]:
    return ["--data-dir", str(data), "--image-size", str(size), "--batch-size", "4",
            "--fine-tune-epochs", "1", "--limit-batches", "1", "--accelerator", "cpu",
            "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data, demo_weights, tmp_path_factory) -> Path:
    """A finished run of the port: the model to start from."""
    out = tmp_path_factory.mktemp("first")
    train.main(args(data, out, "--weights", "demo", "--initial-epochs", "1"))
    return out


def error_line(argv: list[str]) -> str:
    with pytest.raises(UserError) as caught:
        train.main(argv)
    line = str(caught.value)
    assert "\n" not in line
    return line


@pytest.mark.slow
def test_fine_tuning_only_from_a_run(trained, data, tmp_path) -> None:
    """--initial-epochs 0: fine-tuning from the first step, from the trained weights (the base's
    frozen layers keep them exactly; the head and the unfrozen layers move from them)."""
    out = tmp_path / "second"
    doc = train.main(args(data, out, "--init-from", str(trained), "--initial-epochs", "0"))
    assert [(h["epoch"], h["phase"]) for h in doc["history"]] == [(1, "fine_tuning")]
    assert doc["weights"]["source"] == "init-from"
    assert doc["weights"]["path"] == str((trained / "model.ckpt").absolute())
    start = torch.load(trained / "model.ckpt", weights_only=True)["state_dict"]
    end = torch.load(out / "model.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(start["base.Conv1.weight"], end["base.Conv1.weight"])  # below layer 100
    assert not torch.equal(start["base.Conv_1.weight"], end["base.Conv_1.weight"])
    assert not torch.equal(start["classifier.weight"], end["classifier.weight"])
    assert read_metrics(out)["settings"]["init_from"] == str(trained)


@pytest.mark.slow
def test_refusals(trained, data, tmp_path) -> None:
    ckpt = trained / "model.ckpt"
    line = error_line(args(data, tmp_path / "a", "--init-from", str(ckpt), size=64))
    assert line == (f"--init-from={str(ckpt)!r}: {ckpt} was trained at {SIZE}x{SIZE} pixels, this "
                    f"run is at 64: run with --image-size {SIZE}")
    other = make_image_folder(tmp_path / "breeds", ("beagle", "husky"))
    line = error_line(args(other, tmp_path / "b", "--init-from", str(trained)))
    assert "classifies ['cats', 'dogs'], the data has classes ['beagle', 'husky']" in line
    line = error_line(args(data, tmp_path / "c", "--init-from", str(trained / "metrics.json")))
    assert line.startswith(f"--init-from={str(trained / 'metrics.json')!r}: ")
    assert "is not a readable checkpoint" in line
    line = error_line(args(data, tmp_path / "d", "--init-from", str(tmp_path / "nothing")))
    assert "no such file or folder" in line


def test_settings_refusals(tmp_path) -> None:
    def settings(framework: str, *argv: str):
        return settings_from(parse(build_parser(framework, ""), list(argv)), framework)

    with pytest.raises(UserError, match=r"^--initial-epochs=0 is not accepted: .*--init-from"):
        settings("torch", "--initial-epochs", "0")
    with pytest.raises(UserError, match="^--init-from and --weights exclude each other"):
        settings("torch", "--init-from", str(tmp_path), "--weights", "demo")
    with pytest.raises(UserError, match=r"^--num-nodes=0 is not accepted: expected a positive"):
        settings("torch", "--num-nodes", "0")
    with pytest.raises(UserError, match=r"^--num-nodes=2 is not accepted: the Keras reference"):
        settings("keras", "--num-nodes", "2")
    with pytest.raises(UserError, match=r"^--init-from='.*' is not accepted: the Keras reference"):
        settings("keras", "--init-from", str(tmp_path))
    assert settings("torch", "--init-from", str(tmp_path), "--initial-epochs", "0",
                    "--num-nodes", "3").num_nodes == 3
