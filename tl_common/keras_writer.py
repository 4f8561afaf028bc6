"""Keras model configurations written as JSON, framework-free: layers, their inbound tensors,
and the reference's classifier around a base's configuration (``tl_torch.convert to-keras``).

No TensorFlow, no torch: what :mod:`tl_common.keras_config` reads, this writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tl_common.recipe import PIXEL_OFFSET, PIXEL_SCALE


def keras_tensor(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The output of layer ``name`` as another layer's inbound argument (batch dimension free)."""
    return {"class_name": "__keras_tensor__",
            "config": {"shape": [None, *shape], "dtype": "float32", "keras_history": [name, 0, 0]}}


def keras_layer(class_name: str, name: str, config: dict[str, Any], args: list[Any] | None,
                kwargs: dict[str, Any] | None = None, module: str = "keras.layers",
                registered_name: str | None = None) -> dict[str, Any]:
    """One layer of a functional model's configuration, called on ``args`` (None: an input)."""
    layer = {"module": module, "class_name": class_name, "config": {"name": name, **config},
             "registered_name": registered_name, "name": name}
    layer["inbound_nodes"] = [] if args is None else [{"args": args, "kwargs": kwargs or {}}]
    return layer


def input_layer(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return keras_layer("InputLayer", name, {"batch_shape": [None, *shape], "dtype": "float32",
                                            "sparse": False}, None)


def functional(name: str, layers: list[dict[str, Any]], inputs: str, output: str
               ) -> dict[str, Any]:
    """A functional model's configuration from its layers."""
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "registered_name": "Functional",
            "config": {"name": name, "trainable": True, "layers": layers,
                       "input_layers": [[inputs, 0, 0]], "output_layers": [[output, 0, 0]]}}


@dataclass
class HeadSpec:
    """The reference classifier's settings around its base (``tl_keras.model.build_model``)."""

    image_size: int
    units: int
    dropout: float
    augment: bool
    flip_seed: int
    rotation_seed: int
    dropout_seed: int
    rotation_factor: float


def _augmentation(spec: HeadSpec, previous: str) -> dict[str, Any]:
    image = (spec.image_size, spec.image_size, 3)
    factor = spec.rotation_factor
    inner = [{"module": "keras.layers", "class_name": "InputLayer", "registered_name": None,
              "config": {"name": "input_layer_1", "batch_shape": [None, *image],
                         "dtype": "float32", "sparse": False}},
             {"module": "keras.layers", "class_name": "RandomFlip", "registered_name": None,
              "config": {"name": "random_flip", "mode": "horizontal", "seed": spec.flip_seed}},
             {"module": "keras.layers", "class_name": "RandomRotation", "registered_name": None,
              "config": {"name": "random_rotation", "factor": [-factor, factor],
                         "fill_mode": "reflect", "interpolation": "bilinear",
                         "seed": spec.rotation_seed}}]
    return keras_layer("Sequential", "data_augmentation",
                       {"layers": inner, "build_input_shape": [None, *image]},
                       [keras_tensor(previous, image)], module="keras")


def classifier_config(spec: HeadSpec, base: dict[str, Any]) -> dict[str, Any]:
    """The reference's model (augmentation, ``x / 127.5 - 1``, the base as a nested model called
    with ``training=False``, pooling, dropout, dense) around a base's configuration, without the
    reference's own InferenceMode layer."""
    image = (spec.image_size, spec.image_size, 3)
    layers, previous = [input_layer("input_layer", image)], "input_layer"
    if spec.augment:  # the recipe's augmentation, active in training only
        layers.append(_augmentation(spec, previous))
        previous = "data_augmentation"
    layers.append(keras_layer("TrueDivide", "true_divide", {},
                              [keras_tensor(previous, image), PIXEL_SCALE],
                              module="keras.src.ops.numpy", registered_name="TrueDivide"))
    layers.append(keras_layer("Subtract", "subtract", {},
                              [keras_tensor("true_divide", image), PIXEL_OFFSET],
                              module="keras.src.ops.numpy", registered_name="Subtract"))
    base_name = base["config"]["name"]
    base = {**base, "name": base_name, "inbound_nodes": [
        {"args": [keras_tensor("subtract", image)], "kwargs": {"training": False}}]}
    layers.append(base)
    last = base["config"]["layers"][-1]["inbound_nodes"][0]["args"][0]["config"]["shape"]
    features = tuple(last[1:])  # (s/32, s/32, C): the base's last layer keeps its input's shape
    width = (features[-1],)
    layers += [
        keras_layer("GlobalAveragePooling2D", "global_average_pooling2d",
                    {"data_format": "channels_last", "keepdims": False},
                    [keras_tensor(base_name, features)]),
        keras_layer("Dropout", "dropout", {"rate": float(spec.dropout), "seed": spec.dropout_seed},
                    [keras_tensor("global_average_pooling2d", width)]),
        keras_layer("Dense", "dense", {"units": spec.units, "activation": "linear",
                                       "use_bias": True},
                    [keras_tensor("dropout", width)]),
    ]
    return {**functional("functional", layers, "input_layer", "dense"),
            "build_config": {"input_shape": None}}
