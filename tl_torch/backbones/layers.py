"""Keras layers that the applications use and torch has no one-module equivalent for.

Each module computes what its Keras layer computes, in the same order of operations, so that a
float64 run agrees with Keras' to rounding. Tensors are NCHW here, channels-last in Keras.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: ``keras.config.epsilon()``: Normalization divides by ``max(sqrt(variance), epsilon)``.
KERAS_EPSILON = 1e-7

#: Keras' activation names -> torch functions (Keras' ``hard_swish`` is ``x * relu6(x + 3) / 6``).
ACTIVATIONS = {
    "relu": F.relu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "hard_swish": F.hardswish,
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Rescaling(nn.Module):
    """``Rescaling(scale, offset)``: ``x * scale + offset``, the scale per channel if a sequence.

    The scale is rounded to float32 whatever the precision: Keras casts its Python number to the
    layer's dtype through a TensorFlow constant, which is float32 first (so a float64 Keras model
    multiplies by float32(1/127.5), not by 1/127.5).
    """

    def __init__(self, scale: float | Sequence[float], offset: float = 0.0) -> None:
        super().__init__()
        values = torch.tensor(scale, dtype=torch.float32).to(torch.float64).reshape(1, -1, 1, 1)
        # Not in the state dict: Keras keeps the scale in the layer's config, not its weights.
        self.register_buffer("scale", values, persistent=False)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.offset

    def extra_repr(self) -> str:
        return f"scale={self.scale.flatten().tolist()}, offset={self.offset}"


class Normalization(nn.Module):
    """``Normalization(axis=channels)``: ``(x - mean) / max(sqrt(variance), epsilon)``.

    Its mean, variance and count are Keras weights (non-trainable, in the weights files), held as
    buffers so that freezing never makes them trainable.
    """

    #: Keras variables in creation order = buffer names; counted as non-trainable weights.
    KERAS_BUFFER_WEIGHTS = ("mean", "variance", "count")

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("variance", torch.ones(channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.clamp(torch.sqrt(self.variance), min=KERAS_EPSILON).view(1, -1, 1, 1)
        return (x - self.mean.view(1, -1, 1, 1)) / std


class Activation(nn.Module):
    """``Activation(name)``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.fn = name, _activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class Conv2dAct(nn.Conv2d):
    """``Conv2D(..., activation=name)``: one Keras layer whose output is already activated."""

    def __init__(self, *args, activation: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.activation, self.fn = activation, _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(super().forward(x))


class GlobalAveragePooling2D(nn.Module):
    """The mean over height and width: ``(N, C)``, or ``(N, C, 1, 1)`` with ``keepdims``."""

    def __init__(self, keepdims: bool = False) -> None:
        super().__init__()
        self.keepdims = keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=self.keepdims)


class Reshape(nn.Module):
    """``Reshape((1, 1, C))`` of pooled features: ``(N, C)`` -> ``(N, C, 1, 1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, 1, 1)


class Multiply(nn.Module):
    """``Multiply()([a, b])``: the squeeze-and-excitation gate applied to the features."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class StochasticDepth(nn.Module):
    """``Dropout(rate, noise_shape=(None, 1, 1, 1))``: drops whole samples of a residual branch.

    Never active in the recipe: the base runs in inference mode (``base(x, training=False)``, kept
    by the base's ``train`` override), where Keras' Dropout returns its input unchanged. The
    training-mode branch is Keras' own rule, for anyone who runs this module on its own.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate={rate!r}; expected a dropout rate in [0, 1)")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) >= self.rate
        return x * keep / (1.0 - self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"
