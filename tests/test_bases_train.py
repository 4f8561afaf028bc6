"""``--base`` in both trainers: the settings (each base's default fine-tune point, refusals), the
port's module over every base (the head as wide as the base's features, a checkpoint rebuilding
the right network), and -- slow -- ``python -m tl_keras.train`` and ``python -m tl_torch.train``
run to the end on each new base with the same parameter counts per phase as Keras' own.
Run: ``python -m pytest tests/test_bases_train.py -q`` (``-m "not slow"`` for the quick part).
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

import tl_keras.train as keras_train
import tl_torch.train as torch_train
from tl_common.bases import BASES, DEFAULT_BASE
from tl_common.errors import USER_ERROR_EXIT, UserError, run_main
from tl_common.outputs import read_layer_table
from tl_common.resume import recorded_settings
from tl_common.settings import build_parser, parse, settings_from
from tl_keras.model import build_base as keras_build_base
from tl_torch.checkpoint import load_run, save_module
from tl_torch.module import TransferModule
from tl_torch.run_files import MODEL_FILE
from tl_torch.weights import build_base, keras_init_, make_base

FRAMEWORKS = {"keras": keras_train.main, "torch": torch_train.main}
NEW_BASES = [name for name in BASES if name != DEFAULT_BASE]
SIZE = 32
#: The smallest run that goes through both phases, offline.
TINY = ["--demo", "--weights", "none", "--image-size", str(SIZE), "--limit-batches", "1",
        "--initial-epochs", "1", "--fine-tune-epochs", "1"]


def settings(framework: str, *args: str):
    return settings_from(parse(build_parser(framework, ""), list(args)), framework)


def one_error_line(framework: str, args: list[str], capsys) -> str:
    """A trainer's command line that must exit 2 with one ``error:`` line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(FRAMEWORKS[framework], args)
    assert exit_info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_default_fine_tune_point_is_the_bases_own(framework: str) -> None:
    assert settings(framework).fine_tune_at == 100          # the recipe's, unchanged
    for name, facts in BASES.items():
        chosen = settings(framework, "--base", name, "--weights", "none")
        assert chosen.fine_tune_at == facts.fine_tune_at
        # --fine-tune-at overrides it
        assert settings(framework, "--base", name, "--weights", "none",
                        "--fine-tune-at", "7").fine_tune_at == 7
    # EfficientNet built for ImageNet weights has one more layer before block 5c.
    assert settings(framework, "--base", "efficientnet_b0").fine_tune_at == 148
    assert BASES["mobilenet_v3_large"].fine_tune_at == 124
    assert BASES["resnet50"].fine_tune_at == 113


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(("extra", "expected"), [
    (["--base", "bogus"], "error: --base='bogus' is not accepted: expected one of mobilenet_v2, "
                          "mobilenet_v3_large, efficientnet_b0, resnet50"),
    (["--base", "resnet50", "--fine-tune-at", "176"],
     "error: --fine-tune-at=176 is not accepted: expected a Keras layer index in 0..175"),
    (["--base", "resnet50"], "error: --weights=demo is not accepted with --base=resnet50"),
    (["--base", "efficientnet_b0", "--weights", "demo"],
     "error: --weights=demo is not accepted with --base=efficientnet_b0"),
])
def test_bad_base_settings_are_one_line(framework: str, extra: list[str], expected: str,
                                        tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    line = one_error_line(framework, ["--demo", "--output-dir", str(out), *extra], capsys)
    assert line.startswith(expected)
    assert not out.exists()   # refused before anything was created


def test_torchvision_weights_are_mobilenet_v2_only(tmp_path: Path, capsys) -> None:
    line = one_error_line("torch", ["--base", "mobilenet_v3_large", "--weights", "torchvision",
                                    "--output-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("error: --weights=torchvision is not accepted with "
                           "--base=mobilenet_v3_large")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", NEW_BASES)
def test_imagenet_offline_is_one_line_naming_keras_url(framework: str, name: str, tmp_path: Path,
                                                       monkeypatch) -> None:
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("urllib.request.urlopen", no_network)            # the port's download
    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", no_network)   # Keras'
    facts = BASES[name]
    with pytest.raises(UserError) as err:
        if framework == "torch":
            build_base("imagenet", 160, base=name)
        else:
            keras_build_base("imagenet", 160, base=name)
    message = str(err.value)
    assert facts.imagenet_url + facts.imagenet_file in message
    assert "\n" not in message


def test_resume_record_holds_a_base_other_than_the_recipes() -> None:
    assert recorded_settings(settings("torch", "--base", "resnet50", "--weights", "none")
                             )["base"] == "resnet50"
    # MobileNetV2's record is as before --base existed, so those runs still resume.
    assert "base" not in recorded_settings(settings("torch"))


# ---- the port's module over each base ----------------------------------------------------------

@pytest.mark.parametrize("name", NEW_BASES)
def test_module_head_takes_the_bases_features(name: str) -> None:
    module = TransferModule(build_base("none", SIZE, base=name), seed=0).eval()
    images = torch.rand(2, 3, SIZE, SIZE) * 255
    with torch.no_grad():
        assert module.features(images).shape == (2, BASES[name].features)
        assert module(images).shape == (2,)
    assert module.hparams.fine_tune_at == BASES[name].fine_tune_at


@pytest.mark.parametrize(("name", "config"), [
    ("mobilenet_v3_large", {"base": "mobilenet_v3_large"}),
    ("efficientnet_b0", {"base": "efficientnet_b0", "imagenet_rescaling": True}),
    ("resnet50", {"base": "resnet50"}),
])
def test_checkpoint_rebuilds_the_right_base(name: str, config: dict, tmp_path: Path,
                                            calibrate_bn) -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, SIZE, SIZE, generator=generator) * 255
    base = keras_init_(make_base(config), generator)
    # BatchNorm statistics from the data: Keras' initial ones make the features vanish, and
    # any two networks would then agree.
    base = calibrate_bn(base, base.preprocess(images), generator)
    # fast=False on both sides: the same arithmetic, so the rebuilt model gives the same bits
    # (the fast path's own difference is bounded in tests/test_backbones_folding.py).
    module = TransferModule(base, seed=0, class_names=["cats", "dogs"], image_size=SIZE,
                            fast=False).eval()
    save_module(module, tmp_path / MODEL_FILE)
    loaded, class_names, image_size = load_run(tmp_path, fast=False)
    assert type(loaded.base) is type(base)
    assert len(loaded.base.keras_layers) == len(base.keras_layers)
    assert (class_names, image_size) == (("cats", "dogs"), SIZE)
    with torch.no_grad():
        assert module.features(images).std() > 1e-2        # not vanishing
        torch.testing.assert_close(loaded(images), module(images), rtol=0, atol=0)


# ---- both trainers, end to end -----------------------------------------------------------------

def keras_counts(name: str, fine_tune_at: int | None) -> dict[str, int]:
    """Keras' own count for the application and a one-logit head, the base frozen whole (None)
    or below ``fine_tune_at``, as the recipe freezes it."""
    facts = BASES[name]
    app = getattr(keras.applications, facts.keras_application)(
        input_shape=(SIZE, SIZE, 3), include_top=False, weights=None)
    app.trainable = fine_tune_at is not None
    if fine_tune_at is not None:
        for layer in app.layers[:fine_tune_at]:
            layer.trainable = False
    trainable = sum(int(np.prod(w.shape)) for w in app.trainable_weights) + facts.features + 1
    return {"trainable": trainable, "non_trainable": app.count_params() + facts.features + 1
            - trainable}


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_BASES)
def test_both_trainers_run_each_base_with_keras_counts(name: str, tmp_path: Path) -> None:
    facts = BASES[name]
    docs = {framework: main([*TINY, "--base", name, "--output-dir", str(tmp_path / framework)])
            for framework, main in FRAMEWORKS.items()}
    expected = {"feature_extraction": keras_counts(name, None),
                "fine_tuning": keras_counts(name, facts.fine_tune_at)}
    for framework, doc in docs.items():
        assert doc["counts"] == expected, framework
        assert doc["settings"]["base"] == name
        assert doc["settings"]["fine_tune_at"] == facts.fine_tune_at
        assert [epoch["phase"] for epoch in doc["history"]] == ["feature_extraction",
                                                                "fine_tuning"]
        table = read_layer_table(tmp_path / framework / "layer_table.csv")
        assert len(table) == facts.layers
        first_trainable = next(row for row in table if row[3])
        assert first_trainable[:1] + first_trainable[2:3] == (facts.fine_tune_at,
                                                              facts.fine_tune_from)
    assert read_layer_table(tmp_path / "keras" / "layer_table.csv") == \
        read_layer_table(tmp_path / "torch" / "layer_table.csv")


def test_init_from_another_base_is_one_line(tmp_path: Path, capsys) -> None:
    module = TransferModule(build_base("none", SIZE, base="resnet50"), seed=0,
                            class_names=["cats", "dogs"], image_size=SIZE)
    checkpoint = save_module(module, tmp_path / MODEL_FILE)
    line = one_error_line("torch", [*TINY[:1], "--image-size", str(SIZE), "--init-from",
                                    str(checkpoint), "--output-dir", str(tmp_path / "out")],
                          capsys)
    assert line.endswith(f"{checkpoint} holds a resnet50 model, the run has "
                         "--base=mobilenet_v2: pass --base resnet50")

