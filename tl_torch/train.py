"""The recipe in PyTorch Lightning: feature extraction, then fine-tuning from Keras layer 100.

Run ``python -m tl_torch.train --demo --output-dir runs/torch-demo`` (offline), or
``python -m tl_torch.train`` for cats_and_dogs_filtered with the ImageNet weights (online).
The flags are ``tl_keras.train``'s (see ``--help``; ``--config exp.yaml`` drives either trainer)
plus Lightning's ``--accelerator``, ``--devices``, ``--strategy`` and ``--precision``; e.g.
``--accelerator cpu --devices 2 --strategy ddp`` trains in two processes, and ``--num-nodes N``
on N machines, started on each by torchrun or SLURM. ``--init-from`` starts from a trained
``model.ckpt`` (a converted Keras model, another run: :mod:`tl_torch.init_from`).

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

from tl_common.bases import BASES, DEFAULT_BASE
from tl_common.data import check_data_dir, check_output_dir_placement
from tl_common.errors import run_main
from tl_common.files import BAD_IMAGES_FILE, describe_bad_images
from tl_common.interrupts import StopRequests
from tl_common.lock import OutputLock, owns_output_dir
from tl_common.outputs import RunDir, finish_run, format_counts, removed_if_unused
from tl_common.resume import RECORD_FILE, ResumeRecord, recorded_inputs, recorded_settings
from tl_common.settings import Settings, build_parser, naming_flag, parse, settings_from
from tl_common.weights import weights_record
from tl_torch.run_files import BASE_WEIGHTS_FILE, LAST_CHECKPOINT, MODEL_FILE

#: What the one line says after Ctrl-C or SIGTERM.
INTERRUPTED = ("rerun with --resume to continue from the last finished epoch "
               "(checkpoints/last.ckpt)")
_ENGINE_LOADED = False


def load_engine() -> None:
    """Import Lightning, torch and the port into this module. Not at its top: they take seconds
    to load, and the command line, the paths and the output folder's lock are checked before
    (:func:`main`), so that a refusal comes at once. Names already set here (a test's
    replacement of one) are kept."""
    global _ENGINE_LOADED, L, torch, ModelCheckpoint, CSVLogger, rank_zero_only
    global SIGTERMException, AtomicCheckpointIO, KerasHistory, StopOnNonFiniteLoss
    global StopOnRequest, read_checkpoint, ImageFolderDataModule, load_images
    global bf16_cost_warning, keep_freed_memory, layer_table, save_keras_weights
    global TransferModule, TwoPhaseFineTuning, build_base, start_from
    global EpochFromOneBar, InferenceModeNote, quiet_lightning
    if _ENGINE_LOADED:
        return
    kept = {name: value for name, value in globals().items() if not name.startswith("__")}
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from tl_torch.callbacks import KerasHistory, StopOnNonFiniteLoss, StopOnRequest
    from tl_torch.checkpoint import AtomicCheckpointIO, read_checkpoint
    from tl_torch.console import EpochFromOneBar, InferenceModeNote, quiet_lightning
    from tl_torch.data import ImageFolderDataModule, load_images
    from tl_torch.freezing import layer_table
    from tl_torch.init_from import start_from
    from tl_torch.keras_weights import save_keras_weights
    from tl_torch.module import TransferModule, TwoPhaseFineTuning
    from tl_torch.runtime import bf16_cost_warning, keep_freed_memory
    from tl_torch.weights import build_base

    globals().update(kept)
    _ENGINE_LOADED = True


def __getattr__(name: str) -> Any:
    """``tl_torch.train.TransferModule`` and the engine's other names, read from outside: loaded
    on first use (:func:`load_engine`)."""
    if not name.startswith("__") and not _ENGINE_LOADED:
        load_engine()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    """Run the recipe; return the metrics.json document (None on DDP's other processes).

    The command line, the paths, the output folder's lock and --resume's record are checked
    before Lightning and torch load (seconds of imports): a refusal comes at once."""
    ns = parse(build_arg_parser(), argv)
    settings = settings_from(ns, "torch")
    check_output_dir_placement(settings)
    run_dir = RunDir(Path(settings.output_dir))
    with contextlib.ExitStack() as stack:
        lock = None
        # The run's first process owns the folder: DDP's others (Lightning reruns this script;
        # torchrun and SLURM start one per device) and those of other nodes leave it alone.
        if owns_output_dir():
            # Left last: a run that fails before writing anything removes the folder it made.
            stack.enter_context(removed_if_unused(run_dir.create()))
            lock = stack.enter_context(OutputLock(run_dir.path))
            check_output_dir(run_dir, settings, recorded(settings, ns))
        stop = stack.enter_context(StopRequests(INTERRUPTED,
                                                on_abort=lock.release if lock else None))
        load_engine()
        quiet_lightning()
        keep_freed_memory()  # large activations reuse freed memory: see tl_torch/runtime.py
        if (warning := bf16_cost_warning(ns.precision, ns.accelerator)) and lock is not None:
            print(warning, file=sys.stderr)
        return run(settings, ns, run_dir, stop)


def recorded(settings: Settings, ns: Any) -> dict[str, Any]:
    """What --resume must find unchanged (:mod:`tl_common.resume`), with Lightning's settings
    and the checkpoint a run started from."""
    init_from = settings.init_from and os.path.realpath(settings.init_from)
    return recorded_settings(settings, accelerator=ns.accelerator, devices=ns.devices,
                             strategy=ns.strategy, precision=ns.precision,
                             num_nodes=settings.num_nodes, init_from=init_from)


def last_checkpoint(run_dir: RunDir) -> Path:
    return run_dir.path / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"


def check_output_dir(run_dir: RunDir, settings: Settings, current: dict[str, Any]) -> None:
    """Refuse a folder that --resume/--overwrite do not fit, or a resume with other settings;
    clear it for --overwrite."""
    has_state = last_checkpoint(run_dir).exists()
    prepare_output_dir(run_dir, settings, has_state=has_state)
    record = ResumeRecord(run_dir.path)
    if settings.resume and has_state and not record.check("settings", current):
        print(f"warning: {record.path} is missing: the settings of the run being resumed "
              "cannot be compared with these", file=sys.stderr)


def run(settings: Settings, ns: Any, run_dir: RunDir, stop: StopRequests
        ) -> dict[str, Any] | None:
    """The recipe in a locked, checked output folder, Ctrl-C and SIGTERM handled by ``stop``."""
    last = last_checkpoint(run_dir)
    resuming = settings.resume and last.exists()
    if resuming and owns_output_dir():
        read_checkpoint(last)  # plain data, before any work: see AtomicCheckpointIO
    started = time.perf_counter()
    L.seed_everything(settings.seed, workers=True, verbose=False)
    check_data_dir(settings)  # a mistyped --data-dir is the error to see, not a failed download
    module, weights, data = start_module(settings, run_dir)
    splits = data.splits
    if owns_output_dir():
        record, inputs = ResumeRecord(run_dir.path), recorded_inputs(weights, splits.summary())
        if not (resuming and record.check("inputs", inputs)):
            record.write(recorded(settings, ns), inputs)
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
        curves_title=f"PyTorch port, {weights_title(settings)}",
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


def weights_title(settings: Settings) -> str:
    """The curves' title after "PyTorch port, ": the base when not the recipe's, the weights."""
    weights = (f"from {Path(settings.init_from).name}" if settings.init_from is not None
               else f"{settings.weights_source} weights")
    if settings.base == DEFAULT_BASE:
        return weights
    return f"{BASES[settings.base].keras_application}, {weights}"


def prepare_output_dir(run_dir: RunDir, settings: Settings, *, has_state: bool) -> None:
    """Refuse to reuse a folder against --resume/--overwrite; clear it for --overwrite."""
    run_dir.prepare(resume=settings.resume, overwrite=settings.overwrite, has_state=has_state)
    if settings.overwrite:  # metrics.json first: see RunDir.clear_outputs
        run_dir.clear_outputs(MODEL_FILE, BASE_WEIGHTS_FILE, BAD_IMAGES_FILE, RECORD_FILE,
                              "checkpoints", "logs")


def start_module(settings: Settings, run_dir: RunDir
                 ) -> tuple[TransferModule, dict[str, Any], ImageFolderDataModule]:
    """The module to train, the ``weights`` entry of metrics.json, and the data module. The
    weights first: a file that does not fit stops the run before the data is read."""
    if settings.init_from is not None:  # a trained model: its weights, this run's settings
        with naming_flag("init_from", settings.init_from):
            start = start_from(settings.init_from, settings.image_size)
            start.check_base(settings.base)
            data = load_data(settings, run_dir)
            module = start.module(**module_settings(settings, data.splits.class_names))
        return module, start.record(), data
    with naming_flag("weights", settings.weights_source):
        base = build_base(settings.weights_source, settings.image_size,
                          generator=torch.Generator().manual_seed(settings.seed),
                          base=settings.base)
        # Now, not after training: nothing about the weights file can fail once it is done.
        weights = weights_record(settings.weights_source, settings.image_size, settings.base)
    data = load_data(settings, run_dir)
    return TransferModule(base, **module_settings(settings, data.splits.class_names)), weights, data


def module_settings(settings: Settings, class_names: tuple[str, ...]) -> dict[str, Any]:
    """:class:`TransferModule`'s arguments from the settings and the data's classes; the class
    names and image size kept in model.ckpt, which then rebuilds the model alone (predict)."""
    return {"learning_rate": settings.learning_rate,
            "fine_tune_learning_rate": settings.fine_tuning_lr,
            "fine_tune_at": settings.fine_tune_at, "dropout": settings.dropout,
            "seed": settings.seed, "num_classes": len(class_names), "class_names": class_names,
            "image_size": settings.image_size}


def load_data(settings: Settings, run_dir: RunDir) -> ImageFolderDataModule:
    """The data module with its file lists read and checked (unreadable files reported)."""
    data = ImageFolderDataModule(settings)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # Once per machine. Under DDP Lightning starts the other processes in trainer.fit, when
        # this has run; launched by another tool (torchrun), prepare the data before it.
        data.prepare_data()
    data.setup()
    splits = data.splits
    if splits.skipped and owns_output_dir():
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
        num_nodes=settings.num_nodes,
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
