"""The Keras trainer's callbacks (``python -m tl_keras.train``): the history saved as each epoch
ends, ``TerminateOnNaN`` as one line, every epoch's random state set from the seed and the epoch,
``BackupAndRestore`` in one atomically written file, the stop at a safe point after Ctrl-C or
SIGTERM, and data read during training that changed since the run's start as one line. Apart from
:mod:`tl_keras.train` so that the trainer can check its command line before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import keras
import tensorflow as tf

from tl_common.errors import UserError, non_finite_loss
from tl_common.interrupts import StopRequests
from tl_common.outputs import history_entry, replaced_atomically, write_json

#: Each epoch's random state starts at draw ``epoch * SEED_DRAWS_PER_EPOCH`` of every
#: SeedGenerator (see :class:`EpochSeeds`), so epochs draw from ranges of their own as long as
#: an epoch has fewer steps than this (each generator draws once per step). TensorFlow reduces
#: the count modulo 2**31 - 2 (Keras' ``_cast_seed``): the ranges stay apart for 2047 epochs.
SEED_DRAWS_PER_EPOCH = 2**20



class EpochLog(keras.callbacks.Callback):
    """Adds each finished epoch to the run's history and saves the history at once."""

    def __init__(self, history: list[dict[str, Any]], phase: str, path: Path) -> None:
        super().__init__()
        self.history, self.phase, self.path = history, phase, path

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        entry = history_entry(epoch + 1, self.phase, logs or {})
        # A resumed fit redoes the epochs after its backup: their old entries are replaced.
        self.history[:] = [h for h in self.history if h["epoch"] < entry["epoch"]] + [entry]
        write_json(self.path, self.history)


class TerminateOnNaN(keras.callbacks.TerminateOnNaN):
    """Keras' callback, raising at the first batch whose loss is NaN or infinite: the run stops
    at once with one line, before the epoch's end writes its history and backs up the broken
    weights (which ``--resume`` would restore); the last backup stays that of a sound epoch."""

    def __init__(self) -> None:
        super().__init__(raise_error=True)
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            raise non_finite_loss(float((logs or {})["loss"]), self.epoch + 1, batch + 1) from None


def seed_states(model: keras.Model) -> list[keras.Variable]:
    """The state of every SeedGenerator in the model (augmentation, dropout), ``[seed, draws]``:
    in ``model.variables`` ("including random seeds", says Keras), not in what it saves."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


class EpochSeeds(keras.callbacks.Callback):
    """Sets the model's random state from the epoch as each epoch begins.

    RandomFlip, RandomRotation and Dropout draw from Keras SeedGenerators, whose state
    (:func:`seed_states`) counts up by one per training step and is not in the backup: a
    resumed run would restart it at ``[seed, 0]`` and draw other flips, angles and masks. Set
    to ``[seed, epoch * SEED_DRAWS_PER_EPOCH]`` here, the draws of step ``b`` of epoch ``e``
    depend on (seed, e, b) alone. Per epoch is enough: a run killed mid-epoch resumes from the
    backup of the last finished epoch and redoes the whole epoch. The compiled train step reads
    the variable when it runs, so the assignment holds in graph mode too.
    """

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for state in seed_states(self.model):
            seed = state.numpy()[0]  # the generator's own seed: its draws count up the other entry
            state.assign([seed, epoch * SEED_DRAWS_PER_EPOCH])


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' callback with its backup in one file, written atomically, the epoch inside.

    Keras writes ``latest.weights.h5`` in place, about half a second per epoch, and then the
    epoch number in ``training_metadata.json``: a kill during the first leaves a file that stops
    ``--resume`` with an OSError, a kill between the two leaves the new weights with the last
    epoch number, and the resumed run would train that epoch twice. Here the epoch is an
    attribute of the weights file, written beside and renamed over: a kill leaves the last
    backup or the new one, whole. The weights file holds the optimizer's state too (its step
    count and slots), so training goes on as if never stopped.
    """

    EPOCH_ATTRIBUTE = "tl_keras_epoch"  # epochs finished, as Keras' training_metadata.json

    def backed_up_epoch(self) -> int | None:
        """The epochs the backup has finished, or None without a backup."""
        if not os.path.exists(self._weights_path):
            return None
        with h5py.File(self._weights_path, "r") as f:
            if self.EPOCH_ATTRIBUTE not in f.attrs:
                raise UserError(f"{self._weights_path} does not say which epoch it backs up "
                                "(a backup of an older version?): start the run again with "
                                "--overwrite")
            return int(f.attrs[self.EPOCH_ATTRIBUTE])

    def _save_model(self) -> None:
        os.makedirs(self.backup_dir, exist_ok=True)
        # Keras wants the .weights.h5 ending on the temporary file too.
        with replaced_atomically(self._weights_path, ".latest.tmp.weights.h5") as tmp:
            self.model.save_weights(tmp, overwrite=True)
            with h5py.File(tmp, "a") as f:
                f.attrs[self.EPOCH_ATTRIBUTE] = self._current_epoch

    def _load_model(self) -> None:
        epoch = self.backed_up_epoch()
        if epoch is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # so that its state loads
        self.model.load_weights(self._weights_path)
        self.model._initial_epoch = epoch


class StopOnRequest(keras.callbacks.Callback):
    """Ends training at a safe point after Ctrl-C or SIGTERM (:mod:`tl_common.interrupts`): after
    the current training step or validation batch, before the epoch's end writes its history and
    backup; the backup of the last finished epoch stays what --resume continues from."""

    def __init__(self, stop: StopRequests) -> None:
        super().__init__()
        self.stop = stop

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.stop.check()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.stop.check()


#: TensorFlow's errors for a file that cannot be opened or decoded any more.
_DATA_ERRORS = (tf.errors.NotFoundError, tf.errors.PermissionDeniedError,
                tf.errors.InvalidArgumentError)


@contextlib.contextmanager
def reading_data() -> Iterator[None]:
    """Files read before training and gone or damaged since (a vanished folder, a file replaced
    by a bad one) are one line; the backup of the last finished epoch is kept for --resume.

    TensorFlow's message names the missing file, not the undecodable one (its decoder does not
    know the path): the line quotes TensorFlow's reason."""
    try:
        yield
    except _DATA_ERRORS as err:
        lines = [line.strip() for line in str(err.message).splitlines() if line.strip()]
        reason = next((line for line in lines if "failed to" in line or "No such file" in line
                       or "image" in line.lower() or "Permission denied" in line), None)
        if reason is None or (isinstance(err, tf.errors.InvalidArgumentError)
                              and "image" not in reason.lower()):
            raise
        raise UserError(f"the data could not be read during training ({reason[:240]}): it "
                        "changed after the check at the start of the run; restore it, then "
                        "rerun with --resume to continue from the last finished epoch") from None
