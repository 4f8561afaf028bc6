"""The Keras applications ``--base`` chooses, built as the tutorial builds MobileNetV2:
``keras.applications.<App>(input_shape=(s, s, 3), include_top=False, weights=...)``, and the
``preprocess_input`` of each that the model applies before the base.

The facts of each base (its application, layer count, default fine-tune point, ImageNet file)
are :mod:`tl_common.bases`'; :mod:`tl_keras.model` builds the base and the model around it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
from collections.abc import Iterator

import keras
from keras.src.backend.common import global_state

from tl_common.bases import BASES, BaseFacts, base_facts


def keras_application(name: str, image_size: int, weights: str | None) -> keras.Model:
    """``keras.applications.<App>(include_top=False)`` for ``image_size`` inputs, weights as Keras
    loads them (``"imagenet"``: Keras' own download, or None)."""
    s = image_size
    build = getattr(keras.applications, base_facts(name).keras_application)
    # The input named, because Keras numbers unnamed inputs per session (input_layer_1, _2 ...)
    # and the layer list must not depend on how many models were built before; the same for
    # the layers these applications leave unnamed (EfficientNet's rescaling, normalization).
    with fresh_layer_names():
        return build(input_shape=(s, s, 3), include_top=False, weights=weights,
                     input_tensor=keras.Input((s, s, 3), name="input_layer"))


@contextlib.contextmanager
def fresh_layer_names() -> Iterator[None]:
    """Unnamed layers built inside are numbered from zero, as in a fresh session (the names in
    Keras' own files: ``rescaling``, not ``rescaling_3``); the session's count is given back
    afterwards. Keras has no public call for this: its process-wide count lives in
    ``global_state`` under ``object_name_uids`` (Keras 3.15)."""
    saved = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute(
            "object_name_uids", saved if saved is not None else collections.defaultdict(int))


def facts_of(base: keras.Model) -> BaseFacts:
    """Which of :data:`tl_common.bases.BASES` ``base`` is, by the name Keras gives the model
    (``mobilenetv2_1.00_160``, ``MobileNetV3Large``, ``efficientnetb0``, ``resnet50``)."""
    name = base.name.lower()
    for facts in BASES.values():
        if name.startswith(facts.keras_application.lower()):
            return facts
    raise ValueError(f"{base.name!r} is none of the bases: "
                     f"{', '.join(f.keras_application for f in BASES.values())}")


def preprocess_input(base: keras.Model, x: keras.KerasTensor) -> keras.KerasTensor:
    """The base's own ``keras.applications.<module>.preprocess_input``, as the tutorial applies
    it: ``x / 127.5 - 1`` (MobileNetV2), the identity (MobileNetV3 and EfficientNet scale inside
    the model), "caffe" (ResNet50: RGB to BGR, ImageNet means subtracted)."""
    module = importlib.import_module(f"keras.applications.{facts_of(base).keras_module}")
    return module.preprocess_input(x)
