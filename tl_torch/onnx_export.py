"""A run's classifier as an ONNX file, and a check of that file against the module it came from.

The inference graph: input ``images``, float32 NCHW RGB pixels in [0, 255] of the run's image
size, any batch size; outputs ``logits`` and ``probabilities`` (two classes: the probability of
class 1, (N,); N classes: softmax, (N, classes)). Exported with ``torch.onnx.export``'s
TorchScript exporter at opset :data:`ONNX_OPSET`; onnxruntime, where installed, runs the file for
the check. Every base exports: hard-swish, swish and sigmoid as ONNX ops, the squeeze-and-excite
multiplies, EfficientNet's Normalization (its mean and variance as constants), and the TF-"same"
zero paddings as constant pads (:func:`fixed_padding`).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tl_common.errors import UserError
from tl_common.outputs import replaced_atomically
from tl_torch.conversion_parity import Parity, compare, port_answers, probabilities, unfolded_copy
from tl_torch.module import TransferModule
from tl_torch.padding import Pad2d

#: The ONNX opset of to-onnx (the TorchScript exporter's well-tested range).
ONNX_OPSET = 17


class InferenceGraph(nn.Module):
    """What the file computes: [0, 255] NCHW images -> (logits, probabilities)."""

    def __init__(self, module: TransferModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(images)
        probs = torch.sigmoid(logits) if self.module.binary else torch.softmax(logits, dim=-1)
        return logits, probs


def fixed_padding(module: TransferModule, image_size: int) -> TransferModule:
    """The module's unfolded copy with every TF-"same" padding (:class:`Pad2d`: MobileNetV3's
    and EfficientNet's ``ZeroPadding2D(correct_pad)``) made a constant ``ZeroPad2d`` for the
    size it meets at ``image_size``. The file fixes the image size, so the amounts are constants
    anyway; and Pad2d's fast path (a copy into an uninitialised tensor, then its borders zeroed
    in place) is traced by the TorchScript exporter into a graph that pads one side only
    (measured: a 3x3 input padded by 2 on each side came out 5x5, not 7x7)."""
    plain = unfolded_copy(module)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(
                 lambda m, args, name=name: sizes.__setitem__(name, tuple(args[0].shape[-2:])))
             for name, m in plain.named_modules() if isinstance(m, Pad2d)]
    try:
        with torch.no_grad():
            plain(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, (height, width) in sizes.items():
        parent, _, child = name.rpartition(".")
        pad = plain.get_submodule(name)
        setattr(plain.get_submodule(parent), child, nn.ZeroPad2d(pad.amounts(height, width)))
    return plain


def write_onnx(module: TransferModule, image_size: int, path: Path) -> Path:
    """``torch.onnx.export`` of the inference graph (opset :data:`ONNX_OPSET`, dynamic batch);
    the module's own weights, traced through its unfolded base."""
    if path.suffix != ".onnx":
        raise UserError(f"cannot write {path}: expected a name ending in .onnx")
    if importlib.util.find_spec("onnx") is None:
        raise UserError("torch.onnx.export needs the onnx package: pip install onnx")
    example = torch.zeros(1, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, f".{path.name}.tmp") as tmp, warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (see ONNX_OPSET): its deprecation notice
        # says nothing about this file.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX",
                                DeprecationWarning)
        # ... nor does the exporter's use of its own deprecated helpers (torch.onnx's code).
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        # TF-"same" padding is computed from the image size, which the file fixes (only the
        # batch is dynamic): the tracer is right to keep it as a constant.
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean",
                                torch.jit.TracerWarning)
        # The constant pads (fixed_padding) reach ONNX as a Pad whose amounts the exporter reorders
        # with a step -1 Slice of a constant, which it does not fold: a few bytes computed at
        # load time, the same numbers.
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1 can be constant folded",
                                UserWarning)
        torch.onnx.export(InferenceGraph(fixed_padding(module, image_size)), (example,), str(tmp),
                          dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["images"],
                          output_names=["logits", "probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"},
                                        "probabilities": {0: "batch"}})
    return path


def onnx_outputs(path: Path, images: np.ndarray) -> np.ndarray | None:
    """The ONNX file's logits on NCHW images (onnxruntime, CPU), or None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.astype(np.float32)})[0]


def check_onnx(module: TransferModule, path: Path, images: torch.Tensor, *,
               source: str = "port") -> Parity:
    """The exported file's probabilities on ``images`` against the module's, both judged
    against the module in float64 (:func:`tl_torch.conversion_parity.compare`)."""
    logits = onnx_outputs(path, images.numpy())
    if logits is None:
        return Parity.not_measured("to-onnx", source, str(path), len(images),
                                   "onnxruntime is not installed here")
    source32, exact, variants = port_answers(module, images)
    return compare("to-onnx", source, str(path), source32, probabilities(logits), exact,
                   variants=variants)
