"""The bases ``--base`` chooses, framework-free: Keras' application for each, its layer count, the
width of its features, where fine-tuning starts by default, and its ImageNet no-top file.

Both trainers read them here; the PyTorch port's registry (:mod:`tl_torch.backbones`) adds its
builders to these facts. Every number is Keras' own (``keras.applications.<App>(include_top=False,
weights=None)``); ``tests/test_backbones.py`` compares the port with Keras at each.
"""

from __future__ import annotations

from dataclasses import dataclass

from tl_common import recipe
from tl_common.download import IMAGENET_BASE_URL, imagenet_weights_name
from tl_common.errors import UserError
from tl_common.mobilenet_v2 import KERAS_BASE_LAYERS, LAST_FILTERS, MIN_IMAGE_SIZE

#: The recipe's base, and what ``--base`` is when not given.
DEFAULT_BASE = "mobilenet_v2"
#: Weight sources that exist for MobileNetV2 only: the demo's pretrained file is a MobileNetV2,
#: and torchvision's ImageNet weights are copied into the port's MobileNetV2 only.
MOBILENET_V2_ONLY_SOURCES = ("demo", "torchvision")
#: MIN_IMAGE_SIZE, the smallest square input, is MobileNetV2's and every other base's: five
#: stride-2 stages leave 1 x 1 at 32.
__all__ = ["BASES", "DEFAULT_BASE", "MIN_IMAGE_SIZE", "MOBILENET_V2_ONLY_SOURCES", "BaseFacts",
           "base_facts"]


@dataclass(frozen=True)
class BaseFacts:
    """One base as Keras builds it with ``include_top=False``."""

    name: str
    keras_application: str      # keras.applications.<this>
    keras_module: str           # keras.applications.<this>.preprocess_input
    layers: int                 # len(base.layers), the InputLayer included, weights=None
    features: int               # channels of the base's output
    fine_tune_from: str         # the Keras layer where the default fine-tuning starts
    fine_tune_at: int           # its index with weights=None
    reason: str                 # why fine-tuning starts there
    imagenet_url: str           # the folder Keras downloads the ImageNet no-top file from
    imagenet_file: str          # its name ("" for MobileNetV2: it depends on the input size)
    # Layers Keras inserts before fine_tune_from only when it builds the base with
    # weights="imagenet" (EfficientNet's Rescaling(1/sqrt(std)), Keras' fix for TF issue 49930).
    imagenet_extra_layers: int = 0

    def imagenet_weights_name(self, image_size: int) -> str:
        """The ImageNet no-top file Keras reads for this base at ``image_size``."""
        return self.imagenet_file or imagenet_weights_name(image_size)

    def layer_count(self, weights: str | None) -> int:
        """``len(base.layers)`` for the base built for ``weights`` (a ``--weights`` value)."""
        return self.layers + (self.imagenet_extra_layers if weights == "imagenet" else 0)

    def default_fine_tune_at(self, weights: str | None) -> int:
        """The index of :attr:`fine_tune_from` in the base built for ``weights``."""
        return self.fine_tune_at + (self.imagenet_extra_layers if weights == "imagenet" else 0)


_KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"

BASES: dict[str, BaseFacts] = {b.name: b for b in (
    BaseFacts("mobilenet_v2", "MobileNetV2", "mobilenet_v2", KERAS_BASE_LAYERS, LAST_FILTERS,
              recipe.FINE_TUNE_LAYER, recipe.FINE_TUNE_AT,
              "the recipe's fine_tune_at = 100 (layers[100] is block_11_expand_relu)",
              IMAGENET_BASE_URL, ""),
    BaseFacts("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 187, 960,
              "expanded_conv_11_expand", 124,
              "block 11 starts at 124 of 187 layers: 66 % frozen, the block start nearest the "
              "recipe's 100 / 154 = 65 %",
              _KERAS_APPLICATIONS + "mobilenet_v3/",
              "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    BaseFacts("efficientnet_b0", "EfficientNetB0", "efficientnet", 237, 1280,
              "block5c_expand_conv", 147,
              "block 5c starts at 147 of 237 layers (148 of 238 with ImageNet weights' extra "
              "Rescaling): 62 % frozen, the block start nearest the recipe's 100 / 154 = 65 %",
              # Not under tensorflow/: EfficientNet's files live in Keras' older bucket.
              "https://storage.googleapis.com/keras-applications/", "efficientnetb0_notop.h5",
              imagenet_extra_layers=1),
    BaseFacts("resnet50", "ResNet50", "resnet50", 175, 2048,
              "conv4_block4_1_conv", 113,
              "conv4 block 4 starts at 113 of 175 layers: 65 % frozen, the block start nearest "
              "the recipe's 100 / 154 = 65 %",
              _KERAS_APPLICATIONS + "resnet/",
              "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
)}


def base_facts(name: str) -> BaseFacts:
    """The base called ``name``; one line naming the accepted ones otherwise."""
    if name not in BASES:
        raise UserError(f"--base={name!r} is not accepted: expected one of {', '.join(BASES)}")
    return BASES[name]
