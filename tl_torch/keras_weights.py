"""Keras weight files <-> a Keras-faithful base, with h5py and without TensorFlow.

Works for any base that lists Keras' layers as ``keras_layers`` (:class:`tl_torch.model.
MobileNetV2Base`, the bases of :mod:`tl_torch.backbones`). Reads any Keras weights or model file
(legacy HDF5, Keras 3 ``.weights.h5``, whole ``.h5`` and ``.keras`` models; the layouts are
described in :mod:`tl_common.keras_files`, whose reader this uses), finding the base by
structure: its layers and shapes, wherever it sits.

Writes both weights layouts, so a base fine-tuned in PyTorch loads in Keras with
``base.load_weights(path)``.

Layout conversions (a reshape instead of these transposes keeps shapes and scrambles values):
- ``Conv2D`` kernel ``(kh, kw, in, out)`` -> weight ``(out, in, kh, kw)``: transpose (3, 2, 0, 1);
- ``DepthwiseConv2D`` kernel ``(kh, kw, C, 1)`` -> weight ``(C, 1, kh, kw)``: transpose (2, 3, 0, 1);
- ``BatchNormalization`` gamma, beta, moving_mean, moving_variance -> weight, bias, running_mean,
  running_var;
- a ``Conv2D`` with a bias has it as its second variable; ``Normalization``'s mean, variance and
  count are buffers of the same names (non-trainable weights in Keras).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from tl_common.errors import UserError
from tl_common.keras_files import Container, open_keras_file
from tl_common.outputs import replaced_atomically
from tl_torch.model import KerasLayer

#: Keras variable names per layer type, in creation order (the order of ``layer.weights`` and of
#: the ``vars/<i>`` datasets of ``.weights.h5`` files), and the torch tensor each one becomes.
KERAS_VARIABLES = {
    "Conv2D": (("kernel", "weight"),),
    "DepthwiseConv2D": (("kernel", "weight"),),
    "BatchNormalization": (("gamma", "weight"), ("beta", "bias"),
                           ("moving_mean", "running_mean"), ("moving_variance", "running_var")),
    "Normalization": (("mean", "mean"), ("variance", "variance"), ("count", "count")),
}
#: A base: any module with Keras' layer list (MobileNetV2Base, tl_torch.backbones' bases).
Base = torch.nn.Module


def keras_variables(layer: KerasLayer) -> tuple[tuple[str, str], ...]:
    """(Keras variable, torch tensor) of a layer, in Keras' creation order; () for none."""
    if layer.module is None:
        return ()
    table = KERAS_VARIABLES.get(layer.type, ())
    if layer.type == "Conv2D" and getattr(layer.module, "bias", None) is not None:
        table += (("bias", "bias"),)
    if layer.has_weights and not table:  # guards the table against a layer type it lacks
        raise RuntimeError(f"no Keras variable table for {layer.type} layer {layer.name}")
    return table


def _architecture(base: Base) -> tuple[str, str, str]:
    """How messages name the base: its Keras name, the base in a sentence, its settings."""
    name = getattr(base, "KERAS_NAME", "") or "MobileNetV2"
    alpha = "alpha 1.0, " if name == "MobileNetV2" else ""
    return name, f"{name} base ({alpha}no top)", f"{name} {alpha}include_top=False"


def _dtype(dataset: h5py.Dataset | np.ndarray) -> type:
    """float32 for Keras' float variables; integer ones (Normalization's count) keep theirs."""
    return np.float32 if np.issubdtype(dataset.dtype, np.floating) else dataset.dtype


#: Keras' version string written into exported files (the layout they follow).
EXPORT_KERAS_VERSION = "3.15.1"


def keras_to_torch(keras_type: str, array: np.ndarray) -> np.ndarray:
    """A Keras variable in torch's layout."""
    if keras_type == "Conv2D" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)     # (kh, kw, in, out) -> (out, in, kh, kw)
    if keras_type == "DepthwiseConv2D":
        return array.transpose(2, 3, 0, 1)     # (kh, kw, C, 1) -> (C, 1, kh, kw)
    return array


def torch_to_keras(keras_type: str, array: np.ndarray) -> np.ndarray:
    """A torch tensor in Keras' layout (the inverse of :func:`keras_to_torch`)."""
    if keras_type == "Conv2D" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if keras_type == "DepthwiseConv2D":
        return array.transpose(2, 3, 0, 1)
    return array


# ---- reading (the file's structure: tl_common.keras_files) -----------------------------------

def _expected(base: Base) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """Per weighted Keras layer: (Keras variable, torch name, Keras shape), in creation order."""
    expected = {}
    for layer in base.keras_layers:
        variables = keras_variables(layer)
        if not variables:
            continue
        state = dict(layer.module.named_parameters()) | dict(layer.module.named_buffers())
        entries = []
        for keras_name, torch_name in variables:
            shape = torch_to_keras(layer.type, state[torch_name].detach().numpy()).shape
            entries.append((keras_name, torch_name, tuple(shape)))
        expected[layer.name] = entries
    return expected


def _mismatch(container: Container, expected: dict, keras3: bool, settings: str) -> str | None:
    """The first difference between a container and the base, as a sentence; None if none."""
    for layer_name, entries in expected.items():
        found = container.layers.get(layer_name)
        if found is None:
            return f"layer {layer_name} is missing"
        if len(found) != len(entries):
            return (f"layer {layer_name} has {len(found)} variables, expected {len(entries)} "
                    f"({', '.join(e[0] for e in entries)})")
        for i, (keras_name, _, shape) in enumerate(entries):
            dataset = found.get(str(i)) if keras3 else found.get(keras_name)
            if dataset is None:
                return f"layer {layer_name} has no variable {keras_name}"
            if tuple(dataset.shape) != shape:
                return (f"layer {layer_name}: {keras_name} has shape {tuple(dataset.shape)}, "
                        f"expected {shape} ({settings})")
    return None


def read_base_weights(base: Base, path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The base's tensors from a Keras file, keyed like ``base.state_dict()``, in torch layout.

    Raises :class:`UserError` naming the first offending layer when no container in the file
    is this architecture.
    """
    kfile = open_keras_file(path)
    try:
        expected = _expected(base)
        name, described, settings = _architecture(base)
        problems = []
        for container in sorted(kfile.containers, key=lambda c: -len(c.layers)):
            problem = _mismatch(container, expected, kfile.keras3, settings)
            if problem is None:
                extra = [n for n in container.layers if n not in expected]
                if extra and not kfile.whole_model:
                    problem = (f"layer {extra[0]} is not part of {name}(include_top=False): "
                               "expected the weights of the base alone")
                else:
                    return _convert(base, container, expected, kfile.keras3)
            problems.append((len(set(container.layers) & set(expected)), container.where, problem))
        if not problems:
            raise UserError(f"{kfile.path} holds no layer weights")
        _, where, problem = max(problems, key=lambda p: p[0])
        raise UserError(f"{kfile.path} does not hold a {described}: in {where or '/'}, {problem}")
    finally:
        kfile.close()


def _convert(base: Base, container: Container, expected: dict,
             keras3: bool) -> dict[str, np.ndarray]:
    types = {layer.name: layer.type for layer in base.keras_layers}
    state = {}
    for layer_name, entries in expected.items():
        found = container.layers[layer_name]
        for i, (keras_name, torch_name, _) in enumerate(entries):
            dataset = found[str(i)] if keras3 else found[keras_name]
            array = np.asarray(dataset, dtype=_dtype(dataset))
            state[f"{layer_name}.{torch_name}"] = keras_to_torch(types[layer_name], array)
    return state


def load_keras_weights(base: Base, path: str | os.PathLike[str]) -> Base:
    """Load a Keras file's weights into ``base``: every tensor checked by name and shape."""
    state = read_base_weights(base, path)
    own = base.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:  # every Keras variable maps to a torch tensor; this guards the tables above
        raise RuntimeError(f"no Keras value for {missing[:3]}")
    with torch.no_grad():
        for key, array in state.items():
            own[key].copy_(torch.from_numpy(np.array(array, order="C")))
    return base


# ---- writing ---------------------------------------------------------------------------------

def _snake_case(name: str) -> str:
    """Keras' ``naming.to_snake_case``: ``DepthwiseConv2D`` -> ``depthwise_conv2d``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _keras_arrays(base: Base, layer: KerasLayer) -> list[tuple[str, np.ndarray]]:
    variables = keras_variables(layer)
    if not variables:
        return []
    state = dict(layer.module.named_parameters()) | dict(layer.module.named_buffers())
    return [(keras_name, torch_to_keras(layer.type, state[torch_name].detach().cpu().numpy()))
            for keras_name, torch_name in variables]


def save_keras_weights(base: Base, path: str | os.PathLike[str]) -> Path:
    """Write the base's weights as a Keras weights file that ``base.load_weights(path)`` reads.

    ``*.weights.h5`` gets Keras 3's layout, any other ``*.h5`` the legacy HDF5 one. Written to a
    temporary file and renamed, so an interrupted export leaves no partial file.
    """
    path = Path(path)
    if not path.name.endswith(".h5"):
        raise UserError(f"cannot export to {path}: expected a name ending in .weights.h5 "
                        "(Keras 3 layout) or .h5 (legacy HDF5 layout)")
    with replaced_atomically(path, f".{path.name}.tmp") as tmp, h5py.File(tmp, "w") as f:
        if path.name.endswith(".weights.h5"):
            _write_keras3(base, f)
        else:
            _write_legacy(base, f)
    return path


def _write_keras3(base: Base, f: h5py.File) -> None:
    layers = f.create_group("layers")
    f.create_group("vars")
    counters: dict[str, int] = {}
    for layer in base.keras_layers:
        key = _snake_case(layer.type)
        n = counters.get(key, 0)
        counters[key] = n + 1
        group = layers.create_group(key if n == 0 else f"{key}_{n}")
        vars_group = group.create_group("vars")
        vars_group.attrs["name"] = layer.name
        for i, (_, array) in enumerate(_keras_arrays(base, layer)):
            vars_group.create_dataset(str(i), data=np.array(array, dtype=_dtype(array), order="C"))


def _write_legacy(base: Base, f: h5py.File) -> None:
    names = [layer.name for layer in base.keras_layers]
    f.attrs["layer_names"] = np.array([n.encode() for n in names])
    f.attrs["backend"] = b"tensorflow"
    f.attrs["keras_version"] = EXPORT_KERAS_VERSION.encode()
    for layer in base.keras_layers:
        group = f.create_group(layer.name)
        arrays = _keras_arrays(base, layer)
        weight_names = [f"{layer.name}/{keras_name}" for keras_name, _ in arrays]
        group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
        for weight_name, (_, array) in zip(weight_names, arrays, strict=True):
            group.create_dataset(weight_name, data=np.array(array, dtype=_dtype(array), order="C"))


def describe_file(path: str | os.PathLike[str]) -> dict[str, object]:
    """What a Keras file is, for reports: layout, whole model or not, where the base sits."""
    kfile = open_keras_file(path)
    try:
        config = kfile.h5.attrs.get("model_config")
        return {
            "path": str(kfile.path),
            "layout": "keras3" if kfile.keras3 else "legacy_hdf5",
            "whole_model": kfile.whole_model,
            "containers": [c.where or "/" for c in kfile.containers if c.layers],
            "model_class": json.loads(config)["class_name"] if config else None,
        }
    finally:
        kfile.close()
