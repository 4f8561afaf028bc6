"""Check 19: a Keras model carried over to the port and fine-tuned there takes Keras' step.

The reference's model (demo weights, a head with weights of a trained classifier's size), saved as
``tl_keras.train`` saves it, is converted as ``python -m tl_torch.convert from-keras`` converts it
(``module_from_keras`` and ``save_module``: the command's two steps, without its own comparison,
which check 13 reports) and loaded as ``python -m tl_torch.train --init-from`` loads it
(:mod:`tl_torch.init_from`). Then the port and Keras each take ONE step of the recipe's
fine-tuning (the base trainable from layer 100, RMSprop at 1e-5, fresh optimizer state) on the
same batch, with the same flips, angles and dropout mask (drawn by the Keras model's layers); a
float64 copy of the Keras model takes it too: the exact answer.

Rows: every weight the port starts from equals Keras' (exact: the conversion copies float32
values); the update of every trainable weight, and the loss, within the band of Keras' own
float32 error against the exact step (:mod:`tl_common.bands`). Unlike check 9 nothing is loaded
from Keras' state into the port: its starting point is the converted checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from parity_tests.checks_steps import (
    KerasTrainer,
    ReplayedDropout,
    Setup,
    TorchTrainer,
    flat_weights,
    same_head,
)
from parity_tests.checks_training import FINE_TUNE_AT, PHASES, demo_batches
from parity_tests.rows import Row, measured, verdict
from tl_common import bands
from tl_torch import convert
from tl_torch.init_from import start_from
from tl_torch.module import TransferModule

GROUP = "19 fine-tuning a converted Keras model"
SETUP = Setup(size=64, batch=8, steps=1, free_running=False, group=GROUP)
CLASS_NAMES = ("cats", "dogs")
#: The head's weights: normal with this standard deviation (a trained head's size, where the
#: Glorot init of a fresh one would be about a fifth of it), and a bias.
HEAD_STD, HEAD_BIAS = 0.15, 0.3


class ConvertedTrainer(TorchTrainer):
    """The port's step (:class:`TorchTrainer`'s) on a module loaded from a checkpoint."""

    def __init__(self, setup: Setup, module: TransferModule) -> None:
        self.module = module.train()
        self.module.dropout = ReplayedDropout(setup.dropout)
        self.draws = None
        if self.module.augment is not None:
            self.module.augment.draw = lambda n, generator=None: (
                torch.from_numpy(self.draws.flips), torch.from_numpy(self.draws.angles))
        self.optimizer = None


def keras_model_file(reference: KerasTrainer, directory: Path) -> Path:
    """The reference's model with a head of a trained size, saved as tl_keras.train saves it."""
    from tl_keras.train import save_model

    dense = reference.model.get_layer("dense")
    kernel, bias = dense.get_weights()
    rng = np.random.default_rng(19)
    dense.set_weights([rng.normal(0.0, HEAD_STD, kernel.shape).astype(np.float32),
                       np.full(bias.shape, HEAD_BIAS, np.float32)])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.keras"
    save_model(reference.model, path)
    return path


def converted_module(keras_file: Path, directory: Path) -> TransferModule:
    """from-keras, then --init-from: the module a fine-tuning run of the port starts with."""
    module, _ = convert.module_from_keras(keras_file, class_names=list(CLASS_NAMES))
    checkpoint = convert.save_module(module, directory / "converted" / "model.ckpt")
    start = start_from(checkpoint, SETUP.size)
    return start.module(learning_rate=PHASES[0][1], fine_tune_learning_rate=PHASES[1][1],
                        fine_tune_at=FINE_TUNE_AT, dropout=SETUP.dropout, seed=0,
                        num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES,
                        image_size=SETUP.size)


def check_init_from(directory: Path) -> list[Row]:
    reference, truth = KerasTrainer(SETUP), KerasTrainer(SETUP, float64=True)
    port = ConvertedTrainer(SETUP, converted_module(keras_model_file(reference, directory),
                                                    directory))
    same_head(reference, truth)
    phase, lr = PHASES[1]
    for trainer in (reference, truth):
        trainer.set_phase(phase, lr)
    port.set_phase(phase)
    k_start, t_start = reference.all_weights(), port.all_weights()
    same = k_start.shape == t_start.shape and np.array_equal(k_start, t_start)
    rows = [verdict(GROUP, "starting point: every weight and BatchNorm statistic after "
                           "from-keras and --init-from (Keras layout)",
                    f"{k_start.size:,} numbers", f"{t_start.size:,} numbers", same,
                    diff=bands.max_error(k_start, t_start) if k_start.shape == t_start.shape
                    else None, tolerance="exact")]
    [(images, labels)] = demo_batches(SETUP.size, 1, SETUP.batch)
    draws = reference.draw(images)
    before = flat_weights(reference.state()["weights"])
    port_before = flat_weights(port.weights())
    k_loss = reference.step(images, labels, draws)
    e_loss = truth.step(images, labels, draws)
    t_loss = port.step(images, labels, draws)
    # The exact step, stored as float32 weights store it: the best a float32 step can do.
    e_update = flat_weights(truth.state()["weights"]).astype(np.float32).astype(np.float64) - before
    k_update = flat_weights(reference.state()["weights"]) - before
    t_update = flat_weights(port.weights()) - port_before
    rows.append(measured(GROUP, "one fine-tuning step (RMSprop): update of every trainable "
                                "weight (rms error)",
                         bands.against_exact(e_update, k_update, t_update, norm="rms",
                                             how="vs the float64 step, stored in float32"),
                         keras=f"rms update {bands.magnitude(k_update, 'rms'):.3g}",
                         torch=f"rms update {bands.magnitude(t_update, 'rms'):.3g}"))
    rows.append(measured(GROUP, "one fine-tuning step (RMSprop): loss",
                         bands.against_exact(np.array([e_loss]), np.array([k_loss]),
                                             np.array([t_loss])),
                         keras=f"{k_loss:.5f}", torch=f"{t_loss:.5f}"))
    return rows
