"""Check 9: training, step by step from a shared state with augmentation and dropout on (the
reference's random draws replayed in the port), then free-running.

Step by step: before each of 12 feature-extraction and 12 fine-tuning steps, the port and a
float64 copy of the Keras model are set to the Keras model's current weights and optimizer state
(nothing accumulates); all three take one step on the same batch with the same flips, angles and
dropout mask (drawn by the Keras model's own layers). The float64 step is the exact answer: the
port's update of every trainable weight is held to a multiple of Keras' own float32 error against
it (:mod:`tl_common.bands`), and so is the loss. Each step is reported; the judged row is the
median step, because a ReLU6 input within rounding of 0 or 6 turns its gradient on or off, and a
step where that happens to one framework only moves its update far beyond rounding.

Free-running: the port trains 10 + 10 steps on its own from the same start and dropout masks (no
augmentation: see :func:`run`), and is compared with the Keras trajectory. Rounding differences
grow along a trajectory (in RMSprop's first steps a weight whose tiny gradient's sign is decided
by rounding moves by a whole step, lr / sqrt(1 - rho)), so no fixed tolerance fits every machine:
the band is the reference's own spread, the same Keras trajectory computed in a second process on
TensorFlow's other CPU kernels (``TF_ENABLE_ONEDNN_OPTS`` flipped: oneDNN's or Eigen's), as
another machine would. These rows are reported, not judged: one second trajectory is not a steady
measure of a chaotic spread. Measured: the port's fine-tuning losses within 1.0x of that spread
by default, and 23x with oneDNN limited to SSE4.1, where Keras' second trajectory happened to stay
close to its first while every step-by-step row still passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import torch
from torch import nn

from parity_tests import exact, pairs
from parity_tests.checks_training import PHASES, demo_batches, torch_phase
from parity_tests.rows import Row, measured, verdict
from tl_common import bands, recipe
from tl_common.bases import DEFAULT_BASE, base_facts
from tl_common.demo import demo_weights_path
from tl_keras import model as kmodel
from tl_torch.keras_weights import KERAS_VARIABLES, keras_to_torch, torch_to_keras
from tl_torch.module import TransferModule

GROUP = "9 training steps"
#: The free-running comparison runs when this environment variable is "1": ``python -m
#: parity_tests`` (the report) sets it. Its rows are reported, not judged, and its spread takes a
#: second Keras process, so the test command leaves it out.
FREE_RUNNING_ENV = "TL_PARITY_FREE_RUNNING"


@dataclass(frozen=True)
class Setup:
    """What is trained: the recipe's model by default (two classes, augmentation, Dropout(0.2)).
    Image size and batch: BatchNorm runs in inference mode, so neither changes what is compared;
    small ones keep the float64 steps cheap."""

    size: int = 64
    batch: int = 8
    steps: int = 12             # of each phase, step by step
    free_steps: int = 10        # of each phase, free-running
    num_classes: int = 2
    augment: bool = True
    dropout: float = recipe.DROPOUT
    group: str = GROUP
    # Also the free-running comparison (and the variant process); None: as FREE_RUNNING_ENV says.
    free_running: bool | None = None
    # Another base (tl_common.bases) and a Keras weights file of it; None: the demo's MobileNetV2.
    base: str = DEFAULT_BASE
    weights: Path | None = None

    @property
    def fine_tune_at(self) -> int:
        """The base's default fine-tune point (the recipe's 100 for MobileNetV2)."""
        return base_facts(self.base).fine_tune_at

    @property
    def features(self) -> int:
        """The width of the base's pooled features: what the head and its Dropout see."""
        return base_facts(self.base).features

    def weights_file(self) -> Path:
        return self.weights if self.weights is not None else demo_weights_path()


RECIPE = Setup()


@dataclass(frozen=True)
class Draws:
    """One step's randomness, drawn by the Keras model's layers."""

    flip: dict          # RandomFlip's transformation
    rotation: dict      # RandomRotation's transformation
    keep: np.ndarray    # (BATCH, 1280) bool: Dropout's kept features

    @property
    def flips(self) -> np.ndarray:  # (N,) bool
        return keras.ops.convert_to_numpy(self.flip["flips"]).reshape(-1).astype(bool)

    @property
    def angles(self) -> np.ndarray:
        return keras.ops.convert_to_numpy(self.rotation["angle"]).astype(np.float32)

    def save(self, arrays: dict[str, np.ndarray], i: int) -> None:
        """Into ``arrays`` (an .npz's contents), as step ``i``."""
        arrays[f"keep{i}"] = self.keep
        if self.flip:
            arrays[f"flips{i}"] = keras.ops.convert_to_numpy(self.flip["flips"])
            arrays[f"angle{i}"] = keras.ops.convert_to_numpy(self.rotation["angle"])
            arrays[f"matrix{i}"] = keras.ops.convert_to_numpy(self.rotation["rotation_matrix"])

    @classmethod
    def load(cls, arrays, i: int, image_shape: tuple[int, ...]) -> Draws:
        if f"flips{i}" not in arrays:
            return cls({}, {}, arrays[f"keep{i}"])
        n, h, w, _ = image_shape
        return cls({"flips": tf.constant(arrays[f"flips{i}"]), "input_shape": image_shape},
                   {"angle": tf.constant(arrays[f"angle{i}"]),
                    "rotation_matrix": tf.constant(arrays[f"matrix{i}"]),
                    "image_height": h, "image_width": w, "batch_size": n},
                   arrays[f"keep{i}"])


# ---- Keras: the model's own layers, one step with given draws ----------------------------------

class KerasTrainer:
    """The Keras reference model (``tl_keras.build_model``), stepped with explicit draws, in
    float32 or float64."""

    def __init__(self, setup: Setup, float64: bool = False) -> None:
        self.setup, self.float64 = setup, float64
        self.dtype = "float64" if float64 else "float32"
        self.base = pairs.keras_base(setup.weights_file(), setup.size, float64=float64,
                                     base=setup.base)
        with pairs.float64_policy() if float64 else contextlib.nullcontext():
            self.model = kmodel.build_model(self.base, dropout=setup.dropout, seed=0,
                                            augment=setup.augment, num_classes=setup.num_classes)
        self.binary = setup.num_classes == 2
        # A Keras loss computes in its own dtype (floatx when made), not its inputs'.
        loss = (keras.losses.BinaryCrossentropy if self.binary
                else keras.losses.SparseCategoricalCrossentropy)
        self.loss_fn = loss(from_logits=True, dtype=self.dtype)
        self.optimizer = None

    def set_phase(self, phase: str, lr: float) -> None:
        kmodel.set_phase(self.base, phase, self.setup.fine_tune_at)
        kmodel.compile_for(self.model, phase, lr)
        self.optimizer = self.model.optimizer
        self.optimizer.build(self.variables())

    def variables(self) -> list:
        """The trainable variables, in the order of :func:`trainable_pairs`."""
        return [v for v, _ in self.named_variables()]

    def named_variables(self) -> list[tuple[keras.Variable, str]]:
        found = [(v, type(layer).__name__) for layer in self.base.layers
                 for v in layer.trainable_weights]
        dense = self.model.get_layer("dense")
        return found + [(dense.kernel, "Dense"), (dense.bias, "bias")]

    def draw(self, images: np.ndarray) -> Draws:
        t_flip = t_rotation = {}
        if self.setup.augment:
            flip, rotation = self.model.get_layer("data_augmentation").layers
            t_flip = flip.get_random_transformation(images, training=True)
            t_rotation = rotation.get_random_transformation(images, training=True)
        ones = keras.ops.ones((len(images), self.setup.features))
        keep = keras.ops.convert_to_numpy(self.model.get_layer("dropout")(ones, training=True)) != 0
        return Draws(t_flip, t_rotation, keep)

    def augment(self, images: np.ndarray, draws: Draws):
        if not self.setup.augment:
            return images
        if self.float64:  # TensorFlow's transform is float32 inside: the exact one instead
            return exact.rotate(images, draws.flips, draws.angles)
        flip, rotation = self.model.get_layer("data_augmentation").layers
        x = flip.transform_images(images, draws.flip, training=True)
        return rotation.transform_images(x, draws.rotation, training=True)

    def step(self, images: np.ndarray, labels: np.ndarray, draws: Draws) -> float:
        """One training step of the recipe's model with these draws; returns the loss."""
        x = keras.ops.cast(self.augment(images, draws), self.dtype)
        preprocess = getattr(keras.applications, base_facts(self.setup.base).keras_module)
        keep = keras.ops.cast(draws.keep, self.dtype)
        variables = self.variables()
        with tf.GradientTape() as tape:
            features = self.model.get_layer("global_average_pooling2d")(
                self.model.get_layer("base_inference_mode")(
                    preprocess.preprocess_input(x)))       # (N, features): 1280 for MobileNetV2
            # Keras' Dropout (tf.nn.experimental.stateless_dropout): x * 1/(1-rate) * keep.
            features = features * keras.ops.cast(1.0 / (1.0 - self.setup.dropout), self.dtype) * keep
            logits = self.model.get_layer("dense")(features)                 # (N, 1) or (N, classes)
            target = (keras.ops.cast(labels.reshape(-1, 1), self.dtype) if self.binary
                      else labels.astype(np.int32))
            loss = self.loss_fn(target, logits)
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return float(loss)

    # state: trainable weights and the optimizer's variables, as numpy (Keras layout)
    def state(self) -> dict[str, list[np.ndarray]]:
        opt = self.optimizer
        variables = self.variables()
        slots = {"velocity": [opt._velocities[opt._get_variable_index(v)].numpy() for v in variables]}
        if getattr(opt, "_momentums", None):  # Adam's; RMSprop has them only with momentum
            slots["momentum"] = [opt._momentums[opt._get_variable_index(v)].numpy() for v in variables]
        return {"weights": [v.numpy() for v in variables], "iterations": int(opt.iterations.numpy()),
                **slots}

    def load_state(self, state: dict) -> None:
        opt = self.optimizer
        variables = self.variables()
        for i, v in enumerate(variables):
            v.assign(state["weights"][i].astype(self.dtype))
            index = opt._get_variable_index(v)
            opt._velocities[index].assign(state["velocity"][i].astype(self.dtype))
            if "momentum" in state:
                opt._momentums[index].assign(state["momentum"][i].astype(self.dtype))
        opt.iterations.assign(state["iterations"])

    def all_weights(self) -> np.ndarray:
        return flat_weights([w for layer in self.base.layers for w in layer.get_weights()]
                     + self.model.get_layer("dense").get_weights())


# ---- the port: its module's training step, with the draws replayed --------------------------

class ReplayedDropout(nn.Module):
    """Dropout with a given mask: ``x * keep / (1 - p)``, as ``nn.Dropout`` with that draw."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.keep = p, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.keep.to(x.dtype) / (1 - self.p))


class TorchTrainer:
    """``TransferModule`` as the trainer builds it, trained through its own ``shared_step`` with the
    reference's flips, angles and dropout masks."""

    def __init__(self, setup: Setup, keras_model) -> None:
        self.module = TransferModule(pairs.torch_base(setup.weights_file(), setup.size,
                                                      base=setup.base),
                                     fine_tune_at=setup.fine_tune_at, learning_rate=PHASES[0][1],
                                     fine_tune_learning_rate=PHASES[1][1], dropout=setup.dropout,
                                     augment=setup.augment, num_classes=setup.num_classes).train()
        kernel, bias = keras_model.get_layer("dense").get_weights()
        with torch.no_grad():  # the same head init in both: Keras'
            self.module.classifier.weight.copy_(torch.from_numpy(kernel.T))
            self.module.classifier.bias.copy_(torch.from_numpy(bias))
        self.module.dropout = ReplayedDropout(setup.dropout)
        self.draws: Draws | None = None
        if self.module.augment is not None:
            self.module.augment.draw = lambda n, generator=None: (
                torch.from_numpy(self.draws.flips), torch.from_numpy(self.draws.angles))
        self.optimizer = None

    def set_phase(self, phase: str) -> None:
        self.optimizer = torch_phase(self.module, phase)

    def named_parameters(self) -> list[tuple[torch.nn.Parameter, str]]:
        """The trainable parameters, in Keras' order (see KerasTrainer.named_variables)."""
        found = []
        for layer in self.module.base.keras_layers:
            params = [p for p in layer.parameters() if p.requires_grad]
            found += [(p, layer.type) for p in params]
        return found + [(self.module.classifier.weight, "Dense"),
                        (self.module.classifier.bias, "bias")]

    def step(self, images: np.ndarray, labels: np.ndarray, draws: Draws) -> float:
        self.draws = draws
        self.module.dropout.keep = torch.from_numpy(draws.keep)
        loss = self.module.shared_step((pairs.nchw(images), torch.from_numpy(labels)),
                                 self.module.train_loss, self.module.train_acc, augment=True)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def weights(self) -> list[np.ndarray]:
        return [_to_keras(kind, p.detach().numpy()) for p, kind in self.named_parameters()]

    def load_state(self, state: dict) -> None:
        named = self.named_parameters()
        with torch.no_grad():
            for (p, kind), w in zip(named, state["weights"], strict=True):
                p.copy_(torch.from_numpy(_to_torch(kind, w)))
        for i, (p, kind) in enumerate(named):
            slot = self.optimizer.state[p]
            slot.clear()
            for name in ("momentum", "velocity"):
                if name in state:
                    slot[name] = torch.from_numpy(_to_torch(kind, state[name][i]).copy())
            if "momentum" in state:  # KerasAdam counts steps per parameter
                slot["step"] = torch.tensor(float(state["iterations"]), dtype=torch.float32)

    def all_weights(self) -> np.ndarray:
        """Every base variable (BatchNorm statistics included) and the head, in Keras' layout and
        order (as KerasTrainer.all_weights)."""
        parts = []
        for layer in self.module.base.keras_layers:
            if layer.module is None:
                continue
            state = dict(layer.module.named_parameters()) | dict(layer.module.named_buffers())
            parts += [torch_to_keras(layer.type, state[name].detach().numpy())
                      for _, name in KERAS_VARIABLES.get(layer.type, ())]
        classifier = self.module.classifier
        return flat_weights(parts + [classifier.weight.detach().numpy().T, classifier.bias.detach().numpy()])


def _to_torch(kind: str, array: np.ndarray) -> np.ndarray:
    if kind in ("Conv2D", "DepthwiseConv2D"):
        return np.ascontiguousarray(keras_to_torch(kind, array))
    return np.ascontiguousarray(array.T if kind == "Dense" else array)


def _to_keras(kind: str, array: np.ndarray) -> np.ndarray:
    if kind in ("Conv2D", "DepthwiseConv2D"):
        return torch_to_keras(kind, array)
    return array.T if kind == "Dense" else array


def flat_weights(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


# ---- the reference's own spread: Keras on TensorFlow's other CPU kernels ------------------------

ONEDNN = "TF_ENABLE_ONEDNN_OPTS"


def other_kernels() -> str:
    """The TF_ENABLE_ONEDNN_OPTS value that gives TensorFlow's other CPU kernels than this
    process's (oneDNN's or Eigen's; TensorFlow's default depends on the CPU)."""
    from parity_tests.environment import tensorflow_onednn

    return "0" if tensorflow_onednn() else "1"


class Variant:
    """The reference trajectory again, in a process of its own on TensorFlow's other CPU kernels:
    the same batches, draws and start; how much Keras differs from itself on another machine."""

    def __init__(self, setup: Setup, start: KerasTrainer, batches: list, draws: list[Draws],
                 directory: Path) -> None:
        kernel, bias = start.model.get_layer("dense").get_weights()
        arrays: dict[str, np.ndarray] = {"setup": np.array(json.dumps(asdict(setup))),
                                         "kernel": kernel, "bias": bias}
        for i, ((images, labels), d) in enumerate(zip(batches, draws, strict=True)):
            arrays[f"images{i}"], arrays[f"labels{i}"] = images, labels
            d.save(arrays, i)
        self.inputs, self.outputs = directory / "variant_in.npz", directory / "variant_out.npz"
        self.log = directory / "variant.log"
        np.savez(self.inputs, **arrays)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, ONEDNN: other_kernels(),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "parity_tests.checks_steps", "variant", str(self.inputs),
                 str(self.outputs)], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.how = f"spread: Keras with {ONEDNN}={env[ONEDNN]}"

    def result(self, timeout_s: float = 900) -> dict[str, np.ndarray]:
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = "timeout"
        if code != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"the Keras variant run failed ({code}): " + " | ".join(tail))
        with np.load(self.outputs) as found:
            return {k: found[k] for k in found.files}


def _variant_main(inputs: str, outputs: str) -> None:
    with np.load(inputs) as arrays:
        setup = Setup(**json.loads(str(arrays["setup"])))
        n = 2 * setup.steps
        batches = [(arrays[f"images{i}"], arrays[f"labels{i}"]) for i in range(n)]
        draws = [Draws.load(arrays, i, batches[i][0].shape) for i in range(n)]
        head = [arrays["kernel"], arrays["bias"]]
    trainer = KerasTrainer(setup)
    trainer.model.get_layer("dense").set_weights(head)
    losses = []
    for p, (phase, lr) in enumerate(PHASES):
        trainer.set_phase(phase, lr)
        for i in range(p * setup.steps, (p + 1) * setup.steps):
            losses.append(trainer.step(*batches[i], draws[i]))
    np.savez(outputs, losses=np.array(losses), weights=trainer.all_weights())


# ---- the check -------------------------------------------------------------------------------

@dataclass
class Trajectories:
    rows: list[Row]
    losses: dict[str, np.ndarray]          # "keras"/"variant"/"torch" -> (2 * steps,)
    weights: dict[str, np.ndarray]


def run(setup: Setup = RECIPE, batches: list[tuple[np.ndarray, np.ndarray]] | None = None,
        make_torch: Callable[..., TorchTrainer] = TorchTrainer) -> Trajectories:
    """Both comparisons on ``batches`` (default: demo training images), ``setup.steps`` of each
    phase; ``make_torch`` lets the planted-mistake tests break the port."""
    batches = batches or demo_batches(setup.size, 2 * setup.steps, setup.batch)
    reference, truth = KerasTrainer(setup), KerasTrainer(setup, float64=True)
    same_head(reference, truth)
    # Every step's draws first: drawing consumes nothing the steps use.
    draws = [reference.draw(images) for images, _ in batches]
    if not (setup.free_running if setup.free_running is not None
            else os.environ.get(FREE_RUNNING_ENV) == "1"):
        rows = _step_by_step(setup, batches, draws, reference, truth, make_torch(setup, reference.model))
        return Trajectories(rows, {}, {})
    # Free-running without augmentation: TensorFlow's other kernels share Keras' augmentation
    # code, so the spread they measure holds no augmentation difference, while the port's
    # trajectory would (the augmentation itself is compared step by step, and in check 7).
    free = replace(setup, augment=False, steps=setup.free_steps, free_running=True)
    free_batches = batches[:free.steps] + batches[setup.steps:setup.steps + free.steps]
    free_draws = [Draws({}, {}, d.keep)
                  for d in draws[:free.steps] + draws[setup.steps:setup.steps + free.steps]]
    free_reference = KerasTrainer(free)
    same_head(reference, free_reference)
    with tempfile.TemporaryDirectory(prefix="parity-variant-") as directory:
        variant = Variant(free, free_reference, free_batches, free_draws, Path(directory))
        rows = _step_by_step(setup, batches, draws, reference, truth, make_torch(setup, reference.model))
        port = make_torch(free, free_reference.model)
        losses = {"keras": [], "torch": []}
        for p, (phase, lr) in enumerate(PHASES):
            free_reference.set_phase(phase, lr)
            port.set_phase(phase)
            for i in range(p * free.steps, (p + 1) * free.steps):
                losses["keras"].append(free_reference.step(*free_batches[i], free_draws[i]))
                losses["torch"].append(port.step(*free_batches[i], free_draws[i]))
        found = variant.result()
    losses = {"keras": np.array(losses["keras"]), "torch": np.array(losses["torch"]),
              "variant": found["losses"]}
    weights = {"keras": free_reference.all_weights(), "variant": found["weights"],
               "torch": port.all_weights()}
    return Trajectories(rows + _free_running_rows(free, losses, weights, variant.how),
                        losses, weights)


def same_head(source: KerasTrainer, target: KerasTrainer) -> None:
    """The head init of ``source`` in ``target`` (in its dtype)."""
    for t, s in zip(target.model.get_layer("dense").weights, source.model.get_layer("dense").weights,
                    strict=True):
        t.assign(keras.ops.cast(s, target.dtype))


def _free_running_rows(setup: Setup, losses: dict, weights: dict, how: str) -> list[Row]:
    rows, steps = [], setup.steps
    for p, (phase, _) in enumerate(PHASES):
        part = slice(p * steps, (p + 1) * steps)
        k, t = losses["keras"][part], losses["torch"][part]
        rows.append(measured(setup.group, f"free-running (no augmentation), {phase}: loss at each "
                                          f"of {steps} steps",
                             bands.against_spread(k, losses["variant"][part], t, how=how),
                             keras=f"{k[0]:.4f} -> {k[-1]:.4f}", torch=f"{t[0]:.4f} -> {t[-1]:.4f}",
                             judged=False))
    rows.append(measured(setup.group, f"free-running: all {weights['keras'].size:,} weights after "
                                      f"{2 * steps} steps (rms)",
                         bands.against_spread(weights["keras"], weights["variant"], weights["torch"],
                                              norm="rms", how=how), judged=False))
    return rows


def _step_by_step(setup: Setup, batches, draws, reference: KerasTrainer, truth: KerasTrainer,
                  step_port: TorchTrainer) -> list[Row]:
    """Each step from the reference's state: rows per step (reported) and per phase (judged)."""
    steps, group = setup.steps, setup.group
    rows: list[Row] = []
    for p, (phase, lr) in enumerate(PHASES):
        for trainer in (reference, truth):
            trainer.set_phase(phase, lr)
        step_port.set_phase(phase)
        kinds = [k for _, k in reference.named_variables()]
        tkinds = [k for _, k in step_port.named_parameters()]
        shapes = [tuple(v.shape) for v in reference.variables()]
        tshapes = [tuple(_to_keras(k, p_.detach().numpy()).shape)
                   for p_, k in step_port.named_parameters()]
        rows.append(verdict(group, f"{phase}: trainable tensors (types and Keras shapes, in order)",
                            f"{len(kinds)} tensors, {int(sum(map(np.prod, shapes))):,} numbers",
                            f"{len(tkinds)} tensors, {int(sum(map(np.prod, tshapes))):,} numbers",
                            (kinds, shapes) == (tkinds, tshapes), tolerance="exact"))
        step_bands, step_losses = [], []
        for i in range(p * steps, (p + 1) * steps):
            (images, labels), d = batches[i], draws[i]
            shared = reference.state()
            truth.load_state(shared)
            step_port.load_state(shared)
            before = flat_weights(shared["weights"])
            k_loss = reference.step(images, labels, d)
            e_loss = truth.step(images, labels, d)
            t_loss = step_port.step(images, labels, d)
            # The exact step, stored as float32 weights store it: the best a float32 step can do.
            e_after = flat_weights(truth.state()["weights"]).astype(np.float32)
            e_update = e_after.astype(np.float64) - before
            k_update = flat_weights(reference.state()["weights"]) - before
            t_update = flat_weights(step_port.weights()) - before
            band = bands.against_exact(e_update, k_update, t_update, norm="rms",
                                       how="vs the float64 step, stored in float32")
            step_bands.append(band)
            rows.append(measured(group, f"{phase} step {i - p * steps + 1:2d}: update of every "
                                        "trainable weight (rms error)", band,
                                 keras=f"rms update {bands.magnitude(k_update, 'rms'):.3g}",
                                 torch=f"rms update {bands.magnitude(t_update, 'rms'):.3g}",
                                 judged=False))
            step_losses.append((e_loss, k_loss, t_loss))
        rows.append(measured(group, f"{phase}: update of every trainable weight, median step of "
                                    f"{steps}", bands.median(step_bands),
                             note="a ReLU6 input within rounding of 0 or 6 switches its gradient "
                                  "on or off: a step where that happens to one framework only "
                                  "moves the update by far more than rounding, in either"))
        e, k, t = (np.array(v) for v in zip(*step_losses, strict=True))
        rows.append(measured(group, f"{phase}: loss of each of {steps} steps from the shared state",
                             bands.against_exact(e, k, t),
                             keras=f"{k[0]:.4f} -> {k[-1]:.4f}", torch=f"{t[0]:.4f} -> {t[-1]:.4f}"))
    return rows


def check_steps(setup: Setup = RECIPE) -> list[Row]:
    return run(setup).rows


if __name__ == "__main__":  # the variant run: python -m parity_tests.checks_steps variant IN OUT
    if len(sys.argv) != 4 or sys.argv[1] != "variant":
        raise SystemExit("usage: python -m parity_tests.checks_steps variant IN.npz OUT.npz")
    _variant_main(sys.argv[2], sys.argv[3])
