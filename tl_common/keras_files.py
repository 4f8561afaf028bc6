"""Keras weights and model files read with h5py: what kind a file is, and the layers it holds.

Framework-free, so both sides use the one reader: the Keras reference checks a file against its
base before Keras assigns anything (``tl_keras.model.load_weights_file``), and the port takes its
weights from it without TensorFlow (``tl_torch.keras_weights``).

Layouts:
- legacy HDF5 weights (``model.save_weights("x.h5")``; the official ImageNet files): root
  attribute ``layer_names``, per layer ``weight_names`` such as ``Conv1/kernel:0``, read in that
  order;
- Keras 3 ``.weights.h5``: ``layers/<auto name>/vars/<i>``, where the auto name is the layer's
  class and rank (``conv2d``, ``conv2d_1`` ...), the layer's own name is the ``vars`` group's
  ``name`` attribute, and variables are numbered in creation order;
- whole models: legacy ``.h5`` (``model_config`` attribute, weights under ``model_weights/``) and
  ``.keras`` archives (a zip holding ``model.weights.h5`` in the Keras 3 layout), where the layers
  sit in nested sub-models as often as not.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tl_common.errors import UserError

#: Keras 2 named the depthwise kernel differently.
VARIABLE_ALIASES = {"depthwise_kernel": "kernel"}
#: What :func:`file_kind` tells apart.
KINDS = ("model", "legacy_weights", "weights")


def file_kind(path: str | os.PathLike[str]) -> str:
    """``model`` (a whole model: ``.keras`` or ``.h5`` with a ``model_config``), ``legacy_weights``
    or ``weights`` (Keras 3), read from the content of an existing file; a :class:`UserError` for
    a file that is none of them."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "model"
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is neither an HDF5 file (.h5, .weights.h5) nor a .keras archive: "
                        "expected a Keras weights or model file")
    with h5py.File(path, "r") as f:
        if "model_config" in f.attrs:
            return "model"
        if "layer_names" in f.attrs:
            return "legacy_weights"
        if "layers" in f:
            return "weights"
    raise UserError(f"{path} is an HDF5 file but not a Keras one (no model_config, layer_names or "
                    "layers/): expected a Keras weights or model file")


@dataclass
class Container:
    """Layers found side by side in a file (a model or sub-model), in the file's order.

    ``layers``: layer name -> {variable: dataset}; the variables are Keras' names (legacy files)
    or creation-order indices ``"0"``, ``"1"`` ... (Keras 3). ``keys``: Keras 3 only, the group
    name of each layer (its class and rank), which is what ``load_weights`` matches on.
    """

    where: str
    layers: dict[str, dict[str, h5py.Dataset]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def shapes(self, name: str) -> list[tuple[int, ...]]:
        """The shapes of a layer's variables, in order; [] for a layer not held."""
        return [tuple(v.shape) for v in self.layers.get(name, {}).values()]


@dataclass
class KerasFile:
    """An open Keras file and the layer containers found in it; :attr:`top` is the file's own."""

    path: Path
    h5: h5py.File
    containers: list[Container]
    whole_model: bool
    keras3: bool

    @property
    def top(self) -> Container:
        """The layers of the file's outermost model (its last container)."""
        return self.containers[-1] if self.containers else Container("")

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> KerasFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _short_name(weight_name: str) -> str:
    name = weight_name.split("/")[-1].split(":")[0]
    return VARIABLE_ALIASES.get(name, name)


def _legacy_containers(group: h5py.Group, where: str) -> Iterator[Container]:
    """Legacy HDF5: a group with ``layer_names`` is a model; a layer group with ``weight_names``
    that point into sub-groups named after other layers is a nested model. Nested models first,
    the group's own layers last."""
    container = Container(where)
    for layer_name in _decode(group.attrs.get("layer_names", [])):
        if layer_name not in group:
            continue
        layer_group = group[layer_name]
        weight_names = _decode(layer_group.attrs.get("weight_names", []))
        owners = {w.split("/")[0] for w in weight_names if "/" in w}
        if len(owners) > 1 or (owners and owners != {layer_name} and
                               all(o in layer_group for o in owners)):
            # A nested model: its weight names are "<inner layer>/<variable>".
            nested = Container(f"{where}/{layer_name}")
            for w in weight_names:
                inner = w.split("/")[0]
                nested.layers.setdefault(inner, {})[_short_name(w)] = layer_group[w]
            yield nested
            continue
        if weight_names:
            container.layers[layer_name] = {_short_name(w): layer_group[w] for w in weight_names}
    yield container


def _keras3_containers(group: h5py.Group, where: str) -> Iterator[Container]:
    """Keras 3: ``layers/<auto name>/vars`` with the layer's real name as an attribute; nested
    models have ``layers`` of their own. Nested models first, the group's own layers last."""
    if "layers" not in group:
        return
    container = Container(where)
    for key in group["layers"]:
        layer_group = group["layers"][key]
        if "layers" in layer_group:
            yield from _keras3_containers(layer_group, f"{where}/layers/{key}")
        elif "model" in layer_group:  # a layer wrapping a model (tl_keras' InferenceMode)
            yield from _keras3_containers(layer_group["model"], f"{where}/layers/{key}/model")
        vars_group = layer_group.get("vars")
        if vars_group is None or len(vars_group) == 0:
            continue
        name = vars_group.attrs.get("name", key)
        name = name.decode() if isinstance(name, bytes) else str(name)
        container.layers[name] = {str(i): vars_group[str(i)] for i in range(len(vars_group))}
        container.keys[key] = name
    yield container


def open_keras_file(path: str | os.PathLike[str]) -> KerasFile:
    """Open any Keras weights or model file and list the layer containers in it; a
    :class:`UserError` naming the problem for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if "model.weights.h5" not in zf.namelist():
                    raise UserError(f"{path} is a zip archive without model.weights.h5: "
                                    "expected a .keras model file")
                h5 = h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r")
            whole = True
        else:
            h5 = h5py.File(path, "r")
            whole = "model_config" in h5.attrs or "model_weights" in h5
    except OSError:
        raise UserError(f"{path} is not an HDF5 or .keras file: expected Keras weights "
                        "(.h5, .weights.h5) or a Keras model (.h5, .keras)") from None
    try:
        keras3 = "layers" in h5 and "layer_names" not in h5.attrs
        if keras3:
            containers = list(_keras3_containers(h5, ""))
        else:
            root = h5["model_weights"] if "model_weights" in h5 else h5
            containers = list(_legacy_containers(root, "/" + root.name.strip("/")))
    except (KeyError, OSError, ValueError) as err:
        h5.close()
        raise UserError(f"{path} is not a readable Keras file ({err})") from None
    return KerasFile(path, h5, containers, whole, keras3)
