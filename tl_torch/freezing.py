"""Freezing and counting in Keras' sense.

``freeze(base, fine_tune_at=k)`` freezes what ``for layer in base.layers[:k]: layer.trainable =
False`` freezes after ``base.trainable = True`` (k = 154 freezes everything, as
``base.trainable = False`` does). ``count_params`` counts like Keras' summary: BatchNorm moving
mean and variance are non-trainable weights, ``num_batches_tracked`` is not a weight at all.

Any base that lists Keras' layers as ``keras_layers`` works here (MobileNetV2Base and the bases of
:mod:`tl_torch.backbones`). Keras weights held as buffers (a module's ``KERAS_BUFFER_WEIGHTS``, as
``Normalization``'s mean, variance and count) are non-trainable weights whatever is frozen.
"""

from __future__ import annotations

from torch import nn

from tl_common.errors import UserError
from tl_torch.model import MobileNetV2Base

#: A base: any module with Keras' layer list (MobileNetV2Base, tl_torch.backbones' bases).
Base = MobileNetV2Base | nn.Module


def freeze(base: Base, fine_tune_at: int) -> Base:
    """Freeze the Keras layers with index < ``fine_tune_at``; train the others."""
    n = len(base.keras_layers)
    if isinstance(fine_tune_at, bool) or not isinstance(fine_tune_at, int) or not 0 <= fine_tune_at <= n:
        raise UserError(f"fine_tune_at={fine_tune_at!r} is not accepted: expected a Keras layer "
                        f"index in 0..{n}")
    for layer in base.keras_layers:
        for p in layer.parameters():
            p.requires_grad_(layer.index >= fine_tune_at)
    base.frozen_below = fine_tune_at
    return base


def count_params(module: nn.Module) -> tuple[int, int]:
    """``(trainable, non_trainable)`` as Keras counts them."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    stats = sum(m.running_mean.numel() + m.running_var.numel()
                for m in module.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
    buffers = sum(getattr(m, name).numel() for m in module.modules()
                  for name in getattr(m, "KERAS_BUFFER_WEIGHTS", ()))
    return trainable, frozen + stats + buffers


def layer_table(base: Base) -> list[tuple[int, str, str, bool]]:
    """(index, Keras type, Keras name, trainable) for every layer of the base, as the recipe prints."""
    return [(layer.index, layer.type, layer.name, layer.index >= base.frozen_below)
            for layer in base.keras_layers]
