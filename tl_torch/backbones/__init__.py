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

from tl_common.bases import BASES, BaseFacts
from tl_common.errors import UserError
from tl_torch.backbones.efficientnet import EfficientNetB0Base
from tl_torch.backbones.mobilenet_v3 import MobileNetV3LargeBase
from tl_torch.backbones.resnet import ResNet50Base
from tl_torch.model import MobileNetV2Base

#: The recipe's fine-tune point and MobileNetV2's layer count: the share the defaults follow.
RECIPE_FINE_TUNE_AT = BASES["mobilenet_v2"].fine_tune_at
RECIPE_LAYERS = BASES["mobilenet_v2"].layers


@dataclass(frozen=True)
class Backbone:
    """One member: its builder, and Keras' facts about it (:mod:`tl_common.bases`: the
    application, where fine-tuning starts by default and why, the features' width)."""

    facts: BaseFacts
    factory: Callable[..., nn.Module]

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def keras_application(self) -> str:
        """keras.applications.<this>."""
        return self.facts.keras_application

    @property
    def fine_tune_from(self) -> str:
        """The Keras layer where the default fine-tuning starts."""
        return self.facts.fine_tune_from

    @property
    def reason(self) -> str:
        return self.facts.reason

    def build(self, **kwargs: object) -> nn.Module:
        """The base with Keras' initial numbers laid out (weights are loaded separately)."""
        return self.factory(**kwargs)

    def default_fine_tune_at(self, base: nn.Module) -> int:
        """The Keras index of :attr:`fine_tune_from` in ``base`` (it moves with EfficientNet's
        ``imagenet_rescaling``, so it is looked up, not stored)."""
        return base.keras_layer(self.fine_tune_from).index


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": MobileNetV2Base, "mobilenet_v3_large": MobileNetV3LargeBase,
    "efficientnet_b0": EfficientNetB0Base, "resnet50": ResNet50Base}
BACKBONES: dict[str, Backbone] = {name: Backbone(facts, _FACTORIES[name])
                                  for name, facts in BASES.items()}


def get_backbone(name: str) -> Backbone:
    """The member called ``name``; a :class:`UserError` naming the accepted ones otherwise."""
    if name not in BACKBONES:
        raise UserError(f"base {name!r} is not supported: expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_of(base: nn.Module) -> Backbone:
    """The member ``base`` was built as (by its Keras application name)."""
    application = getattr(base, "KERAS_NAME", "") or "MobileNetV2"
    for backbone in BACKBONES.values():
        if backbone.keras_application == application:
            return backbone
    raise ValueError(f"{type(base).__name__} is none of the bases: {', '.join(BACKBONES)}")


__all__ = ["BACKBONES", "Backbone", "EfficientNetB0Base", "MobileNetV3LargeBase", "ResNet50Base",
           "backbone_of", "get_backbone"]
