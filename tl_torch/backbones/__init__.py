"""The family of Keras-faithful bases, by name.

Each member is one Keras application with ``include_top=False``, built so that its modules are
Keras' layers in Keras' order (``keras_layers``, ``keras_layer(i | name)``), BatchNorm stays in
inference mode, ``preprocess`` maps [0, 255] pixels to the model's input, and Keras files load by
layer name and shape (:mod:`tl_torch.keras_weights`). Adding a network is a file here and a row
in :data:`BACKBONES`.

The default fine-tune point of each base is where fine-tuning starts when none is given: the
first layer of the block whose start leaves the share of the base frozen closest to the recipe's
100 of MobileNetV2's 154 layers (for MobileNetV2 itself, the recipe's own 100).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tl_common import recipe
from tl_common.errors import UserError
from tl_torch.backbones.efficientnet import EfficientNetB0Base
from tl_torch.backbones.mobilenet_v3 import MobileNetV3LargeBase
from tl_torch.backbones.resnet import ResNet50Base
from tl_torch.model import MobileNetV2Base

#: The recipe's fine-tune point and MobileNetV2's layer count: the share the defaults follow.
RECIPE_FINE_TUNE_AT = recipe.FINE_TUNE_AT
RECIPE_LAYERS = 154


@dataclass(frozen=True)
class Backbone:
    """One member: its builder, Keras' application, and where fine-tuning starts by default."""

    name: str
    keras_application: str        # keras.applications.<this>
    factory: Callable[..., nn.Module]
    fine_tune_from: str           # the Keras layer where the default fine-tuning starts
    reason: str

    def build(self, **kwargs: object) -> nn.Module:
        """The base with Keras' initial numbers laid out (weights are loaded separately)."""
        return self.factory(**kwargs)

    def default_fine_tune_at(self, base: nn.Module) -> int:
        """The Keras index of :attr:`fine_tune_from` in ``base`` (it moves with EfficientNet's
        ``imagenet_rescaling``, so it is looked up, not stored)."""
        return base.keras_layer(self.fine_tune_from).index


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("mobilenet_v2", "MobileNetV2", MobileNetV2Base, "block_11_expand_relu",
             "the recipe's fine_tune_at = 100 (layers[100] is block_11_expand_relu)"),
    Backbone("mobilenet_v3_large", "MobileNetV3Large", MobileNetV3LargeBase, "expanded_conv_11_expand",
             "block 11 starts at 124 of 187 layers: 66 % frozen, the block start nearest the "
             "recipe's 100 / 154 = 65 %"),
    Backbone("efficientnet_b0", "EfficientNetB0", EfficientNetB0Base, "block5c_expand_conv",
             "block 5c starts at 147 of 237 layers (148 of 238 with imagenet_rescaling): 62 % "
             "frozen, the block start nearest the recipe's 100 / 154 = 65 %"),
    Backbone("resnet50", "ResNet50", ResNet50Base, "conv4_block4_1_conv",
             "conv4 block 4 starts at 113 of 175 layers: 65 % frozen, the block start nearest "
             "the recipe's 100 / 154 = 65 %"),
)}


def get_backbone(name: str) -> Backbone:
    """The member called ``name``; a :class:`UserError` naming the accepted ones otherwise."""
    if name not in BACKBONES:
        raise UserError(f"base {name!r} is not supported: expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


__all__ = ["BACKBONES", "Backbone", "EfficientNetB0Base", "MobileNetV3LargeBase", "ResNet50Base",
           "get_backbone"]
