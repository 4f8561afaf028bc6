"""The PyTorch Lightning port of the recipe: a Keras-faithful MobileNetV2, Keras layer indexing
and freezing, Keras weight import/export, and the two-phase transfer flow (``python -m
tl_torch.train``).

The names below load with their module on first use (``tl_torch.TransferModule``, ``from tl_torch
import build_base``): ``python -m tl_torch.train`` checks its command line before torch loads."""

import importlib
from typing import Any

from tl_common.compat import block_triton_after_tensorflow

# Before torch's own imports: Triton loaded after TensorFlow crashes the process (see there).
block_triton_after_tensorflow()

#: Each public name -> the module that defines it.
_EXPORTS = {
    "ImageFolderDataModule": "tl_torch.data",
    "FoldedBase": "tl_torch.fast",
    "fold": "tl_torch.fast",
    "FlatFeatures": "tl_torch.features",
    "all_layer_outputs": "tl_torch.features",
    "feature_extractor": "tl_torch.features",
    "count_params": "tl_torch.freezing",
    "freeze": "tl_torch.freezing",
    "layer_table": "tl_torch.freezing",
    "load_keras_weights": "tl_torch.keras_weights",
    "read_base_weights": "tl_torch.keras_weights",
    "save_keras_weights": "tl_torch.keras_weights",
    "KerasLayer": "tl_torch.model",
    "MobileNetV2Base": "tl_torch.model",
    "TransferModule": "tl_torch.module",
    "TwoPhaseFineTuning": "tl_torch.module",
    "build_base": "tl_torch.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    block_triton_after_tensorflow()  # TensorFlow may have loaded since this package did
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
