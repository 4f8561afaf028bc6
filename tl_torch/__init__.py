"""The PyTorch Lightning port of the recipe: a Keras-faithful MobileNetV2, Keras layer indexing
and freezing, Keras weight import/export, and the two-phase transfer flow (``python -m
tl_torch.train``)."""

from tl_common.compat import block_triton_after_tensorflow

# Before torch's own imports: Triton loaded after TensorFlow crashes the process (see there).
block_triton_after_tensorflow()

from tl_torch.data import ImageFolderDataModule  # noqa: E402
from tl_torch.fast import FoldedBase, fold  # noqa: E402
from tl_torch.features import FlatFeatures, all_layer_outputs, feature_extractor  # noqa: E402
from tl_torch.freezing import count_params, freeze, layer_table  # noqa: E402
from tl_torch.keras_weights import (  # noqa: E402
    load_keras_weights,
    read_base_weights,
    save_keras_weights,
)
from tl_torch.model import KerasLayer, MobileNetV2Base  # noqa: E402
from tl_torch.module import TransferModule, TwoPhaseFineTuning  # noqa: E402
from tl_torch.weights import build_base  # noqa: E402

__all__ = [
    "FlatFeatures",
    "FoldedBase",
    "ImageFolderDataModule",
    "KerasLayer",
    "MobileNetV2Base",
    "TransferModule",
    "TwoPhaseFineTuning",
    "all_layer_outputs",
    "build_base",
    "count_params",
    "feature_extractor",
    "fold",
    "freeze",
    "layer_table",
    "load_keras_weights",
    "read_base_weights",
    "save_keras_weights",
]
