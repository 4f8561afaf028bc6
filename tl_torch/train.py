"""The recipe in PyTorch Lightning: feature extraction, then fine-tuning from Keras layer 100.

Run ``python -m tl_torch.train --demo --output-dir runs/torch-demo`` (offline), or
``python -m tl_torch.train`` for cats_and_dogs_filtered with the ImageNet weights (online).
The flags are ``tl_keras.train``'s (see ``--help``; ``--config exp.yaml`` drives either trainer)
plus Lightning's ``--accelerator``, ``--devices``, ``--strategy`` and ``--precision``; e.g.
``--accelerator cpu --devices 2 --strategy ddp`` trains in two processes.

Outputs in ``--output-dir``, in the Keras reference's schema: ``metrics.json``,
``learning_curves.png``, ``layer_table.csv``; plus ``model.ckpt`` (the trained Lightning
checkpoint), ``base.weights.h5`` (the fine-tuned base as a Keras weights file), ``checkpoints/
last.ckpt`` (for ``--resume``), ``logs/`` (Lightning's CSV log) and ``bad_images.txt`` when some
files cannot be read (the run stops before training, or with ``--skip-bad-images`` trains
without them). Every file is written beside its name and renamed over it, so a killed run leaves
the last complete version or none; ``metrics.json`` is written last and marks a finished run.

While it runs the folder is locked (``run.lock``: a second run there stops with one line);
``run_settings.json`` records the settings that ``--resume`` must find unchanged. Ctrl-C or
SIGTERM stops the run after the current step with one line (exit 130 / 143); ``--resume`` then
continues from the last finished epoch, as after a kill (see :mod:`tl_common.interrupts`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tl_common.data import check_data_dir, check_output_dir_placement
from tl_common.errors import non_finite_loss, run_main
from tl_common.files import BAD_IMAGES_FILE, describe_bad_images
from tl_common.interrupts import StopRequests
from tl_common.lock import OutputLock
from tl_common.outputs import (
    RunDir,
    finish_run,
    format_counts,
    history_entry,
    removed_if_unused,
)
from tl_common.resume import RECORD_FILE, ResumeRecord, recorded_inputs, recorded_settings
from tl_common.settings import Settings, build_parser, naming_flag, parse, settings_from
from tl_common.weights import weights_record
from tl_torch.checkpoint import (  # noqa: F401  (the checkpoint names, importable from here)
    BASE_WEIGHTS_FILE,
    LAST_CHECKPOINT,
    MODEL_FILE,
    AtomicCheckpointIO,
    read_checkpoint,
)
from tl_torch.console import EpochFromOneBar, InferenceModeNote, quiet_lightning
from tl_torch.data import ImageFolderDataModule, load_images
from tl_torch.freezing import layer_table
from tl_torch.keras_weights import save_keras_weights
from tl_torch.module import TransferModule, TwoPhaseFineTuning
from tl_torch.runtime import bf16_cost_warning, keep_freed_memory
from tl_torch.weights import build_base

#: What the one line says after Ctrl-C or SIGTERM.
INTERRUPTED = ("rerun with --resume to continue from the last finished epoch "
               "(checkpoints/last.ckpt)")


class KerasHistory(Callback):
    """``History`` as Keras' ``fit`` returns it: per epoch, the training metrics averaged over
    the epoch and the validation metrics computed after it; kept in checkpoints for --resume."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.seconds = {"feature_extraction": 0.0, "fine_tuning": 0.0}
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: TransferModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: TransferModule) -> None:
        logs = {k: float(v) for k, v in trainer.callback_metrics.items()}
        entry = history_entry(trainer.current_epoch + 1, pl_module.phase, logs)
        self.history = [h for h in self.history if h["epoch"] != entry["epoch"]] + [entry]
        self.seconds[pl_module.phase] += time.perf_counter() - self._start

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history, self.seconds = state_dict["history"], state_dict["seconds"]


class StopOnNonFiniteLoss(Callback):
    """Keras' ``TerminateOnNaN`` for the port: the run stops with one line at the first training
    step whose loss is NaN or infinite, before the epoch's checkpoint saves the broken weights.
    Under DDP every process learns that one of them saw it, so all stop together."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            value = float(loss.detach()) if not torch.isfinite(loss.detach()).all() else "non-finite"
            raise non_finite_loss(value, trainer.current_epoch + 1, batch_idx + 1)


class StopOnRequest(Callback):
    """Ends training at a safe point after Ctrl-C or SIGTERM (:mod:`tl_common.interrupts`): after
    the current training step, or validation batch, never inside a step or a checkpoint write.
    Under DDP every process learns after each step that one of them was asked, so that all stop
    after the same step."""

    def __init__(self, stop: StopRequests) -> None:
        self.stop = stop

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        requested = self.stop.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            raise self.stop.error(self.stop.signum or signal.SIGTERM)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # Alone only: DDP's validation shards may differ in length, a collective here could hang.
        if trainer.world_size == 1:
            self.stop.check()


def build_arg_parser():
    parser = build_parser("torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", type=str, default="auto",
                        help="Lightning accelerator: cpu, gpu, auto...")
    parser.add_argument("--devices", type=str, default="auto",
                        help="Lightning devices: a count, a list, or auto")
    parser.add_argument("--strategy", type=str, default="auto",
                        help="Lightning strategy: auto, ddp, ddp_spawn...")
    parser.add_argument("--precision", type=str, default="32-true",
                        help="Lightning precision: 32-true (the Keras reference's); bf16-mixed "
                             "and 16-mixed change the numbers")
    return parser


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the recipe; return the metrics.json document (None on DDP's other processes)."""
    ns = parse(build_arg_parser(), argv)
    settings = settings_from(ns, "torch")
    check_output_dir_placement(settings)
    quiet_lightning()
    keep_freed_memory()  # large activations reuse freed memory: see tl_torch/runtime.py
    if (warning := bf16_cost_warning(ns.precision, ns.accelerator)) and rank_zero_only.rank == 0:
        print(warning, file=sys.stderr)
    run_dir = RunDir(Path(settings.output_dir))
    with contextlib.ExitStack() as stack:
        lock = None
        if rank_zero_only.rank == 0:  # DDP's other processes rerun this script: rank 0 owns it
            # Left last: a run that fails before writing anything removes the folder it made.
            stack.enter_context(removed_if_unused(run_dir.create()))
            lock = stack.enter_context(OutputLock(run_dir.path))
        stop = stack.enter_context(StopRequests(INTERRUPTED,
                                                on_abort=lock.release if lock else None))
        return run(settings, ns, run_dir, stop)


def run(settings: Settings, ns: Any, run_dir: RunDir, stop: StopRequests
        ) -> dict[str, Any] | None:
    """The recipe in a locked output folder, Ctrl-C and SIGTERM handled by ``stop``."""
    last = run_dir.path / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"
    record = ResumeRecord(run_dir.path)
    resuming = settings.resume and last.exists()
    current = recorded_settings(settings, accelerator=ns.accelerator, devices=ns.devices,
                                strategy=ns.strategy, precision=ns.precision)
    if rank_zero_only.rank == 0:  # the checks are rank 0's
        prepare_output_dir(run_dir, settings, has_state=last.exists())
        if resuming:
            if not record.check("settings", current):
                print(f"warning: {record.path} is missing: the settings of the run being resumed "
                      "cannot be compared with these", file=sys.stderr)
            read_checkpoint(last)  # plain data, before any work: see AtomicCheckpointIO
    started = time.perf_counter()
    L.seed_everything(settings.seed, workers=True, verbose=False)
    check_data_dir(settings)  # a mistyped --data-dir is the error to see, not a failed download

    # The base first: a weights file that does not fit stops the run before the data is read.
    with naming_flag("weights", settings.weights_source):
        base = build_base(settings.weights_source, settings.image_size,
                          generator=torch.Generator().manual_seed(settings.seed))
        # Now, not after training: nothing about the weights file can fail once it is done.
        weights = weights_record(settings.weights_source, settings.image_size)
    data = load_data(settings, run_dir)
    splits = data.splits
    if rank_zero_only.rank == 0:
        inputs = recorded_inputs(weights, splits.summary())
        if not (resuming and record.check("inputs", inputs)):
            record.write(current, inputs)
    module = TransferModule(base, learning_rate=settings.learning_rate,
                            fine_tune_learning_rate=settings.fine_tuning_lr,
                            fine_tune_at=settings.fine_tune_at, dropout=settings.dropout,
                            seed=settings.seed, num_classes=len(splits.class_names),
                            # model.ckpt then rebuilds the model alone (tl_torch.predict)
                            class_names=splits.class_names, image_size=settings.image_size)
    counts, table = phase_counts(module)
    rank_zero_only(print)(format_counts("feature_extraction", **counts["feature_extraction"]))

    history = KerasHistory()
    if settings.resume and not resuming:
        rank_zero_only(print)(f"nothing to resume in {run_dir.path}: starting a new run")
    trainer = build_trainer(settings, ns, run_dir, history, stop)
    with stop.deferred():
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(last) if resuming else None,
                        weights_only=True)
        except SIGTERMException:  # Lightning's own SIGTERM handling stopped first
            raise stop.error(signal.SIGTERM) from None
    test_started = time.perf_counter()
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    test_seconds = time.perf_counter() - test_started
    test = {"loss": float(test["test_loss"]), "accuracy": float(test["test_accuracy"])}
    rank_zero_only(print)(f"test loss {test['loss']:.4f}  test accuracy {test['accuracy']:.4f}")
    trainer.save_checkpoint(run_dir.path / MODEL_FILE, weights_only=False)  # with the optimizer
    if not trainer.is_global_zero:
        return None

    _print_predictions(module, splits.test.paths[: settings.batch_size], splits.class_names,
                       settings.image_size)
    save_keras_weights(module.base, run_dir.path / BASE_WEIGHTS_FILE)
    doc = finish_run(
        run_dir, framework="torch", table=table,
        curves_title=f"PyTorch port, {settings.weights_source} weights",
        versions={"torch": torch.__version__, "lightning": L.__version__},
        settings={**settings.to_dict(), "accelerator": ns.accelerator, "devices": ns.devices,
                  "strategy": ns.strategy, "precision": ns.precision},
        data=splits.summary(), weights=weights, counts=counts, history=history.history,
        test=test,
        timings={"feature_extraction_s": history.seconds["feature_extraction"],
                 "fine_tuning_s": history.seconds["fine_tuning"],
                 "test_s": test_seconds, "total_s": time.perf_counter() - started},
    )
    print(f"outputs in {run_dir.path}")
    return doc


def prepare_output_dir(run_dir: RunDir, settings: Settings, *, has_state: bool) -> None:
    """Refuse to reuse a folder against --resume/--overwrite; clear it for --overwrite."""
    run_dir.prepare(resume=settings.resume, overwrite=settings.overwrite, has_state=has_state)
    if settings.overwrite:  # metrics.json first: see RunDir.clear_outputs
        run_dir.clear_outputs(MODEL_FILE, BASE_WEIGHTS_FILE, BAD_IMAGES_FILE, RECORD_FILE,
                              "checkpoints", "logs")


def load_data(settings: Settings, run_dir: RunDir) -> ImageFolderDataModule:
    """The data module with its file lists read and checked (unreadable files reported)."""
    data = ImageFolderDataModule(settings)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # Once per machine. Under DDP Lightning starts the other processes in trainer.fit, when
        # this has run; launched by another tool (torchrun), prepare the data before it.
        data.prepare_data()
    data.setup()
    splits = data.splits
    if splits.skipped and rank_zero_only.rank == 0:
        print(f"warning: --skip-bad-images: left out "
              f"{describe_bad_images(splits.skipped, splits.root, run_dir.path / BAD_IMAGES_FILE)}",
              file=sys.stderr)
    rank_zero_only(print)(f"classes {list(splits.class_names)}: " + ", ".join(
        f"{split} {len(splits[split])}" for split in ("train", "validation", "test")))
    return data


def phase_counts(module: TransferModule) -> tuple[dict[str, dict[str, int]], list]:
    """Each phase's parameter counts, and the recipe's layer table (frozen for fine-tuning);
    leaves the module in feature extraction."""
    counts = {}
    for phase in ("fine_tuning", "feature_extraction"):
        module.set_phase(phase)
        counts[phase] = module.counts()
        if phase == "fine_tuning":
            table = layer_table(module.base)
    return counts, table


def build_trainer(settings: Settings, ns: Any, run_dir: RunDir, history: KerasHistory,
                  stop: StopRequests) -> L.Trainer:
    """Lightning's Trainer for both phases: phase switch, history, checkpoints for --resume,
    a stop at the next safe point on Ctrl-C or SIGTERM."""
    # None, not 1.0, without --limit-batches: Lightning notes every limit it is given.
    limit = settings.limit_batches
    return L.Trainer(
        max_epochs=settings.total_epochs,
        accelerator=ns.accelerator, devices=_devices(ns.devices), strategy=ns.strategy,
        precision=ns.precision,
        plugins=[AtomicCheckpointIO()],
        callbacks=[StopOnNonFiniteLoss(), StopOnRequest(stop),
                   TwoPhaseFineTuning(settings.initial_epochs, layer_table=run_dir.layer_table,
                                      print_layers=settings.print_layers), history,
                   EpochFromOneBar(), InferenceModeNote(),
                   # save_top_k=1 without a monitor: the latest epoch, overwritten each time
                   # (save_top_k=0 would save nothing at all).
                   ModelCheckpoint(dirpath=run_dir.path / "checkpoints", filename=LAST_CHECKPOINT,
                                   save_top_k=1, save_last=False, save_on_train_epoch_end=True,
                                   every_n_epochs=1, enable_version_counter=False)],
        logger=CSVLogger(run_dir.path, name="logs", version=""),
        limit_train_batches=limit, limit_val_batches=limit, limit_test_batches=limit,
        num_sanity_val_steps=0, enable_model_summary=False, log_every_n_steps=1,
        # The data module makes its samplers (seeded shuffling, evaluation shards that repeat no
        # image): Lightning must not replace them.
        use_distributed_sampler=False,
    )


def _print_predictions(module: TransferModule, paths: list[str], class_names: tuple[str, ...],
                       image_size: int) -> None:
    """The recipe's last step: the class of each image and its probability, by the accuracy's
    rule (:meth:`TransferModule.probabilities`: the logit's sign, or the largest logit)."""
    if not paths:
        return
    module.eval()
    with torch.no_grad():
        logits = module(load_images(paths, image_size).to(module.device))
    labels, probs = (t.tolist() for t in module.probabilities(logits))
    print("predictions on the first test batch (probability of the class predicted):")
    for path, label, p in zip(paths, labels, probs, strict=True):
        print(f"  {Path(path).name:32s} {class_names[label]:10s} {p:.4f}")


if __name__ == "__main__":
    run_main(main)
