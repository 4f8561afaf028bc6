"""Write the Keras 3 configuration of a classifier around one of the bases, as Keras itself
builds it: ``python -m tl_torch.convert to-keras`` runs this in a fresh process for every base
but MobileNetV2 (whose configuration it writes without TensorFlow), so that the port's processes
import no TensorFlow.

Run::

    python -m tl_keras.export_config REQUEST.json OUT.json

``REQUEST.json``: ``base`` (a ``--base`` name), ``image_size``, ``units`` (1, or the classes),
``dropout``, ``augment``, ``seed``, ``fine_tune_at`` and, for EfficientNetB0,
``imagenet_rescaling``. ``OUT.json``: the model's configuration, the tutorial's pattern with the
base swapped: input -> [augmentation] -> the base's ``preprocess_input`` -> ``base(x,
training=False)`` -> GlobalAveragePooling2D -> Dropout -> Dense. The base is called plainly, not
through this project's InferenceMode layer, so the file opens with Keras alone; its layers
before ``fine_tune_at`` are frozen, as fine-tuning leaves them. No weights: the converter writes
them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

# The package's __init__ (TensorFlow's environment, import order) has run before this module.
import keras
from keras import layers

from tl_common import recipe
from tl_common.errors import UserError, run_main
from tl_common.keras_writer import keras_tensor
from tl_keras.bases import fresh_layer_names, keras_application, preprocess_input
from tl_keras.model import data_augmentation, set_phase

#: EfficientNet's extra layer for ImageNet weights, named as Keras names it in a fresh session.
IMAGENET_RESCALING = "rescaling_1"


def with_imagenet_rescaling(base: keras.Model) -> keras.Model:
    """EfficientNet as Keras builds it for ``weights="imagenet"``: one more
    ``Rescaling(1/sqrt(std))`` after the Normalization (Keras only builds it while downloading
    the weights, so it is inserted into the ``weights=None`` model's configuration)."""
    from keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    config = keras.saving.serialize_keras_object(base)
    entries = config["config"]["layers"]
    at = next(i for i, x in enumerate(entries) if x["name"] == "normalization") + 1
    shape = tuple(base.get_layer("normalization").output.shape[1:])
    extra = keras.saving.serialize_keras_object(layers.Rescaling(
        [1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB], name=IMAGENET_RESCALING))
    extra.update(name=IMAGENET_RESCALING, inbound_nodes=[
        {"args": [keras_tensor("normalization", shape)], "kwargs": {}}])
    entries.insert(at, extra)
    # The next layer takes the new one's output.
    entries[at + 1]["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0] = \
        IMAGENET_RESCALING
    with fresh_layer_names():
        return keras.saving.deserialize_keras_object(config)


def classifier(request: dict[str, Any]) -> keras.Model:
    """The tutorial's classifier around the requested base (no weights)."""
    name, size, seed = request["base"], int(request["image_size"]), int(request["seed"])
    base = keras_application(name, size, None)
    if request.get("imagenet_rescaling"):
        base = with_imagenet_rescaling(base)
    set_phase(base, "fine_tuning", int(request["fine_tune_at"]))
    with fresh_layer_names():
        inputs = keras.Input((size, size, 3), name="input_layer")
        x = data_augmentation(seed)(inputs) if request["augment"] else inputs
        x = preprocess_input(base, x)
        x = base(x, training=False)                                          # (N, s/32, s/32, C)
        x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)    # (N, C)
        x = layers.Dropout(float(request["dropout"]), seed=seed + recipe.DROPOUT_SEED_OFFSET,
                           name="dropout")(x)
        outputs = layers.Dense(int(request["units"]), name="dense")(x)
        return keras.Model(inputs, outputs, name="functional")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tl_keras.export_config",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("request", type=Path, help="the classifier's settings (.json)")
    parser.add_argument("out", type=Path, help="where the configuration goes (.json)")
    args = parser.parse_args(argv)
    request = json.loads(args.request.read_text())
    missing = [k for k in ("base", "image_size", "units", "dropout", "augment", "seed",
                           "fine_tune_at") if k not in request]
    if missing:
        raise UserError(f"{args.request} has no {missing[0]!r}: expected base, image_size, "
                        "units, dropout, augment, seed and fine_tune_at")
    args.out.write_text(json.dumps(keras.saving.serialize_keras_object(classifier(request))))


if __name__ == "__main__":
    run_main(main)
