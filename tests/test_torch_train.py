"""Tests of ``python -m tl_torch.train`` and ``python -m tl_torch.predict``: outputs, BatchNorm and
augmentation in the real training loop, optimizers per phase, resume after ``kill -9``, refusing
a finished run, DDP on two CPU processes, determinism.

Tiny runs on generated JPEGs (32×32 pixels, batches of 4) with the demo weights, whose features
are of order 1 (a random base's are ~1e-12: a head would learn nothing and every weight
comparison would pass trivially). Most runs are in-process (``main(argv)``); the runs killed with
SIGKILL and the DDP run are subprocesses of :data:`HOOKED_TRAIN`, ``python -m tl_torch.train``
with two test hooks that are inert unless their environment variable is set.
Run: ``TL_PARITY_CACHE=/tmp/tlcache python -m pytest tests/test_torch_train.py -q``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from PIL import Image

import tl_torch.data
import tl_torch.predict as predict
import tl_torch.train as train
from tl_common.errors import UserError, run_main
from tl_common.files import load_splits
from tl_common.lock import LOCK_FILE
from tl_common.outputs import HISTORY_KEYS, read_layer_table, read_metrics
from tl_common.settings import Settings
from tl_torch import load_keras_weights
from tl_torch.data import ImageFolderDataModule, load_images
from tl_torch.model import MobileNetV2Base
from tl_torch.module import TransferModule, TwoPhaseFineTuning, rewrap_ddp
from tl_torch.optim import KerasAdam, KerasRMSprop
from tl_torch.weights import base_config, build_base

REPO = Path(__file__).resolve().parents[1]

#: Images per split and class. Validation 4 + 8: round(4 · 0.2) = 1 and round(8 · 0.2) = 2 go to
#: test, so validation holds 3 + 6 = 9 and test 1 + 2 = 3 images: odd counts, which a sampler
#: padding two shards to equal length would have to repeat an image for.
PER_CLASS = {"train": {"cats": 8, "dogs": 8}, "validation": {"cats": 4, "dogs": 8}}
SPLIT_SIZES = {"train": 16, "validation": 9, "test": 3}
SIZE = 32
BATCH = 4
LEARNING_RATE = 2e-4  # not the default, so that "a tenth of it" is this run's number
SEED = 3
FINE_TUNE_AT = 100
#: The recipe's counts (they do not depend on the image size).
COUNTS = {"feature_extraction": {"trainable": 1_281, "non_trainable": 2_257_984},
          "fine_tuning": {"trainable": 1_862_721, "non_trainable": 396_544}}
#: Keras names of the layers with weights that fine-tuning trains.
TRAINABLE_B_LAYERS = {layer.name for layer in MobileNetV2Base().keras_layers
                      if layer.has_weights and layer.index >= FINE_TUNE_AT}
PHASES_2_2 = ["feature_extraction", "feature_extraction", "fine_tuning", "fine_tuning"]
#: Intra-op threads of every run, in-process and in subprocesses. One: the bitwise comparisons
#: between a run killed in a subprocess and its resumption in-process need the same reduction
#: order in both, and on 2 busy cores one thread ran these tiny batches 5-20x faster than two
#: (OpenMP threads waiting on each other). A DDP run takes one per process anyway.
THREADS = 1
#: How long a subprocess may take to reach its pause point or to finish (2 loaded CPU cores).
SUBPROCESS_TIMEOUT_S = 400
#: How long a run may take to stop after SIGINT: the step under way, then Lightning's teardown
#: (measured about 1 s here; the bound leaves room for 2 loaded cores).
STOP_WITHIN_S = 10
#: Validation loss of the DDP run against one process evaluating the saved model on the whole
#: split: both run the same float32 model, but the run goes through the folded frozen layers
#: (tl_torch.fast: ~1e-6 relative rounding) and in other batches (measured 1.9e-6 relative).
#: Shards padded to equal length (one image of 9 counted twice) moved it by 5e-2 here.
DDP_LOSS_RTOL = 1e-5
#: Accuracies are counts over a few images (k/8, k/9, k/3) in float32: equal up to its rounding.
ACCURACY_ATOL = 1e-6
#: Printed probabilities have 4 decimals.
PRINTED_PROB_ATOL = 5e-5

HOOKED_TRAIN = '''\
"""python -m tl_torch.train with two test hooks (tests/test_torch_train.py), inert unless set:
TL_TEST_PAUSE_AT="epoch,batch" (0-based): write the pid to $TL_TEST_MARKER when that training
step is about to start and wait there, for the test to kill -9 the process or to send it a
signal (the wait ends once the trainer has recorded one);
TL_TEST_DUMP_DIR: every process saves its module's state_dict when fit ends (rank<r>.pt)."""
import os
import signal
import time
from pathlib import Path

import torch

from tl_common.errors import UserError, run_main
from tl_torch import module as tm
from tl_torch.train import main

PAUSE_AT = os.environ.get("TL_TEST_PAUSE_AT")
DUMP_DIR = os.environ.get("TL_TEST_DUMP_DIR")
_batch_start = tm.TransferModule.on_train_batch_start
_fit_end = tm.TransferModule.on_fit_end


def on_train_batch_start(self, batch, batch_idx):
    if PAUSE_AT and f"{self.current_epoch},{batch_idx}" == PAUSE_AT:
        marker = Path(os.environ["TL_TEST_MARKER"])
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        os.replace(marker.with_suffix(".tmp"), marker)  # never seen half-written
        stop = getattr(signal.getsignal(signal.SIGINT), "__self__", None)  # the StopRequests
        deadline = time.monotonic() + 600
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.05)
    return _batch_start(self, batch, batch_idx)


def on_fit_end(self):
    if DUMP_DIR:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        torch.save(state, Path(DUMP_DIR) / f"rank{self.global_rank}.pt")
    return _fit_end(self)


tm.TransferModule.on_train_batch_start = on_train_batch_start
tm.TransferModule.on_fit_end = on_fit_end
if __name__ == "__main__":
    # Ctrl-C as a terminal delivers it, also where the tests were started with it ignored (nohup,
    # a background job), which the trainer would keep so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_main(main)
'''


# ---- helpers ---------------------------------------------------------------------------------

def make_image_folder(root: Path) -> Path:
    """Random-noise JPEGs in the cats_and_dogs_filtered layout (not square: they get resized)."""
    rng = np.random.default_rng(0)
    for split, classes in PER_CLASS.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{name[:-1]}.{i}.jpg")
    return root


def run_args(data_dir: Path, out: Path, *extra: str, epochs: tuple[int, int] = (2, 2),
             limit: int | None = 2) -> list[str]:
    limit_args = ["--limit-batches", str(limit)] if limit else []
    return ["--data-dir", str(data_dir), "--weights", "demo", "--image-size", str(SIZE),
            "--batch-size", str(BATCH), "--initial-epochs", str(epochs[0]),
            "--fine-tune-epochs", str(epochs[1]), "--learning-rate", str(LEARNING_RATE),
            "--seed", str(SEED), *limit_args, "--output-dir", str(out), *extra]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every tensor bitwise equal, the same keys."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert_same_tensors(a["state"][i], b["state"][i])


def file_snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder``: size, modification time and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), **extra)
    for name in ("TL_TEST_PAUSE_AT", "TL_TEST_DUMP_DIR", "TL_TEST_MARKER"):
        if name not in extra:
            env.pop(name, None)
    return env


def start_paused_run(script: Path, argv: list[str], pause_at: str, marker: Path,
                     log: Path) -> subprocess.Popen:
    """The run's stdout goes to ``log``, its stderr to ``log`` with the suffix ``.err``."""
    env = subprocess_env(TL_TEST_PAUSE_AT=pause_at, TL_TEST_MARKER=str(marker))
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, env=env,
                                stdout=out, stderr=err)


def interrupt_when_paused(proc: subprocess.Popen, marker: Path, log: Path, signum: int) -> float:
    """Wait for the run's pause point, send it ``signum``; it must exit 128 + signum within
    :data:`STOP_WITHIN_S` with one ``error:`` line, the last on its stderr, and no traceback.
    Returns the seconds from the signal to the exit."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended (rc {proc.returncode}) or timed out before its pause point:\n"
                        + log.with_suffix(".err").read_text()[-3000:])
        time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signum)
    rc = proc.wait(timeout=60)
    seconds = time.monotonic() - sent
    err = log.with_suffix(".err").read_text()
    assert rc == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        err.splitlines()[-1]] == [f"error: stopped by {signal.Signals(signum).name}: "
                                  f"{train.INTERRUPTED}"]
    assert seconds < STOP_WITHIN_S
    return seconds


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses (:data:`THREADS`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hooked_train(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("scripts") / "hooked_train.py"
    script.write_text(HOOKED_TRAIN)
    return script


@pytest.fixture(scope="module")
def finished_run(data_dir, demo_weights, tmp_path_factory) -> tuple[Path, dict]:
    """The reference run: 2 + 2 epochs, 2 batches each, in-process."""
    out = tmp_path_factory.mktemp("run")
    return out, train.main(run_args(data_dir, out))


@pytest.fixture(scope="module")
def demo_base_state(demo_weights) -> dict[str, torch.Tensor]:
    """The base as the demo weights load it, before any training."""
    return {k: v.clone() for k, v in build_base("demo", SIZE).state_dict().items()}


# ---- 1. outputs of a two-phase run -----------------------------------------------------------

@pytest.mark.slow
def test_metrics_json(finished_run, demo_weights):
    out, returned = finished_run
    doc = read_metrics(out)
    assert doc == json.loads(json.dumps(returned))
    assert set(doc) == {"schema_version", "framework", "status", "versions", "machine", "settings",
                        "data", "weights", "counts", "history", "test", "timings"}
    assert doc["framework"] == "torch" and doc["status"] == "complete"
    assert set(doc["versions"]) == {"python", "torch", "lightning"}
    settings = doc["settings"]
    assert (settings["image_size"], settings["batch_size"], settings["learning_rate"],
            settings["seed"], settings["fine_tune_at"]) == (SIZE, BATCH, LEARNING_RATE, SEED,
                                                            FINE_TUNE_AT)
    assert doc["data"]["class_names"] == ["cats", "dogs"]
    assert {k: v["count"] for k, v in doc["data"]["files"].items()} == SPLIT_SIZES
    assert doc["weights"]["source"] == "demo"
    assert Path(doc["weights"]["path"]) == demo_weights
    assert doc["counts"] == COUNTS  # at 32 pixels: the recipe's numbers at 160
    history = doc["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["phase"] for h in history] == PHASES_2_2
    for h in history:
        assert tuple(h) == HISTORY_KEYS
        assert h["loss"] > 0 and h["val_loss"] > 0
        # 2 batches of 4 trained on, 2 batches (8 images) validated on per epoch
        assert h["accuracy"] * 8 == round(h["accuracy"] * 8)
        assert h["val_accuracy"] * 8 == pytest.approx(round(h["val_accuracy"] * 8),
                                                      abs=8 * ACCURACY_ATOL)
    assert set(doc["test"]) == {"loss", "accuracy"} and doc["test"]["loss"] > 0
    assert doc["test"]["accuracy"] * 3 == pytest.approx(round(doc["test"]["accuracy"] * 3),
                                                        abs=3 * ACCURACY_ATOL)
    # The Keras reference's timing keys.
    assert set(doc["timings"]) == {"feature_extraction_s", "fine_tuning_s", "test_s", "total_s"}
    assert all(v > 0 for v in doc["timings"].values())


@pytest.mark.slow
def test_other_outputs(finished_run):
    out, _ = finished_run
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = read_layer_table(out / "layer_table.csv")
    assert [row[0] for row in table] == list(range(154))
    assert table[0][1] == "InputLayer"
    assert table[FINE_TUNE_AT] == (100, "ReLU", "block_11_expand_relu", True)
    assert [row[3] for row in table] == [i >= FINE_TUNE_AT for i in range(154)]
    assert (out / "model.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_exported_base_weights_load_back(finished_run, demo_base_state):
    out, _ = finished_run
    trained = {k.removeprefix("base."): v
               for k, v in load_checkpoint(out / "model.ckpt")["state_dict"].items()
               if k.startswith("base.")}
    base = load_keras_weights(MobileNetV2Base(), out / "base.weights.h5")
    loaded = base.state_dict()
    keras_keys = {k for k in trained if not k.endswith("num_batches_tracked")}  # not a Keras weight
    assert keras_keys == {k for k in loaded if not k.endswith("num_batches_tracked")}
    assert_same_tensors({k: trained[k] for k in keras_keys}, {k: loaded[k] for k in keras_keys})
    # Not vacuous: fine-tuning moved the weights away from the demo's.
    assert not torch.equal(trained["Conv_1.weight"], demo_base_state["Conv_1.weight"])


# ---- 2.-4. BatchNorm, augmentation and optimizers in the real training loop ------------------

class Recorder(Callback):
    """Per training step: phase, optimizer and its parameters; the base's state after each
    phase's epoch; and every batch that reaches a step, by stage."""

    def __init__(self, module: TransferModule) -> None:
        self.steps: list[dict] = []
        self.after_epoch: dict[str, dict[str, torch.Tensor]] = {}
        self.batches: list[tuple[RunningStage, torch.Tensor]] = []
        self.base_inputs: list[tuple[RunningStage, torch.Tensor]] = []
        self.augment_calls: list[RunningStage] = []
        self.trainer: L.Trainer | None = None
        # The base as training runs it: folded (TransferModule.features).
        module.folded_base.register_forward_pre_hook(
            lambda _, args: self.base_inputs.append((self.trainer.state.stage, args[0].clone())))
        module.augment.register_forward_hook(
            lambda *_: self.augment_calls.append(self.trainer.state.stage))

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer

    def _batch(self, trainer, batch):
        images = batch[0] if isinstance(batch, list | tuple) else batch
        self.batches.append((trainer.state.stage, images.clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch(trainer, batch)
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps.append({
            "phase": pl_module.phase, "optimizer": type(optimizer),
            "lr": [group["lr"] for group in optimizer.param_groups],
            "params": [id(p) for p in params],
            "trainable": [id(p) for p in pl_module.parameters() if p.requires_grad],
        })

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._batch(trainer, batch)

    def on_train_epoch_end(self, trainer, pl_module):
        self.after_epoch[pl_module.phase] = {
            k: v.clone() for k, v in pl_module.state_dict().items()}


FINE_TUNE_LR = 3e-5  # given explicitly in the direct run (the CLI run checks the default)


@pytest.fixture(scope="module")
def loop_run(data_dir, demo_weights, demo_base_state) -> dict:
    """1 + 1 epochs of 2 batches on TransferModule + ImageFolderDataModule with Lightning's
    Trainer, then test and predict, everything recorded."""
    settings = Settings(data_dir=str(data_dir), weights="demo", image_size=SIZE, batch_size=BATCH,
                        initial_epochs=1, fine_tune_epochs=1, seed=SEED)
    L.seed_everything(SEED, verbose=False)
    data = ImageFolderDataModule(settings)
    module = TransferModule(build_base("demo", SIZE), learning_rate=LEARNING_RATE,
                            fine_tune_learning_rate=FINE_TUNE_LR, fine_tune_at=FINE_TUNE_AT,
                            seed=SEED)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    recorder = Recorder(module)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=2, limit_val_batches=1,
                        callbacks=[TwoPhaseFineTuning(1), recorder])
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    trainer.predict(module, dataloaders=data.test_dataloader())
    return {"module": module, "before": before, "recorder": recorder}


def base_layers(module: TransferModule, keras_type: str):
    return [layer for layer in module.base.keras_layers if layer.type == keras_type]


def test_batchnorm_statistics_never_move(loop_run):
    module, before, after = loop_run["module"], loop_run["before"], loop_run["recorder"].after_epoch
    assert set(after) == {"feature_extraction", "fine_tuning"}
    bns = base_layers(module, "BatchNormalization")
    assert len(bns) == 52
    for phase in after:
        for layer in bns:
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"base.{layer.name}.{buffer}"
                assert torch.equal(after[phase][key], before[key]), (phase, key)


def test_feature_extraction_changes_only_the_head(loop_run):
    before, after = loop_run["before"], loop_run["recorder"].after_epoch["feature_extraction"]
    base_keys = [k for k in before if k.startswith("base.")]
    assert_same_tensors({k: after[k] for k in base_keys}, {k: before[k] for k in base_keys})
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert not torch.equal(after["classifier.bias"], before["classifier.bias"])


def test_fine_tuning_trains_from_fine_tune_at(loop_run):
    module, before = loop_run["module"], loop_run["before"]
    a = loop_run["recorder"].after_epoch["feature_extraction"]
    b = loop_run["recorder"].after_epoch["fine_tuning"]
    changed, unchanged = [], []
    for layer in module.base.keras_layers:
        if layer.type not in ("BatchNormalization", "Conv2D", "DepthwiseConv2D"):
            continue
        for name in ("weight", "bias") if layer.type == "BatchNormalization" else ("weight",):
            key = f"base.{layer.name}.{name}"
            assert torch.equal(a[key], before[key])
            (changed if not torch.equal(b[key], a[key]) else unchanged).append(
                (layer.index, key))
    # Keras layer 100 is block_11_expand_relu; the first weights from there on are block_11's.
    assert {i for i, _ in changed} == {layer.index for layer in module.base.keras_layers
                                       if layer.has_weights and layer.index >= FINE_TUNE_AT}
    assert all(i < FINE_TUNE_AT for i, _ in unchanged)
    assert not torch.equal(b["classifier.weight"], a["classifier.weight"])


def test_optimizer_per_phase(loop_run):
    module, steps = loop_run["module"], loop_run["recorder"].steps
    assert [s["phase"] for s in steps] == ["feature_extraction"] * 2 + ["fine_tuning"] * 2
    for step in steps:
        adam = step["phase"] == "feature_extraction"
        assert step["optimizer"] is (KerasAdam if adam else KerasRMSprop)
        assert step["lr"] == [LEARNING_RATE if adam else FINE_TUNE_LR]
        # Exactly the trainable parameters, each once.
        assert len(step["params"]) == len(set(step["params"])) == len(step["trainable"])
        assert set(step["params"]) == set(step["trainable"])
    n_params = {step["phase"]: sum(p.numel() for p in module.parameters() if id(p) in
                                   set(step["params"])) for step in steps}
    assert n_params == {phase: COUNTS[phase]["trainable"] for phase in COUNTS}


def test_augmentation_only_in_training_steps(loop_run):
    recorder, module = loop_run["recorder"], loop_run["module"]
    stages = [stage for stage, _ in recorder.batches]
    assert stages.count(RunningStage.TRAINING) == 4
    assert stages.count(RunningStage.VALIDATING) == 2
    assert stages.count(RunningStage.TESTING) == 1 and stages.count(RunningStage.PREDICTING) == 1
    assert recorder.augment_calls == [RunningStage.TRAINING] * 4
    # One base call per step; the base sees the batch preprocessed, augmented in training only.
    assert [s for s, _ in recorder.base_inputs] == stages
    for (stage, images), (_, base_input) in zip(recorder.batches, recorder.base_inputs,
                                                strict=True):
        plain = module.base.preprocess(images)
        if stage == RunningStage.TRAINING:
            assert base_input.shape == plain.shape and not torch.equal(base_input, plain)
        else:
            assert torch.equal(base_input, plain), stage


def test_augmentation_is_identity_in_eval_mode():
    module = TransferModule(build_base("none", SIZE), seed=SEED)
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 255
    module.eval()
    assert module.augment(images, generator=torch.Generator().manual_seed(1)) is images
    module.train()
    assert not torch.equal(module.augment(images, generator=torch.Generator().manual_seed(1)),
                           images)


@pytest.mark.slow
def test_checkpoint_holds_the_fine_tuning_optimizer(finished_run):
    """The CLI's default fine-tuning rate is a tenth of --learning-rate, over the trainable
    parameters (the optimizer state saved in model.ckpt is RMSprop's)."""
    out, _ = finished_run
    checkpoint = load_checkpoint(out / "model.ckpt")
    assert checkpoint["phase"] == "fine_tuning"
    assert checkpoint["hyper_parameters"]["fine_tune_learning_rate"] == LEARNING_RATE / 10
    (state,) = checkpoint["optimizer_states"]
    (group,) = state["param_groups"]
    assert group["lr"] == LEARNING_RATE / 10 and group["rho"] == 0.9
    trainable = [k for k in checkpoint["state_dict"] if k.endswith((".weight", ".bias")) and
                 (k.startswith("classifier.") or k.split(".")[1] in TRAINABLE_B_LAYERS)]
    assert len(group["params"]) == len(trainable)
    assert all(set(s) == {"velocity"} for s in state["state"].values())  # RMSprop's, not Adam's


# ---- 5. resume after kill -9 -----------------------------------------------------------------

#: Where the runs are stopped (0-based epoch, batch about to start), 2 + 2 epochs of 2 batches,
#: and how: SIGKILL, or SIGINT (Ctrl-C), after which the step under way ends and the run stops.
KILL_POINTS = {
    # in epoch 4 (phase B) after its first step: last.ckpt holds epoch 3
    "in-fine-tuning": ("3,1", signal.SIGKILL),
    # as epoch 3 starts, the phase switched in memory only: last.ckpt holds epoch 2
    "at-phase-boundary": ("2,0", signal.SIGKILL),
    # Ctrl-C in epoch 4 (phase B) after its first step: its second step runs, then the run
    # stops; last.ckpt holds epoch 3
    "ctrl-c-in-fine-tuning": ("3,1", signal.SIGINT),
    # the same with SIGTERM, which Lightning handles too: whichever stops first, one line, 143
    "sigterm-in-fine-tuning": ("3,1", signal.SIGTERM),
}


@pytest.fixture(scope="module")
def killed_runs(data_dir, hooked_train, demo_weights, tmp_path_factory,
                kill_when_paused) -> dict[str, Path]:
    """The runs of KILL_POINTS, started together (their imports overlap) and each killed with
    SIGKILL, or sent SIGINT, at its pause point; their output folders."""
    root = tmp_path_factory.mktemp("killed")
    procs = {name: start_paused_run(hooked_train, run_args(data_dir, root / name), pause_at,
                                    root / f"{name}.marker", root / f"{name}.log")
             for name, (pause_at, _) in KILL_POINTS.items()}
    try:
        for name, proc in procs.items():
            marker, log = root / f"{name}.marker", root / f"{name}.log"
            if KILL_POINTS[name][1] == signal.SIGKILL:
                kill_when_paused(proc, marker, log, SUBPROCESS_TIMEOUT_S)
            else:
                interrupt_when_paused(proc, marker, log, KILL_POINTS[name][1])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: root / name for name in KILL_POINTS}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "saved_epoch", "phase", "optimizer_keys"), [
    ("in-fine-tuning", 2, "fine_tuning", {"velocity"}),
    ("at-phase-boundary", 1, "feature_extraction", {"step", "momentum", "velocity"}),
    ("ctrl-c-in-fine-tuning", 2, "fine_tuning", {"velocity"}),
    ("sigterm-in-fine-tuning", 2, "fine_tuning", {"velocity"}),
])
def test_resume_after_kill_equals_uninterrupted_run(finished_run, killed_runs, data_dir, capsys,
                                                    name, saved_epoch, phase, optimizer_keys):
    reference, reference_doc = finished_run
    out = killed_runs[name]
    argv = run_args(data_dir, out)

    # What the kill left: the checkpoint of the last finished epoch, no finished run.
    assert not (out / "metrics.json").exists() and not (out / "model.ckpt").exists()
    saved = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert (saved["epoch"], saved["global_step"], saved["phase"]) == (
        saved_epoch, 2 * (saved_epoch + 1), phase)
    (group,) = saved["optimizer_states"][0]["param_groups"]
    assert group["lr"] == (LEARNING_RATE if phase == "feature_extraction" else LEARNING_RATE / 10)
    assert {k for s in saved["optimizer_states"][0]["state"].values() for k in s} == optimizer_keys

    # 6. An unfinished run is not reused without --resume, and nothing in it changes. A killed
    # run left its lock file (not the lock: the kernel dropped it): taken over with a warning,
    # and removed when this run ends; a run stopped by SIGINT removed it itself.
    killed = KILL_POINTS[name][1] == signal.SIGKILL
    assert (out / LOCK_FILE).exists() == killed
    before = file_snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 + killed and "holds an unfinished run" in err[-1] and "--resume" in err[-1]
    if killed:
        assert err[0].startswith(f"warning: taking over {out / LOCK_FILE}: its owner (pid ")
    before.pop(LOCK_FILE, None)
    assert file_snapshot(out) == before

    doc = train.main([*argv, "--resume"])
    assert doc["history"] == reference_doc["history"]  # floats compared exactly
    assert doc["test"] == reference_doc["test"]
    resumed, uninterrupted = (load_checkpoint(d / "model.ckpt") for d in (out, reference))
    assert (resumed["epoch"], resumed["global_step"]) == (uninterrupted["epoch"], 8)
    assert_same_tensors(resumed["state_dict"], uninterrupted["state_dict"])
    assert_same_optimizer_state(resumed["optimizer_states"][0],
                                uninterrupted["optimizer_states"][0])


def assert_same_as_reference(doc: dict, out: Path, finished_run) -> None:
    """A resumed run ended as the uninterrupted reference did: history and test numbers
    (floats exactly), weights and optimizer state bitwise, the same epoch and step."""
    reference, reference_doc = finished_run
    assert doc["history"] == reference_doc["history"] and doc["test"] == reference_doc["test"]
    resumed, uninterrupted = (load_checkpoint(d / "model.ckpt") for d in (out, reference))
    assert (resumed["epoch"], resumed["global_step"]) == (uninterrupted["epoch"], 8)
    assert_same_tensors(resumed["state_dict"], uninterrupted["state_dict"])
    assert_same_optimizer_state(resumed["optimizer_states"][0],
                                uninterrupted["optimizer_states"][0])


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_full_disk_then_resume_when_space_returns(finished_run, data_dir, tmp_path, monkeypatch,
                                                  fill_disk, capsys):
    """The checkpoint of epoch 3 finds the disk full: one line, last.ckpt still that of epoch 2
    (loadable, plain data). --resume with another learning rate is refused in one line. Resumed,
    the run then finds the disk full at metrics.json; resumed again, it ends as the
    uninterrupted run."""
    out = tmp_path / "out"
    argv = run_args(data_dir, out)
    last = out / "checkpoints" / "last.ckpt"
    save = train.AtomicCheckpointIO.save_checkpoint

    def save_on_a_full_disk(self, checkpoint, path, storage_options=None):
        if checkpoint["epoch"] == 2:   # 0-based: the first epoch of fine-tuning
            with pytest.MonkeyPatch.context() as m:
                fill_disk(m, ".last.ckpt.")
                return save(self, checkpoint, path, storage_options)
        return save(self, checkpoint, path, storage_options)

    with monkeypatch.context() as m:
        m.setattr(train.AtomicCheckpointIO, "save_checkpoint", save_on_a_full_disk)
        with pytest.raises(SystemExit):
            run_main(train.main, argv)
    assert error_lines(capsys) == [
        f"error: disk full while writing {last} (No space left on device); the files already "
        "there are unchanged: free some space and run again (with --resume for an unfinished "
        "training run)"]
    assert train.read_checkpoint(last)["epoch"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert not (out / LOCK_FILE).exists()   # released on the way out

    before = file_snapshot(out)
    with pytest.raises(SystemExit):
        run_main(train.main, [*run_args(data_dir, out), "--resume", "--learning-rate", "0.001"])
    assert error_lines(capsys) == [
        f"error: cannot resume {out}: --fine-tune-learning-rate changed (2e-05 -> 0.0001), "
        "--learning-rate changed (0.0002 -> 0.001); run with the recorded settings (in "
        "run_settings.json), or use --overwrite to start over"]
    assert file_snapshot(out) == before

    with monkeypatch.context() as m:
        fill_disk(m, ".metrics.json.")
        with pytest.raises(SystemExit):
            run_main(train.main, [*argv, "--resume"])
    assert error_lines(capsys) == [
        f"error: disk full while writing {out / 'metrics.json'} (No space left on device); the "
        "files already there are unchanged: free some space and run again (with --resume for "
        "an unfinished training run)"]
    assert not (out / "metrics.json").exists()

    assert_same_as_reference(train.main([*argv, "--resume"]), out, finished_run)


@pytest.mark.slow
def test_data_that_changes_mid_run_is_one_line_and_resumable(finished_run, data_dir, tmp_path,
                                                               monkeypatch, capsys):
    """Images decoded every epoch (the path of data too large to keep decoded): the training
    images replaced by bad files after epoch 1, then the whole data folder gone after epoch 3;
    each time one line, last.ckpt kept; with the data back, --resume ends as the uninterrupted
    run."""
    monkeypatch.setattr(tl_torch.data, "CACHE_BUDGET_BYTES", 0)  # decoded by threads
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(data_dir, data)
    argv = run_args(data, out)
    history_end = train.KerasHistory.on_train_epoch_end
    changes = {}

    def change_data_after_epoch(self, trainer, pl_module):
        history_end(self, trainer, pl_module)
        if trainer.current_epoch in changes:
            changes.pop(trainer.current_epoch)()

    def corrupt_training_images():
        for image in (data / "train").rglob("*.jpg"):
            image.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG any more")

    monkeypatch.setattr(train.KerasHistory, "on_train_epoch_end", change_data_after_epoch)
    changes[0] = corrupt_training_images
    with pytest.raises(SystemExit):
        run_main(train.main, argv)
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {data}/train/") and "cannot be read any more (" in line
    assert line.endswith("restore it, then rerun with --resume to continue from the last "
                         "finished epoch")
    assert train.read_checkpoint(out / "checkpoints" / "last.ckpt")["epoch"] == 0

    shutil.rmtree(data)
    shutil.copytree(data_dir, data)
    changes[2] = lambda: data.rename(tmp_path / "moved away")
    with pytest.raises(SystemExit):
        run_main(train.main, [*argv, "--resume"])
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {data}/train/") and "(No such file or directory)" in line
    assert train.read_checkpoint(out / "checkpoints" / "last.ckpt")["epoch"] == 2

    (tmp_path / "moved away").rename(data)
    assert_same_as_reference(train.main([*argv, "--resume"]), out, finished_run)


# ---- 6. outputs protection -------------------------------------------------------------------

@pytest.mark.slow
def test_finished_run_is_refused_and_untouched(finished_run, data_dir, capsys):
    out, _ = finished_run
    before = file_snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        run_main(train.main, run_args(data_dir, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "already holds a finished run" in err[0] and "--overwrite" in err[0]
    assert file_snapshot(out) == before


@pytest.mark.slow
def test_resume_on_empty_folder_starts_afresh(data_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    doc = train.main(run_args(data_dir, out, "--resume", epochs=(1, 1), limit=1))
    assert "nothing to resume" in capsys.readouterr().out
    assert doc["status"] == "complete"
    assert [(h["epoch"], h["phase"]) for h in doc["history"]] == [
        (1, "feature_extraction"), (2, "fine_tuning")]


# ---- 7. predict ------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_prints_class_and_probability(finished_run, data_dir, capsys):
    out, doc = finished_run
    one_file = data_dir / "train" / "dogs" / "dog.0.jpg"
    folder = data_dir / "validation"
    run_main(predict.main, [str(out), str(one_file), str(folder)])
    lines = capsys.readouterr().out.strip().splitlines()
    paths = [one_file, *sorted(folder.rglob("*.jpg"))]
    assert len(lines) == 1 + 12
    printed = [line.split("\t") for line in lines]
    assert [Path(p) for p, _, _ in printed] == paths

    module, class_names, image_size = predict.load_run(out)
    assert class_names == tuple(doc["data"]["class_names"]) and image_size == SIZE
    with torch.no_grad():
        logits = module(load_images([str(p) for p in paths], SIZE))
    for (_, name, prob), logit in zip(printed, logits.tolist(), strict=True):
        assert name == class_names[int(logit > 0)]
        assert 0.5 <= float(prob) <= 1
        assert float(prob) == pytest.approx(torch.sigmoid(torch.tensor(abs(logit))).item(),
                                            abs=PRINTED_PROB_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("bias", [1e-9, -1e-9, 0.0])
def test_predict_class_follows_the_logit_sign_near_zero(finished_run, data_dir, bias):
    """sigmoid(±1e-9) is exactly 0.5 in float32: the class must still follow the logit's sign,
    as the accuracy metric (logit > 0) counts it."""
    module, class_names, _ = predict.load_run(finished_run[0])
    with torch.no_grad():
        module.classifier.weight.zero_()
        module.classifier.bias.fill_(bias)
    ((_, name, prob),) = predict.predict(module, [data_dir / "train" / "cats" / "cat.0.jpg"],
                                         class_names, SIZE)
    assert (name, prob) == (class_names[int(bias > 0)], 0.5)


@pytest.mark.slow
@pytest.mark.parametrize(("inputs", "expected"), [
    (["missing.jpg"], "missing.jpg is neither an image file nor a folder"),
    (["EMPTY"], "no images"),
])
def test_predict_bad_paths_are_one_line(finished_run, tmp_path, capsys, inputs, expected):
    (tmp_path / "EMPTY").mkdir()
    argv = [str(finished_run[0]), *(str(tmp_path / i) for i in inputs)]
    with pytest.raises(SystemExit) as exit_info:
        run_main(predict.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_predict_needs_a_run_folder(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(predict.main, [str(tmp_path), str(data_dir / "validation")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no model.ckpt" in err[0], err


#: What a checkpoint holds beyond the training settings, so that it alone rebuilds the model.
MODEL_HPARAMS = ("base_config", "class_names", "image_size", "weights")


@pytest.mark.slow
def test_model_ckpt_alone_rebuilds_the_model(finished_run, data_dir, tmp_path, capsys):
    out, doc = finished_run
    # Plain data only: readable without unpickling arbitrary objects.
    hparams = torch.load(out / "model.ckpt", map_location="cpu", weights_only=True)[
        "hyper_parameters"]
    assert hparams["base_config"] == base_config("demo") == {
        "pad_type": "same", "bn_eps": 1e-3, "preprocessing": "keras"}
    assert (hparams["class_names"], hparams["image_size"], hparams["weights"]) == (
        doc["data"]["class_names"], SIZE, "demo")

    alone = tmp_path / "alone"  # model.ckpt, and no metrics.json beside it
    alone.mkdir()
    (alone / "model.ckpt").write_bytes((out / "model.ckpt").read_bytes())
    folder = str(data_dir / "validation")
    run_main(predict.main, [str(out), folder])
    from_run = capsys.readouterr().out
    run_main(predict.main, [str(alone), folder])
    assert capsys.readouterr().out.replace(str(alone), str(out)) == from_run
    assert len(from_run.splitlines()) == 12

    module = TransferModule.load_from_checkpoint(alone / "model.ckpt", map_location="cpu",
                                                 weights_only=True)
    assert_same_tensors(module.state_dict(), load_checkpoint(out / "model.ckpt")["state_dict"])
    base = module.base
    assert (base.pad_type, base.bn_eps, base.preprocessing) == ("same", 1e-3, "keras")
    assert {m.eps for m in base.batchnorms()} == {1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["demo", "torchvision"])
def test_old_checkpoint_takes_its_settings_from_metrics_json(finished_run, tmp_path, source):
    """A model.ckpt from before it held its model's settings: metrics.json beside it still
    decides the base, the class names and the image size."""
    out, doc = finished_run
    checkpoint = load_checkpoint(out / "model.ckpt")
    for key in MODEL_HPARAMS:
        del checkpoint["hyper_parameters"][key]
    old = tmp_path / "old"
    old.mkdir()
    torch.save(checkpoint, old / "model.ckpt")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["weights"]["source"] = source
    (old / "metrics.json").write_text(json.dumps(metrics))

    module, class_names, image_size = predict.load_run(old)
    assert (class_names, image_size) == (tuple(doc["data"]["class_names"]), SIZE)
    want = base_config(source)
    assert want["pad_type"] == ("symmetric" if source == "torchvision" else "same")
    assert (module.base.pad_type, module.base.bn_eps, module.base.preprocessing) == tuple(
        want.values())
    assert {m.eps for m in module.base.batchnorms()} == {want["bn_eps"]}
    assert_same_tensors(module.state_dict(), checkpoint["state_dict"])

    (old / "metrics.json").unlink()
    with pytest.raises(UserError, match="metrics.json"):
        predict.load_run(old)


def test_checkpoint_keeps_torchvision_settings(tmp_path):
    """A base with torchvision's numerics comes back with them (symmetric padding, BatchNorm
    eps 1e-5, ImageNet mean/std), not with the Keras defaults of an empty base."""
    generator = torch.Generator().manual_seed(0)
    base = MobileNetV2Base(**base_config("torchvision"))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.1, generator=generator)
    module = TransferModule(base, fast=False, num_classes=3, class_names=["a", "b", "c"],
                            image_size=SIZE)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, tmp_path / "m.ckpt")
    loaded = TransferModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.hparams.class_names == ["a", "b", "c"]
    assert (loaded.base.pad_type, loaded.base.preprocessing) == ("symmetric", "torchvision")
    assert {m.eps for m in loaded.base.batchnorms()} == {1e-5}
    images = torch.rand(2, 3, SIZE + 1, SIZE + 1, generator=generator) * 255
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), module.eval()(images))
    with pytest.raises(ValueError, match="names 2 classes"):
        TransferModule(MobileNetV2Base(), num_classes=3, class_names=["a", "b"])


# ---- 8. DDP on two CPU processes -------------------------------------------------------------

@pytest.mark.long
@pytest.mark.slow
def test_ddp_two_processes(data_dir, hooked_train, tmp_path, demo_base_state):
    """Both processes end with the same weights (each saves its own state_dict when fit ends,
    through the hook), rank 0 writes the outputs once, and the metrics are those of the whole
    split: equal to one process evaluating the saved model."""
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    argv = [*run_args(data_dir, out, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                      epochs=(1, 1), limit=None)]
    result = subprocess.run([sys.executable, str(hooked_train), *argv], cwd=REPO,
                            env=subprocess_env(TL_TEST_DUMP_DIR=str(dump)), capture_output=True,
                            text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("outputs in ") == 1

    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert_same_tensors(rank0, rank1)
    checkpoint = load_checkpoint(out / "model.ckpt")
    assert_same_tensors(rank0, checkpoint["state_dict"])
    # Not vacuous: both phases trained (the ranks saw different shards and dropout masks, so
    # equal weights need synchronised gradients, also for the layers unfrozen in phase B).
    assert not torch.equal(rank0["base.Conv_1.weight"], demo_base_state["Conv_1.weight"])
    assert torch.equal(rank0["base.Conv1.weight"], demo_base_state["Conv1.weight"])

    doc = read_metrics(out)
    assert doc["status"] == "complete" and doc["settings"]["devices"] == "2"
    assert [(h["epoch"], h["phase"]) for h in doc["history"]] == [
        (1, "feature_extraction"), (2, "fine_tuning")]
    assert not list(out.glob(".metrics.json.*"))  # no second, half-written copy

    module, class_names, _ = predict.load_run(out)
    splits = load_splits(data_dir, 0.2, SEED)
    for split, metrics in (("validation", doc["history"][-1]), ("test", doc["test"])):
        files = splits[split]
        assert len(files) == SPLIT_SIZES[split]
        with torch.no_grad():
            logits = module(load_images(files.paths, SIZE))
        labels = torch.tensor(files.labels, dtype=torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
        accuracy = ((logits > 0).float() == labels).float().mean().item()
        prefix = "val_" if split == "validation" else ""
        got_loss = metrics[f"{prefix}loss"]
        got_accuracy = metrics["val_accuracy" if prefix else "accuracy"]
        assert got_loss == pytest.approx(loss, rel=DDP_LOSS_RTOL), split
        assert got_accuracy == pytest.approx(accuracy, abs=ACCURACY_ATOL), split


def test_ddp_rewrap_uses_what_lightning_has():
    """:func:`tl_torch.module.rewrap_ddp` relies on DDPStrategy's ``model`` setter and on
    ``configure_ddp()`` wrapping ``self.model`` afresh; this fails when Lightning changes them
    (the DDP test above shows the consequence: unfrozen layers that drift apart)."""
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    model = inspect.getattr_static(DDPStrategy, "model")
    assert isinstance(model, property) and model.fset is not None
    assert list(inspect.signature(DDPStrategy.configure_ddp).parameters) == ["self"]
    assert "self.model = self._setup_model(self.model)" in inspect.getsource(
        DDPStrategy.configure_ddp)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert rewrap_ddp(trainer) is False   # nothing to rewrap on one process


# ---- 9. determinism --------------------------------------------------------------------------

@pytest.mark.slow
def test_same_seed_same_run(finished_run, data_dir, tmp_path):
    reference, reference_doc = finished_run
    doc = train.main(run_args(data_dir, tmp_path / "again"))
    assert doc["history"] == reference_doc["history"] and doc["test"] == reference_doc["test"]
    again, first = (load_checkpoint(d / "model.ckpt") for d in (tmp_path / "again", reference))
    assert_same_tensors(again["state_dict"], first["state_dict"])
