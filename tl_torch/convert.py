"""Whole trained classifiers across the border: Keras model -> port run folder, port run -> Keras
model, port run -> ONNX.

Run::

    python -m tl_torch.convert from-keras MODEL.keras|MODEL.h5 OUT_DIR [--class-names a,b]
    python -m tl_torch.convert to-keras RUN_DIR OUT.keras
    python -m tl_torch.convert to-onnx RUN_DIR OUT.onnx

``from-keras`` takes a whole Keras model with a MobileNetV2 base (alpha 1.0, no top) and the
recipe's head, GlobalAveragePooling2D -> [Dropout] -> Dense(1 or N) (a linear, sigmoid or softmax
Dense), as ``tl_keras.train`` writes it or as someone else built it (found by structure: a nested
base, the reference's ``InferenceMode`` wrapper, or the base's layers inline), and writes
``OUT_DIR/model.ckpt``, which ``python -m tl_torch.predict OUT_DIR`` and
``TransferModule.load_from_checkpoint`` use alone. Between the input and the base it accepts
augmentation layers (``Random*``, inactive at inference) and the [0, 255] -> [-1, 1] scaling
(``preprocess_input``'s divide and subtract, or ``Rescaling(1/127.5, offset=-1)``); a model without
that scaling takes inputs already scaled: say so with ``--inputs-scaled``. The class names come
from ``--class-names``, else from the ``metrics.json`` of a ``tl_keras.train`` run beside the
model, else ``class_0``... A layer that does not fit is named in a one-line error.

``to-keras`` writes the reference's architecture (augmentation, ``x / 127.5 - 1``, the base as a
nested model called with ``training=False``, pooling, dropout, dense) as a Keras 3 ``.keras`` zip
(``config.json``, ``metadata.json``, ``model.weights.h5``) with json and h5py: no TensorFlow here,
and no layer of this project in it, so ``keras.models.load_model`` opens it anywhere. The base's
``trainable`` flags are those of fine-tuning from ``fine_tune_at``; Keras' own ``fit`` would run
the unfrozen BatchNorm layers in training mode (keras-team/keras#20285, which the reference avoids
with its ``InferenceMode`` wrapper), so the file is for inference and for Keras users' own
recompiling.

``to-onnx`` exports the inference graph with ``torch.onnx.export`` (TorchScript exporter, opset
:data:`ONNX_OPSET`): input ``images``, float32 NCHW RGB pixels in [0, 255] of the run's image size,
any batch size; outputs ``logits`` and ``probabilities`` (two classes: the probability of class 1,
(N,); N classes: softmax, (N, classes)).

Each conversion runs the same images (``--images``, or generated demo images) through the source
and the result and prints and writes a parity summary (``OUT_DIR/conversion.json``,
``OUT.keras.parity.json``, ``OUT.onnx.parity.json``): max |probability difference|, and the band
it is judged against, measured in the same run: the float64 run of the source model is the exact
answer, and the result's float32 error against it must stay within :data:`tl_common.bands.RATIO` times the
source's own float32 error (the port's: the larger of its folded and unfolded runs) plus
:data:`tl_common.bands.FLOOR_ULPS` float32 ulps. Keras models are run in a
separate Python process with Keras imported there (skipped, and said so, where Keras is not
installed); onnxruntime runs the ONNX file where it is installed.

This module is the command line; the work is done by :mod:`tl_common.keras_config` (the Keras
model's structure, as JSON), :mod:`tl_torch.keras_interchange` (weights across the border, and
running Keras models through ``python -m tl_keras.runner``), :mod:`tl_torch.onnx_export` and
:mod:`tl_torch.conversion_parity` (the summary).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tl_common.errors import UserError, run_main
from tl_common.keras_config import (  # noqa: F401  (importable from here, as before)
    KerasClassifier,
    inspect_keras_model,
    read_model_config,
)
from tl_torch.checkpoint import MODEL_FILE, load_run, save_module
from tl_torch.conversion_parity import (  # noqa: F401
    DEFAULT_IMAGES,
    Parity,
    compare,
    comparison_images,
    nhwc,
    port_answers,
    port_probabilities,
    port_variants,
    predicted_classes,
    probabilities,
    unfolded_copy,
    write_summary,
)
from tl_torch.keras_export import keras_model_config, write_keras_model  # noqa: F401
from tl_torch.keras_interchange import (  # noqa: F401
    class_names_for,
    dense_bias,
    dense_kernel_to_torch,
    keras_available,
    module_from_keras,
    run_keras,
    torch_to_dense_kernel,
)
from tl_torch.onnx_export import ONNX_OPSET, check_onnx, onnx_outputs, write_onnx  # noqa: F401

# ---- the three commands ------------------------------------------------------------------------

def from_keras(model_path: str | Path, out_dir: str | Path, *, class_names: list[str] | None = None,
               inputs_scaled: bool = False, images: list[str] | None = None,
               overwrite: bool = False) -> Parity:
    """Keras model -> ``OUT_DIR/model.ckpt`` (+ ``conversion.json``)."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if (out_dir / MODEL_FILE).exists() and not overwrite:
        raise UserError(f"{out_dir / MODEL_FILE} exists; pass --overwrite to replace it")
    module, found = module_from_keras(model_path, class_names=class_names,
                                      inputs_scaled=inputs_scaled)
    save_module(module, out_dir / MODEL_FILE)
    print(f"wrote {out_dir / MODEL_FILE}: {module.hparams.num_classes} classes "
          f"{module.hparams.class_names}, {found.image_size} px, dropout {found.dropout:g}, "
          f"Dense activation {found.activation}")
    ported, _, size = load_run(out_dir)
    x = comparison_images(images, size)
    result32 = port_probabilities(ported, x)
    if not keras_available():
        parity = Parity.not_measured("from-keras", str(model_path), str(out_dir / MODEL_FILE),
                                     len(x), "Keras is not installed here")
    else:
        project = "tl_keras>" in json.dumps(read_model_config(model_path))
        run = {"inputs_scaled": inputs_scaled, "project": project, "base": found.base}
        source32 = probabilities(run_keras(model_path, nhwc(x), **run), found.activation)
        exact = probabilities(run_keras(model_path, nhwc(x), float64=True, **run),
                              found.activation)
        if found.units == 2:  # the port gives the probability of class 1
            source32, exact = source32[:, 1], exact[:, 1]
        parity = compare("from-keras", str(model_path), str(out_dir / MODEL_FILE), source32,
                         result32, exact)
    write_summary(parity, out_dir / "conversion.json", {"keras_model": asdict(found)})
    return parity


def to_keras(run_dir: str | Path, out: str | Path, *, images: list[str] | None = None) -> Parity:
    """Port run -> Keras ``.keras`` (+ ``OUT.keras.parity.json``)."""
    run_dir, out = Path(run_dir), Path(out)
    module, _, size = load_run(run_dir)
    write_keras_model(module, size, out)
    print(f"wrote {out}")
    x = comparison_images(images, size)
    if keras_available():
        source32, exact, variants = port_answers(module, x)
        result32 = probabilities(run_keras(out, nhwc(x)))
        parity = compare("to-keras", str(run_dir / MODEL_FILE), str(out), source32, result32, exact,
                         variants=variants)
    else:
        parity = Parity.not_measured("to-keras", str(run_dir / MODEL_FILE), str(out), len(x),
                                     "Keras is not installed here")
    write_summary(parity, out.with_name(out.name + ".parity.json"), {})
    return parity


def to_onnx(run_dir: str | Path, out: str | Path, *, images: list[str] | None = None) -> Parity:
    """Port run -> ONNX (+ ``OUT.onnx.parity.json``)."""
    run_dir, out = Path(run_dir), Path(out)
    module, _, size = load_run(run_dir)
    write_onnx(module, size, out)
    print(f"wrote {out}: input 'images' float32 (N, 3, {size}, {size}) RGB in [0, 255]; outputs "
          f"'logits', 'probabilities'; opset {ONNX_OPSET}")
    parity = check_onnx(module, out, comparison_images(images, size),
                        source=str(run_dir / MODEL_FILE))
    write_summary(parity, out.with_name(out.name + ".parity.json"),
                  {"opset": ONNX_OPSET, "input": "images NCHW float32 RGB [0, 255]"})
    return parity


def main(argv: list[str] | None = None) -> Parity:
    parser = argparse.ArgumentParser(prog="python -m tl_torch.convert",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    a = commands.add_parser("from-keras", help="a whole Keras model -> a port run folder")
    a.add_argument("model", help="Keras model file (.keras, or .h5 from model.save)")
    a.add_argument("out_dir", help="folder for model.ckpt and conversion.json")
    a.add_argument("--class-names", default=None,
                   help="comma-separated class names in label order (default: the metrics.json "
                        "of a tl_keras run beside the model, else class_0...)")
    a.add_argument("--inputs-scaled", action="store_true",
                   help="the model takes inputs scaled to [-1, 1] already (no scaling layer)")
    a.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/model.ckpt")
    for name, what in (("to-keras", "a Keras 3 .keras model"), ("to-onnx", "an ONNX model")):
        b = commands.add_parser(name, help=f"a port run -> {what}")
        b.add_argument("run_dir", help="folder holding model.ckpt (tl_torch.train or from-keras)")
        b.add_argument("out", help="output file")
    for sub in commands.choices.values():
        sub.add_argument("--images", nargs="+", default=None,
                         help="images or folders to compare on (default: generated demo images)")
    args = parser.parse_args(argv)
    if args.command == "from-keras":
        names = None if args.class_names is None else [n.strip() for n in args.class_names.split(",")]
        parity = from_keras(args.model, args.out_dir, class_names=names,
                            inputs_scaled=args.inputs_scaled, images=args.images,
                            overwrite=args.overwrite)
    elif args.command == "to-keras":
        parity = to_keras(args.run_dir, args.out, images=args.images)
    else:
        parity = to_onnx(args.run_dir, args.out, images=args.images)
    if parity.passed is False:
        raise UserError(f"the converted model does not match its source: {parity.line()}")
    return parity


if __name__ == "__main__":
    run_main(main)
