"""The trainer's Lightning callbacks and checkpoint file handling (``python -m tl_torch.train``).

Keras' ``History`` and ``TerminateOnNaN`` for the port, the stop at a safe point after Ctrl-C or
SIGTERM, and checkpoints written atomically and read as plain data only. Apart from
:mod:`tl_torch.train` so that the trainer can check its command line before Lightning loads.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from tl_common.errors import non_finite_loss
from tl_common.interrupts import StopRequests
from tl_common.outputs import history_entry
from tl_torch.module import TransferModule


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
