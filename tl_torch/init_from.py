"""A run that starts from a trained model: ``python -m tl_torch.train --init-from PATH``.

``PATH`` is a ``model.ckpt`` written by ``python -m tl_torch.convert from-keras`` (a Keras model
carried over) or by a ``tl_torch.train`` run, or any of its checkpoints (``checkpoints/last.ckpt``),
or the folder holding ``model.ckpt``. The run takes the model's weights (base and head) and the
base's settings from it; everything else is the run's own: data, learning rates, ``fine_tune_at``,
epochs, dropout rate, seed. ``--initial-epochs 0`` fine-tunes at once, from ``--fine-tune-at``,
with the recipe's RMSprop.

The checkpoint is read as plain data (:func:`tl_torch.checkpoint.read_checkpoint`); an image size
or classes that differ from the run's, and weights that do not fit the model, stop the run with one
line before training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_common.bases import DEFAULT_BASE
from tl_common.download import sha256_of
from tl_common.errors import UserError
from tl_torch.checkpoint import read_checkpoint
from tl_torch.module import TransferModule
from tl_torch.weights import make_base

#: What a folder given to --init-from must hold (the name tl_torch.train and convert write).
MODEL_FILE = "model.ckpt"
#: What the one-line errors say would be accepted.
ACCEPTED = ("expected the model.ckpt of python -m tl_torch.convert from-keras or of a "
            "tl_torch.train run")
#: The ``source`` of metrics.json's ``weights`` entry for such a run.
SOURCE = "init-from"


@dataclass(frozen=True)
class Start:
    """A checked checkpoint to start from."""

    path: Path
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def base(self) -> str:
        """The ``--base`` of the model saved (checkpoints from before other bases: MobileNetV2)."""
        return str((self.hparams.get("base_config") or {}).get("base", DEFAULT_BASE))

    def check_base(self, base: str) -> None:
        """Refuse a run whose ``--base`` is not the saved model's: its fine-tune point and layer
        indices are the other network's."""
        if base != self.base:
            raise UserError(f"{self.path} holds a {self.base} model, the run has --base={base}: "
                            f"pass --base {self.base}")

    def record(self) -> dict[str, str | None]:
        """The ``weights`` entry of metrics.json (as :func:`tl_common.weights.weights_record`)."""
        return {"source": SOURCE, "path": str(self.path.absolute()),
                "sha256": sha256_of(self.path)}

    def module(self, **settings: Any) -> TransferModule:
        """The module to train, ``settings`` being :class:`TransferModule`'s arguments of this
        run (class names included), the weights the checkpoint's."""
        names, saved = list(settings.get("class_names") or ()), self.hparams.get("class_names")
        if saved is not None and list(saved) != names:
            raise UserError(f"{self.path} classifies {list(saved)}, the data has classes {names}: "
                            "train on data with the model's class folders")
        if saved is None and self.hparams.get("num_classes", 2) != len(names):
            raise UserError(f"{self.path} has a head for {self.hparams.get('num_classes', 2)} "
                            f"classes, the data has {len(names)}: {names}")
        base = make_base(self.hparams.get("base_config"))
        module = TransferModule(base, weights=str(self.path), **settings)
        load_trained_weights(module, self.state_dict, self.path)
        return module


def load_trained_weights(module: TransferModule, state_dict: dict[str, torch.Tensor],
                         path: Path) -> None:
    """Every tensor of the model from the checkpoint: the same names and shapes, none missing."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{path} does not fit the recipe's model ({reason}); {ACCEPTED}") from None


def start_from(path: str | os.PathLike[str], image_size: int) -> Start:
    """Read and check ``path`` (a checkpoint, or a folder holding ``model.ckpt``) for a run at
    ``image_size``."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; {ACCEPTED}, or its folder")
    checkpoint = read_checkpoint(path, way_out=ACCEPTED)
    hparams, state_dict = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(state_dict, dict):
        raise UserError(f"{path} is not a checkpoint of this project's model (no "
                        f"{'hyper_parameters' if not isinstance(hparams, dict) else 'state_dict'}"
                        f"); {ACCEPTED}")
    saved_size = hparams.get("image_size")
    if saved_size is not None and int(saved_size) != image_size:
        raise UserError(f"{path} was trained at {saved_size}x{saved_size} pixels, this run is "
                        f"at {image_size}: run with --image-size {saved_size}")
    return Start(path, hparams, state_dict)
