"""Train the recipe with Keras 3, the reference: feature extraction, then fine-tuning.

Run::

    python -m tl_keras.train --demo --output-dir runs/keras-demo    # the offline demo
    python -m tl_keras.train                # the recipe: cats_and_dogs_filtered, ImageNet weights
    python -m tl_keras.train --resume --output-dir runs/keras-demo --demo   # continue a killed run
    python -m tl_keras.train --help

Writes ``metrics.json``, ``learning_curves.png``, ``layer_table.csv`` and ``model.keras`` to
``--output-dir`` (default ``runs/keras``), and ``bad_images.txt`` when some files cannot be read
(the run stops before training, or with ``--skip-bad-images`` trains without them). Until the
run finishes the folder also holds what ``--resume`` needs: Keras' ``BackupAndRestore`` backup of
the last finished epoch (``backup/<phase>/latest.weights.h5``, weights and optimizer state, the
epoch number inside), the history so far (``history.json``) and, once feature extraction is
done, its weights and record (``phase_a.weights.h5``, ``phase_a.json``).

While it runs the folder is locked (``run.lock``: a second run there stops with one line), and
``run_settings.json`` records the settings that ``--resume`` must find unchanged. Ctrl-C or
SIGTERM stops the run after the current step with one line (exit 130 / 143), the backup of the
last finished epoch kept (see :mod:`tl_common.interrupts`).

A run killed at any point and resumed ends with the same weights and history, bit for bit, as
an uninterrupted one with the same seed: every random draw of an epoch depends on the seed and
the epoch alone, never on how many epochs ran in this process. The data order comes from
:class:`tl_keras.data.TrainingData`; augmentation and dropout from :class:`tl_keras.callbacks.EpochSeeds`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tl_common.bases import BASES
from tl_common.data import check_data_dir, check_output_dir_placement, resolve_data_root
from tl_common.errors import run_main
from tl_common.files import BAD_IMAGES_FILE, SPLITS, DataSplits, describe_bad_images, load_splits
from tl_common.head import decide
from tl_common.interrupts import StopRequests
from tl_common.lock import OutputLock
from tl_common.outputs import (
    LAYER_TABLE_FILE,
    RunDir,
    finish_run,
    format_counts,
    removed_if_unused,
    replaced_atomically,
    show_layer_table,
    write_json,
)
from tl_common.resume import ResumeRecord, recorded_inputs, recorded_settings
from tl_common.settings import Settings, build_parser, naming_flag, parse, settings_from
from tl_common.weights import weights_record
from tl_keras.console import find_devices

MODEL_FILE = "model.keras"
#: What the one line says after Ctrl-C or SIGTERM.
INTERRUPTED = ("rerun with --resume to continue from the last finished epoch (its backup, "
               "in backup/)")
_ENGINE_LOADED = False


def load_engine() -> None:
    """Import TensorFlow, Keras and the reference's modules into this module. Not at its top:
    they take seconds to load, and the command line, the paths and the output folder's lock are
    checked before (:func:`main`), so that a refusal comes at once. Names already set here (a
    test's replacement of one) are kept."""
    global _ENGINE_LOADED, keras, tf, TrainingData, make_dataset, build_base, build_model
    global compile_for, count_params, layer_table, set_phase, SEED_DRAWS_PER_EPOCH
    global BackupAndRestore, EpochLog, EpochSeeds, StopOnRequest, TerminateOnNaN, reading_data
    global seed_states
    if _ENGINE_LOADED:
        return
    kept = {name: value for name, value in globals().items() if not name.startswith("__")}
    import keras
    import tensorflow as tf

    from tl_keras.callbacks import (
        SEED_DRAWS_PER_EPOCH,
        BackupAndRestore,
        EpochLog,
        EpochSeeds,
        StopOnRequest,
        TerminateOnNaN,
        reading_data,
        seed_states,
    )
    from tl_keras.data import TrainingData, make_dataset
    from tl_keras.model import (
        build_base,
        build_model,
        compile_for,
        count_params,
        layer_table,
        set_phase,
    )

    globals().update(kept)
    _ENGINE_LOADED = True


def __getattr__(name: str) -> Any:
    """``tl_keras.train.EpochSeeds`` and the engine's other names, read from outside: loaded on
    first use (:func:`load_engine`)."""
    if not name.startswith("__") and not _ENGINE_LOADED:
        load_engine()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class RunState:
    """The files of an unfinished run, from which ``--resume`` continues."""

    path: Path

    @property
    def backup(self) -> Path:  # BackupAndRestore's folders, backup/<phase>
        return self.path / "backup"

    @property
    def history(self) -> Path:  # every finished epoch so far, both phases
        return self.path / "history.json"

    @property
    def phase_a_weights(self) -> Path:
        return self.path / "phase_a.weights.h5"

    @property
    def phase_a(self) -> Path:  # written last: feature extraction is done
        return self.path / "phase_a.json"

    @property
    def record(self) -> ResumeRecord:  # the settings --resume must find unchanged
        return ResumeRecord(self.path)

    def files(self) -> list[Path]:
        return [self.backup, self.history, self.phase_a_weights, self.phase_a]

    def exists(self) -> bool:
        """Whether there is something to resume (the settings record alone is not)."""
        return any(p.exists() for p in self.files())

    def clear(self) -> None:
        shutil.rmtree(self.backup, ignore_errors=True)
        for p in [*self.files()[1:], self.record.path]:
            p.unlink(missing_ok=True)



def fit(model: keras.Model, train_data: TrainingData, validation: tf.data.Dataset, phase: str,
        *, initial_epoch: int, epochs: int, history: list[dict[str, Any]], state: RunState,
        stop: StopRequests) -> float:
    """Train one phase, backed up after every epoch; return the seconds it took."""
    # Kept after the fit (Keras deletes it by default) until the phase's result is saved: a kill
    # in between must not lose the phase.
    backup = BackupAndRestore(str(state.backup / phase), delete_checkpoint=False)
    # Keras restores the backup inside fit, but the data must start at its epoch already.
    restored = backup.backed_up_epoch()
    first = initial_epoch if restored is None else restored
    callbacks = [
        StopOnRequest(stop),
        EpochSeeds(),
        TerminateOnNaN(),
        # Before the backup, so that the saved history never lags behind the saved epoch.
        EpochLog(history, phase, state.history),
        backup,
    ]
    # BackupAndRestore leaves the epoch it restored on the model, and Keras starts every later
    # fit there too: phase B would begin inside phase A's epochs.
    model._initial_epoch = None
    start = time.perf_counter()
    # A backup of the phase's last epoch leaves nothing to train, but fit still wants data (it
    # reads none of it) to restore the backup's weights and optimizer state.
    batches = train_data.epochs(range(first, max(epochs, first + 1)))
    # shuffle=False: the epochs come in their own orders; Keras would ignore True, with a warning.
    with stop.deferred(), reading_data():
        model.fit(batches, steps_per_epoch=train_data.steps_per_epoch, validation_data=validation,
                  initial_epoch=first, epochs=epochs, callbacks=callbacks, shuffle=False)
    return time.perf_counter() - start


def save_model(model: keras.Model, path: Path) -> None:
    # Keras insists on the .keras ending
    with replaced_atomically(path, f".{path.stem}.tmp.keras") as tmp:
        model.save(tmp)


def load_data(settings: Settings, run_dir: RunDir) -> DataSplits:
    """The run's file lists, every file checked (unreadable ones reported or a one-line stop)."""
    splits = load_splits(resolve_data_root(settings), settings.test_fraction, settings.seed,
                         skip_bad_images=settings.skip_bad_images,
                         bad_list=run_dir.path / BAD_IMAGES_FILE)
    if splits.skipped:
        print(f"warning: --skip-bad-images: left out "
              f"{describe_bad_images(splits.skipped, splits.root, run_dir.path / BAD_IMAGES_FILE)}",
              file=sys.stderr)
    print(f"data: {splits.root}\nclasses: {list(splits.class_names)}")
    for split in SPLITS:
        print(f"  {split}: {len(splits[split])} images {splits[split].class_counts()}")
    return splits


def show_predictions(model: keras.Model, base: keras.Model, test: tf.data.Dataset,
                     splits: DataSplits) -> None:
    """The recipe's last steps: predictions on the first test batch, by the accuracy's rule
    (:func:`tl_common.head.decide`), and the feature-extractor aside."""
    images, labels = next(iter(test))
    predicted, probabilities = decide(model.predict_on_batch(images))
    names = splits.class_names
    print("predictions on the first test batch (p = probability of the class predicted):")
    for path, label, k, p in zip(splits.test.paths, labels.numpy(), predicted, probabilities,
                                 strict=False):
        print(f"  {Path(path).name}: {names[label]}, predicted {names[k]} (p={p:.3f})")
    extractor = keras.Model(base.input, keras.layers.Flatten()(base.output))
    features = extractor(keras.applications.mobilenet_v2.preprocess_input(images), training=False)
    print(f"feature extractor (base output, flattened): {tuple(images.shape)} -> "
          f"{tuple(features.shape)}, {features.shape[1]:,} numbers per image")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; return the metrics.json document."""
    parser = build_parser("keras", "Train the transfer-learning recipe with Keras 3 (the "
                                   "reference): feature extraction, then fine-tuning.")
    settings = settings_from(parse(parser, argv), "keras")
    check_output_dir_placement(settings)
    run_dir = RunDir(Path(settings.output_dir))
    # The folder is locked and checked before TensorFlow loads (seconds): a refusal comes at once;
    # a run that fails before writing anything removes the folder it made.
    with removed_if_unused(run_dir.create()), OutputLock(run_dir.path) as lock, \
            StopRequests(INTERRUPTED, on_abort=lock.release) as stop:
        resuming = prepare_output_dir(run_dir, RunState(run_dir.path), settings)
        load_engine()
        find_devices()   # TensorFlow's device search, with its one line of noise left out
        return run(settings, run_dir, stop, resuming)


def run(settings: Settings, run_dir: RunDir, stop: StopRequests, resuming: bool
        ) -> dict[str, Any]:
    """The recipe in a locked, checked output folder (``resuming``: there is a run to resume),
    Ctrl-C and SIGTERM handled by ``stop``."""
    started = time.perf_counter()
    state = RunState(run_dir.path)
    keras.utils.set_random_seed(settings.seed)
    check_data_dir(settings)  # a mistyped --data-dir is the error to see, not a failed download
    base, weights = load_base(settings)
    splits = load_data(settings, run_dir)
    inputs = recorded_inputs(weights, splits.summary())
    if not (resuming and state.record.check("inputs", inputs)):
        state.record.write(recorded_settings(settings), inputs)
    train_data = TrainingData(splits.train, settings.image_size, settings.batch_size,
                              settings.seed, settings.limit_batches)
    data = {split: make_dataset(splits[split], settings.image_size, settings.batch_size,
                                shuffle=False, seed=settings.seed,
                                limit_batches=settings.limit_batches)
            for split in ("validation", "test")}
    model = build_model(base, dropout=settings.dropout, seed=settings.seed,
                        num_classes=len(splits.class_names))
    phases = Phases(model, base, settings, train_data, data["validation"], state, stop,
                    history=json.loads(state.history.read_text())
                    if resuming and state.history.exists() else [])
    phases.feature_extraction(resuming)
    table = phases.fine_tuning()

    # ---- test, predictions, the feature-extractor aside --------------------------------------
    start = time.perf_counter()
    with reading_data():
        test_loss, test_accuracy = model.evaluate(data["test"])
    phases.timings["test_s"] = time.perf_counter() - start
    print(f"test loss: {test_loss:.4f}  test accuracy: {test_accuracy:.4f}")
    with reading_data():
        show_predictions(model, base, data["test"], splits)

    # ---- outputs ----------------------------------------------------------------------------
    save_model(model, run_dir.path / MODEL_FILE)
    phases.timings["total_s"] = time.perf_counter() - started
    document = finish_run(
        run_dir, framework="keras", table=table,
        curves_title=f"Keras {keras.__version__}: {BASES[settings.base].keras_application} "
                     f"{settings.image_size}px, "
                     f"{settings.weights_source} weights",
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
        settings=settings.to_dict(), data=splits.summary(), weights=weights,
        counts=phases.counts, history=phases.history,
        test={"loss": float(test_loss), "accuracy": float(test_accuracy)},
        timings=phases.timings,
    )
    state.clear()
    print(f"outputs in {run_dir.path}: metrics.json, learning_curves.png, layer_table.csv, "
          f"{MODEL_FILE}")
    return document


def prepare_output_dir(run_dir: RunDir, state: RunState, settings: Settings) -> bool:
    """Refuse to reuse a folder against --resume/--overwrite, or to resume with other settings;
    clear it for --overwrite. True when there is a run to resume."""
    run_dir.check_reuse(resume=settings.resume, overwrite=settings.overwrite,
                        has_state=state.exists())
    if settings.overwrite:
        # The old outputs first (metrics.json before anything), then the old backup, which
        # BackupAndRestore would otherwise restore.
        run_dir.clear_outputs(MODEL_FILE, BAD_IMAGES_FILE)
        state.clear()
    if not settings.resume:
        return False
    if not state.exists():
        print(f"--resume: nothing to resume in {run_dir.path}; starting from the beginning")
        return False
    if not state.record.check("settings", recorded_settings(settings)):
        print(f"warning: {state.record.path} is missing: the settings of the run being resumed "
              "cannot be compared with these", file=sys.stderr)
    return True


def load_base(settings: Settings) -> tuple[keras.Model, dict[str, Any]]:
    """The base first: a weights file that does not fit stops the run before the data is read."""
    with naming_flag("weights", settings.weights_source):
        base = build_base(settings.weights_source, settings.image_size, settings.base)
        # Now, not after training: nothing about the weights file can fail once it is done.
        weights = weights_record(settings.weights_source, settings.image_size, settings.base)
    return base, weights


@dataclass
class Phases:
    """The recipe's two phases on one model; they share the history, counts and timings."""

    model: keras.Model
    base: keras.Model
    settings: Settings
    train_data: TrainingData
    validation: tf.data.Dataset
    state: RunState
    stop: StopRequests
    history: list[dict[str, Any]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def show_counts(self, phase: str) -> None:
        trainable, non_trainable = count_params(self.model)
        self.counts[phase] = {"trainable": trainable, "non_trainable": non_trainable}
        print(format_counts(phase, trainable, non_trainable))

    def fit(self, phase: str, initial_epoch: int, epochs: int) -> None:
        self.timings[f"{phase}_s"] = fit(
            self.model, self.train_data, self.validation, phase, initial_epoch=initial_epoch,
            epochs=epochs, history=self.history, state=self.state, stop=self.stop)

    def feature_extraction(self, resuming: bool) -> None:
        """Phase A, the whole base frozen; or, resumed after it, its saved result."""
        model, state = self.model, self.state
        set_phase(self.base, "feature_extraction")
        self.show_counts("feature_extraction")
        if resuming and state.phase_a.exists():
            record = json.loads(state.phase_a.read_text())
            # Loaded before compiling: the file's Adam state is not wanted, and is then ignored.
            model.load_weights(state.phase_a_weights)
            self.history[:] = record["history"] + [h for h in self.history
                                                   if h["phase"] == "fine_tuning"]
            self.timings["feature_extraction_s"] = record["seconds"]
            print("--resume: feature extraction is finished; going on with fine-tuning")
            return
        compile_for(model, "feature_extraction", self.settings.learning_rate)
        if not (state.backup / "feature_extraction").exists():
            with reading_data():
                loss0, accuracy0 = model.evaluate(self.validation, verbose=0)
            print(f"initial loss: {loss0:.2f}\ninitial accuracy: {accuracy0:.2f}")
        self.fit("feature_extraction", 0, self.settings.initial_epochs)
        with replaced_atomically(state.phase_a_weights, ".phase_a.tmp.weights.h5") as tmp:
            model.save_weights(tmp)
        write_json(state.phase_a, {"history": self.history,
                                   "seconds": self.timings["feature_extraction_s"]})
        shutil.rmtree(state.backup / "feature_extraction")

    def fine_tuning(self) -> list:
        """Phase B, the base from fine_tune_at on; returns the layer table."""
        set_phase(self.base, "fine_tuning", self.settings.fine_tune_at)
        table = layer_table(self.base)
        show_layer_table(table, self.state.path / LAYER_TABLE_FILE,
                         print_all=self.settings.print_layers)
        self.show_counts("fine_tuning")
        compile_for(self.model, "fine_tuning", self.settings.fine_tuning_lr)
        # The recipe's history.epoch[-1] would repeat phase A's last epoch.
        phase_a_epochs = sum(h["phase"] == "feature_extraction" for h in self.history)
        self.fit("fine_tuning", phase_a_epochs, self.settings.total_epochs)
        return table


if __name__ == "__main__":
    run_main(main)
