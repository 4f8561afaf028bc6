"""What sits in a Keras classifier between its input and its base, framework-free: which base a
nested model is, and the preprocessing recorded before it, evaluated in numpy and compared with
the base's own ``keras.applications.<module>.preprocess_input``.

Keras 3 records ``preprocess_input`` applied to a symbolic input as operations in the model's
configuration: MobileNetV2's ``x / 127.5 - 1`` as ``TrueDivide`` and ``Subtract``; ResNet50's
"caffe" as three ``GetItem`` (channels 2, 1, 0), a ``Stack`` on the last axis and an ``Add`` of
the negated ImageNet means; MobileNetV3's and EfficientNet's as nothing (the identity: those
models scale inside). Rather than match each pattern by its shape, the recorded layers are run
on probe pixels and compared with :data:`PREPROCESS_INPUT`: any spelling of the same function
passes (``Rescaling(1/127.5, offset=-1)`` too), and a wrong one (RGB left unflipped, MobileNetV2's
scaling before a base that scales itself) is named in one line.

Used by :mod:`tl_common.keras_config` (from-keras) and ``tl_keras.runner`` (``--inputs-scaled``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tl_common.bases import BASES
from tl_common.errors import UserError
from tl_common.recipe import scale_pixels

#: ``imagenet_utils.preprocess_input(mode="caffe")``'s means, in BGR order (ResNet50).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe(x: np.ndarray) -> np.ndarray:
    """RGB [0, 255] (channels last) -> BGR minus the ImageNet means, no scaling."""
    return x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, x.dtype)


def identity(x: np.ndarray) -> np.ndarray:
    """The bases that scale inside the model: their ``preprocess_input`` changes nothing."""
    return x


#: ``keras.applications.<module>.preprocess_input`` of each base, on channels-last arrays.
PREPROCESS_INPUT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mobilenet_v2": scale_pixels, "mobilenet_v3_large": identity,
    "efficientnet_b0": identity, "resnet50": caffe}
#: ... in words, for messages.
ACCEPTED = {
    "mobilenet_v2": "x / 127.5 - 1 (mobilenet_v2.preprocess_input) or "
                    "Rescaling(1/127.5, offset=-1)",
    "mobilenet_v3_large": "nothing: MobileNetV3Large scales inside the model "
                          "(mobilenet_v3.preprocess_input is the identity)",
    "efficientnet_b0": "nothing: EfficientNetB0 scales inside the model "
                       "(efficientnet.preprocess_input is the identity)",
    "resnet50": "resnet50.preprocess_input ('caffe': RGB -> BGR, ImageNet means subtracted)",
}
#: Layer names that only the base's own model holds (``include_top=False``): how a nested model
#: is recognised. The port compares the rest of its layer list when it loads the weights.
BASE_MARKERS = {
    "mobilenet_v2": ("Conv1", "out_relu"),
    "mobilenet_v3_large": ("conv", "expanded_conv_14_project", "conv_1"),
    "efficientnet_b0": ("stem_conv", "block7a_project_conv", "top_conv"),
    "resnet50": ("conv1_conv", "conv5_block3_out"),
}
#: The recorded preprocessing equals the base's when it does on the probe up to the float32
#: rounding of its constants (the means are stored as float32), a few ulps of the largest value.
SAME_FUNCTION_ULPS = 4
#: Keras operations (``keras.src.ops.numpy``) a recorded preprocessing may use.
OPERATIONS: dict[str, Callable[..., Any]] = {
    "TrueDivide": np.divide, "Divide": np.divide, "Subtract": np.subtract, "Add": np.add,
    "Multiply": np.multiply, "GetItem": lambda x, key: x[tuple(key)],
}


def base_of_layers(names: set[str]) -> str | None:
    """The base whose marker layers are all among ``names``."""
    for base, markers in BASE_MARKERS.items():
        if set(markers) <= names:
            return base
    return None


def application(base: str) -> str:
    return BASES[base].keras_application


def _value(arg: Any, values: dict[str, np.ndarray]) -> Any:
    """An argument of a recorded call: a tensor of the graph, a constant, a list of them."""
    if isinstance(arg, list):
        return [_value(a, values) for a in arg]
    if not isinstance(arg, dict):
        return arg
    kind, config = arg.get("class_name"), arg.get("config", {})
    if kind == "__keras_tensor__":
        return values[config["keras_history"][0]]
    if kind == "__ellipsis__":
        return Ellipsis
    if kind in ("__tensor__", "__numpy__"):
        return np.asarray(config["value"], np.float64)
    return arg


def _node_args(layer: dict[str, Any], values: dict[str, np.ndarray], previous: str) -> list:
    """The values a layer is called on: its recorded arguments (Keras 3), the layers it takes
    (legacy Keras 2 nodes), or the previous layer (a Sequential model records no nodes)."""
    nodes = layer.get("inbound_nodes") or []
    if not nodes:
        return [values[previous]]
    node = nodes[0]
    if isinstance(node, dict):
        return [_value(a, values) for a in node.get("args", [])]
    return [values[inbound[0]] for inbound in node]  # legacy: [[name, node, tensor, kwargs]]


def _apply(layer: dict[str, Any], args: list) -> np.ndarray | None:
    """The layer's output on the probe; None for a layer that is no preprocessing."""
    kind, config = layer["class_name"], layer.get("config", {})
    if not args:
        return None
    if kind == "Rescaling":
        scale, offset = (np.asarray(_value(config[k], {}), np.float64)
                         for k in ("scale", "offset"))
        return args[0] * scale + offset
    if kind == "Stack":
        return np.stack(args[0], axis=config.get("axis", 0))
    if kind in OPERATIONS and len(args) == 2:
        return np.asarray(OPERATIONS[kind](*args), np.float64)
    return None


def _is_augmentation(layer: dict[str, Any]) -> list[str]:
    """The Random* layers a layer is (itself, or a Sequential of them); [] otherwise."""
    inner = [x for x in layer.get("config", {}).get("layers", [])
             if x["class_name"] != "InputLayer"] if layer["class_name"] == "Sequential" \
        else [layer]
    return [x["class_name"] for x in inner] if inner and all(
        x["class_name"].startswith("Random") for x in inner) else []


def _probe() -> np.ndarray:
    """Pixels with every channel different, so a channel flip or a wrong mean shows."""
    return np.random.default_rng(0).uniform(0, 255, (1, 2, 2, 3))


def _describe(found: np.ndarray | None, probe: np.ndarray) -> str:
    if found is None:
        return "nothing"
    for name, function in PREPROCESS_INPUT.items():
        if function is not identity and _same(found, function(probe)):
            return f"{application(name)}'s preprocess_input"
    return "another preprocessing"


def _same(found: np.ndarray, expected: np.ndarray) -> bool:
    tolerance = SAME_FUNCTION_ULPS * np.finfo(np.float32).eps * max(1.0, np.abs(expected).max())
    return found.shape == expected.shape and bool(np.abs(found - expected).max() <= tolerance)


def read_input(before: list[dict[str, Any]], base_input: str, base: str, path: Path,
               inputs_scaled: bool) -> tuple[int, list[str], str | None]:
    """(image size, augmentation layers, the preprocessing found, in words) between the input
    and the base; one line naming the layer or the preprocessing that does not fit."""
    size, augmentation, probe = None, [], _probe()
    values: dict[str, np.ndarray] = {"": probe}  # "": the input of a model without InputLayer
    app, previous = application(base), ""
    for layer in before:
        kind, name = layer["class_name"], layer.get("name") or layer["config"]["name"]
        if kind == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            if shape and shape[1] is not None and shape[1] == shape[2]:
                size = int(shape[1])
            values[name] = probe
        else:
            args = _node_args(layer, values, previous)
            augmentation += _is_augmentation(layer)
            # Augmentation passes its input through at inference.
            out = args[0] if _is_augmentation(layer) else _apply(layer, args)
            if out is None:
                raise UserError(f"{path}: layer {name!r} ({kind}) before the {app} base is "
                                "neither augmentation (Random*) nor preprocessing: expected "
                                f"{ACCEPTED[base]}")
            values[name] = out
        previous = name
    if size is None:
        raise UserError(f"{path}: the model's input is not square with a fixed size; expected "
                        "Input((size, size, 3))")
    found = values.get(base_input)
    recorded = None if found is probe or base_input not in values else found
    return size, augmentation, _judge(recorded, probe, base, path, inputs_scaled)


def _judge(recorded: np.ndarray | None, probe: np.ndarray, base: str, path: Path,
           inputs_scaled: bool) -> str | None:
    """The recorded preprocessing against the base's; its description, or None for none."""
    app, expected = application(base), PREPROCESS_INPUT[base]
    if inputs_scaled:
        if recorded is not None:
            raise UserError(f"{path}: --inputs-scaled, but the model preprocesses its inputs "
                            f"before its {app} base ({_describe(recorded, probe)}): leave the "
                            "flag out")
        return None
    if recorded is None:
        if expected is identity:
            return None
        raise UserError(f"{path}: the model does not preprocess [0, 255] pixels before its {app} "
                        f"base (expected {ACCEPTED[base]}); if it expects inputs preprocessed "
                        f"already ({BASES[base].keras_module}.preprocess_input), pass "
                        "--inputs-scaled")
    if not _same(recorded, expected(probe)):
        raise UserError(f"{path}: the preprocessing before the {app} base is "
                        f"{_describe(recorded, probe)}, not the base's: expected {ACCEPTED[base]}")
    return f"{BASES[base].keras_module}.preprocess_input"
