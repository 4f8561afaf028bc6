"""The port's checkpoints in one place: their names in a run folder, writing them atomically,
reading them as plain data only, and rebuilding the trained module from a run.

``tl_torch.train`` writes them, ``tl_torch.predict`` and ``tl_torch.convert`` read them; neither
reader needs the trainer.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from tl_common.errors import UserError
from tl_common.outputs import atomic_write_bytes, read_metrics
from tl_torch.model import MobileNetV2Base
from tl_torch.module import TransferModule
from tl_torch.run_files import BASE_WEIGHTS_FILE, LAST_CHECKPOINT, MODEL_FILE  # noqa: F401
from tl_torch.weights import base_config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside their name, fsynced, then renamed over it.

    Lightning stages a checkpoint in the system's temporary folder and moves it into place,
    which across file systems is a copy that a kill can cut short; here a kill leaves the last
    complete checkpoint, or none."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Plain data only, whatever the caller asks: ``--resume`` reads a file from a folder
        anyone may have written to, and a pickle can run code when it is read."""
        return read_checkpoint(path, map_location=map_location)


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu", *,
                    way_out: str = "use --overwrite to start over") -> dict[str, Any]:
    """A checkpoint of this project, read with ``torch.load(weights_only=True)``: tensors,
    numbers, strings, lists and dicts; anything else (a pickled object), a damaged or a foreign
    file is one line ending in ``way_out``. ``--resume`` and ``tl_torch.predict`` read with it."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{path} is not a readable checkpoint of this project holding plain data "
                        f"only ({' '.join(str(err).split())[:160]}); {way_out}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a Lightning checkpoint (a {type(checkpoint).__name__}); "
                        f"{way_out}")
    return checkpoint


def save_module(module: TransferModule, path: Path, phase: str = "fine_tuning") -> Path:
    """A Lightning checkpoint of the module (no trainer, no optimizer): what
    ``TransferModule.load_from_checkpoint`` and ``tl_torch.predict`` read; plain data only."""
    checkpoint = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": L.__version__,
                  "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "phase": phase}
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    return path


#: What a reader of a run folder is told when its model.ckpt is not one of ours.
RUN_WAY_OUT = ("expected the model.ckpt of python -m tl_torch.train or python -m tl_torch.convert "
               "from-keras")


def _hyper_parameters(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's hyper_parameters, read as plain data, with what load_from_checkpoint
    reads first checked."""
    saved = read_checkpoint(checkpoint, way_out=RUN_WAY_OUT)
    missing = [key for key in ("hyper_parameters", "pytorch-lightning_version") if key not in saved]
    if missing:
        raise UserError(f"{checkpoint} is not a Lightning checkpoint of this project (no "
                        f"{missing[0]!r} in it); {RUN_WAY_OUT}")
    hparams = saved["hyper_parameters"]
    if not isinstance(hparams, dict):
        raise UserError(f"{checkpoint} holds hyper_parameters of type {type(hparams).__name__}, "
                        f"not a dict; {RUN_WAY_OUT}")
    return hparams


def load_run(run_dir: str | Path, *, fast: bool = True
             ) -> tuple[TransferModule, tuple[str, ...], int]:
    """The trained module of a finished run, its class names and its image size; ``fast=False``
    leaves the frozen layers unfolded (exports, float64 comparisons).

    ``model.ckpt`` alone rebuilds the model: it holds the base's settings, the class names and
    the image size (see :class:`TransferModule`). Checkpoints from before it held them take these
    from ``metrics.json`` beside them, as they always did.
    """
    run_dir = Path(run_dir)
    checkpoint = run_dir / MODEL_FILE
    if not checkpoint.is_file():
        raise UserError(f"{run_dir} has no {MODEL_FILE}: expected the output folder of "
                        "python -m tl_torch.train or python -m tl_torch.convert from-keras")
    hparams = _hyper_parameters(checkpoint)
    overrides: dict[str, object] = {}
    class_names, image_size = hparams.get("class_names"), hparams.get("image_size")
    if "base_config" not in hparams or class_names is None or image_size is None:
        metrics = read_metrics(run_dir)
        if "base_config" not in hparams:
            overrides["base"] = MobileNetV2Base(**base_config(metrics["weights"]["source"]))
        class_names = class_names or metrics["data"]["class_names"]
        image_size = image_size or metrics["settings"]["image_size"]
    module = TransferModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True,
                                                 fast=fast, **overrides)
    class_names = tuple(class_names)
    if module.hparams.num_classes != len(class_names):
        raise UserError(f"{checkpoint} has a head for {module.hparams.num_classes} classes, but "
                        f"{run_dir / 'metrics.json'} lists {len(class_names)}: the two files "
                        "come from different runs")
    # Nothing trains here: the whole base frozen, then folded for speed (tl_torch.fast).
    module.set_phase("feature_extraction")
    return module.eval(), class_names, int(image_size)
