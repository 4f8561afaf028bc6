"""Check 14: the trainers themselves, recorded; check 15: ``tl_torch.predict`` against the saved
Keras model.

14. ``python -m tl_keras.train`` and ``python -m tl_torch.train`` run in this process (their own
``main``, with their flags) on a small demo configuration, each with a recorder that adds nothing
to what they compute: :class:`KerasRecorder`, a Keras callback plus a wrapper of the model's
``train_step`` that sees each batch as ``fit`` hands it to the model, and :class:`TorchRecorder`,
a Lightning callback that sees each batch as it reaches ``training_step``. They are put in by
wrapping the trainers' own constructors (``tl_keras.train.build_model``,
``tl_torch.train.build_trainer``); the Keras model also runs eagerly (the same kernels, without a
traced graph per phase). Per step they record the optimizer in effect (its Keras class and every
hyperparameter, the learning rate included), the trainable tensors (by Keras layer), whether the
optimizer holds exactly those tensors, the images and labels that reach the model, the loss, the
augmentation's draws and each pass through the head's Dropout (in which mode, how much zeroed);
per epoch the phase and epoch number the run's history writes. Compared row by row: the wiring
facts exactly, the images against the exact resize of the files they come from
(:mod:`parity_tests.exact`) with a band measured on Keras' own images (:mod:`tl_common.bands`),
the draws and dropout by where they happen and their distribution.

The two runs draw different random numbers (the head's init, the file order, augmentation and
dropout come from each framework's generators), so their losses are two samples of one training
outcome: shown in a note, not compared; the step-by-step comparison of the same step is check 9.

15. The Keras run's saved ``model.keras`` is converted for the port (``module_from_keras`` of
``tl_torch.keras_interchange`` and ``save_module`` of ``tl_torch.checkpoint``, as ``from-keras``
does), and the same image files go through ``tl_torch.predict`` (its ``main``, in this process)
and through the saved Keras model (``model.predict`` on the reference's own decoding); the exact
answer is the Keras model in float64 on the exact resize. Class names and their order are exact;
probabilities are held to a band.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from parity_tests import exact, pairs
from parity_tests.records import (
    TRAINERS_GROUP,
    TRAINERS_IMAGE_SIZE,
    Record,
    Step,
    data_rows,
    decoded,
)
from parity_tests.rows import Row, equal, measured, summary, verdict
from tl_common import bands
from tl_common.files import load_splits
from tl_common.outputs import read_metrics

GROUP = TRAINERS_GROUP
#: Checks 14 and 15 run both trainers (about a minute on two cores, more with the planted
#: mistakes): with this variable set to 1 (``python -m parity_tests`` sets it).
ENV = "TL_PARITY_TRAINERS"
PREDICT_GROUP = "15 prediction"

#: The recorded runs: both phases, whole epochs (every training file once per epoch), small
#: images; 320 training files in batches of 48 make a last batch of 32 in every epoch.
IMAGE_SIZE = TRAINERS_IMAGE_SIZE
FLAGS = ("--demo", "--image-size", str(IMAGE_SIZE), "--batch-size", "48",
         "--initial-epochs", "1", "--fine-tune-epochs", "1", "--overwrite")

#: The port's optimizers by the Keras class whose update they implement, with the Keras
#: hyperparameters their update fixes (tl_torch/optim.py); any other class is reported by its
#: own name and fails.
TORCH_OPTIMIZERS = {"KerasAdam": ("Adam", {"amsgrad": False}),
                    "KerasRMSprop": ("RMSprop", {"momentum": 0.0, "centered": False})}
KERAS_HYPERPARAMETERS = {"Adam": ("learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad"),
                         "RMSprop": ("learning_rate", "rho", "momentum", "epsilon", "centered")}
TORCH_NAMES = {"lr": "learning_rate"}


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def _value(v: Any) -> Any:
    """A hyperparameter as both frameworks store it: numbers in float32 (Keras' variables)."""
    if isinstance(v, bool) or v is None:
        return v
    return float(np.float32(v))


# ---- the Keras recorder ----------------------------------------------------------------------

def _keras_layer_names(model: keras.Model) -> dict[int, str]:
    """id(variable) -> the Keras layer it belongs to (the base's layers, then the head)."""
    names = {}
    for layer in model.layers:
        inner = getattr(layer, "model", None)
        for sub in (inner.layers if isinstance(inner, keras.Model) else [layer]):
            for v in sub.weights:
                names[id(v)] = sub.name
    return names


class KerasRecorder(keras.callbacks.Callback):
    """Records what ``fit`` runs: attached to the model by :meth:`attach`."""

    def __init__(self) -> None:
        super().__init__()
        self.record = Record()
        self._epoch = 0
        self._stage = "evaluate"   # "train" inside a training step
        self._history: list | None = None
        self._seen = 0
        self._mean = 0.0

    def attach(self, model: keras.Model) -> keras.Model:
        names = _keras_layer_names(model)
        train_step, fit = model.train_step, model.fit

        def recording_train_step(data):
            self._stage = "train"
            try:
                return record_step(data)
            finally:
                self._stage = "evaluate"

        rotation = model.get_layer("data_augmentation").layers[1]  # RandomFlip, RandomRotation
        draw = rotation.get_random_transformation

        def recording_draw(data, training=True, seed=None):
            found = draw(data, training=training, seed=seed)
            if found is not None:  # Keras draws nothing outside training
                self.record.draws.append((self._stage, int(data.shape[0]), keras.ops.convert_to_numpy(
                    found["angle"]).reshape(-1)))
            return found

        rotation.get_random_transformation = recording_draw
        dropout = model.get_layer("dropout")
        dropout_call = dropout.call

        def recording_dropout(inputs, training=False):
            out = dropout_call(inputs, training=training)
            x, y = keras.ops.convert_to_numpy(inputs), keras.ops.convert_to_numpy(out)
            self.record.dropout.append((self._stage, bool(training),
                                        int(((y == 0) & (x != 0)).sum()), int((x != 0).sum())))
            return out

        dropout.call = recording_dropout

        def record_step(data):
            x, y = data[0], data[1]
            opt = model.optimizer
            kind = type(opt).__name__
            config = opt.get_config()
            hyper = tuple((k, _value(config.get(k))) for k in KERAS_HYPERPARAMETERS.get(kind, ()))
            counts: dict[str, int] = {}
            for v in model.trainable_variables:
                counts[names.get(id(v), "?")] = counts.get(names.get(id(v), "?"), 0) + 1
            if not hasattr(opt, "_trainable_variables"):  # Keras 3's, read here only
                raise RuntimeError(f"{kind} has no _trainable_variables: the Keras recorder "
                                   "must learn where this Keras keeps the optimizer's variables")
            # Empty until the optimizer is built by its first update (the phase's first step).
            held = {id(v) for v in opt._trainable_variables}
            self.record.steps.append(Step(
                self._epoch, (kind, hyper), tuple(counts.items()),
                sum(int(np.prod(v.shape)) for v in model.trainable_variables),
                held == {id(v) for v in model.trainable_variables} if held else True,
                keras.ops.convert_to_numpy(x).astype(np.float32),
                keras.ops.convert_to_numpy(y).reshape(-1)))
            return train_step(data)

        def recording_fit(*args, callbacks=(), **kwargs):
            # The run's own history list (tl_keras.train.EpochLog's), read at each epoch's end.
            self._history = next((c.history for c in callbacks if hasattr(c, "history")
                                  and isinstance(c.history, list)), None)
            return fit(*args, callbacks=[*callbacks, self], **kwargs)

        model.train_step = recording_train_step
        model.fit = recording_fit
        return model

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch, self._seen, self._mean = epoch, 0, 0.0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # fit's logs hold the epoch's running mean, weighted by batch size: this step's loss
        # is what moved it.
        step = self.record.steps[-1]
        n = len(step.labels)
        mean = float((logs or {})["loss"])
        step.loss = (mean * (self._seen + n) - self._mean * self._seen) / n
        self._seen, self._mean = self._seen + n, mean

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._history:  # the run's own history (tl_keras.train.EpochLog), as it wrote it
            last = self._history[-1]
            self.record.epochs.append((int(last["epoch"]), str(last["phase"])))


# ---- the Lightning recorder ------------------------------------------------------------------

def _torch_layer_names(module) -> dict[int, str]:
    names = {}
    for layer in module.base.keras_layers:
        if layer.module is not None:
            for p in layer.module.parameters():
                names[id(p)] = layer.name
    for p in module.classifier.parameters():
        names[id(p)] = "dense"
    return names


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> tuple:
    kind = type(optimizer).__name__
    name, fixed = TORCH_OPTIMIZERS.get(kind, (f"torch {type(optimizer).__module__}.{kind}", {}))
    group = {TORCH_NAMES.get(k, k): v for k, v in optimizer.param_groups[0].items()
             if k != "params"}
    group.update(fixed)
    keys = KERAS_HYPERPARAMETERS.get(name, tuple(sorted(group)))
    extra = tuple(sorted(set(group) - set(keys)))  # what Keras' class does not have
    return name, tuple((k, _value(group.get(k))) for k in (*keys, *extra))


class TorchRecorder(Callback):
    """Records what ``trainer.fit`` runs, as each batch reaches ``training_step``."""

    def __init__(self) -> None:
        self.record = Record()

    def on_fit_start(self, trainer, pl_module) -> None:
        def stage() -> str:
            return "train" if trainer.training else "evaluate"

        if pl_module.augment is not None:
            draw = pl_module.augment.draw

            def recording_draw(n, generator=None):
                flips, angles = draw(n, generator)
                self.record.draws.append((stage(), int(n), angles.detach().cpu().numpy()))
                return flips, angles

            pl_module.augment.draw = recording_draw

        def dropout_hook(module, inputs, output) -> None:
            x, y = inputs[0].detach(), output.detach()
            self.record.dropout.append((stage(), bool(module.training),
                                        int(((y == 0) & (x != 0)).sum()), int((x != 0).sum())))

        pl_module.dropout.register_forward_hook(dropout_hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        images, labels = batch
        names = _torch_layer_names(pl_module)
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        counts: dict[str, int] = {}
        for p in trainable:
            counts[names.get(id(p), "?")] = counts.get(names.get(id(p), "?"), 0) + 1
        optimizer = trainer.optimizers[0]
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.record.steps.append(Step(
            trainer.current_epoch, _torch_optimizer(optimizer), tuple(counts.items()),
            sum(p.numel() for p in trainable), held == {id(p) for p in trainable},
            pairs.nhwc(images.float()), labels.detach().cpu().numpy().reshape(-1)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record.steps[-1].loss = float(loss.detach())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        history = next((c.history for c in trainer.callbacks
                        if type(c).__name__ == "KerasHistory"), [])
        if history:  # the run's own history (tl_torch.train.KerasHistory), as it wrote it
            self.record.epochs.append((int(history[-1]["epoch"]), str(history[-1]["phase"])))


# ---- running the trainers --------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def run_keras(directory: Path) -> Record:
    """``tl_keras.train.main`` with :data:`FLAGS`, recorded."""
    import tl_keras.train as ktrain

    recorder = KerasRecorder()
    build_model, compile_for = ktrain.build_model, ktrain.compile_for

    def recorded_model(*args, **kwargs):
        return recorder.attach(build_model(*args, **kwargs))

    def eager_compile(model, phase, learning_rate):
        compile_for(model, phase, learning_rate)
        model.run_eagerly = True

    ktrain.build_model, ktrain.compile_for = recorded_model, eager_compile
    try:
        with _quiet():
            ktrain.main([*FLAGS, "--output-dir", str(directory)])
    finally:
        ktrain.build_model, ktrain.compile_for = build_model, compile_for
    recorder.record.run_dir = directory
    return recorder.record


def run_torch(directory: Path, limit_batches: int | None = None) -> Record:
    """``tl_torch.train.main`` with :data:`FLAGS`, recorded; ``limit_batches``: that many
    batches per epoch (the wiring rows alone need no more than one)."""
    import tl_torch.train as ttrain

    recorder = TorchRecorder()
    build_trainer = ttrain.build_trainer

    def recorded_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.append(recorder)
        return trainer

    ttrain.build_trainer = recorded_trainer
    try:
        with _quiet():
            limit = [] if limit_batches is None else ["--limit-batches", str(limit_batches)]
            ttrain.main([*FLAGS, *limit, "--output-dir", str(directory), "--accelerator", "cpu",
                         "--devices", "1"])
    finally:
        ttrain.build_trainer = build_trainer
    recorder.record.run_dir = directory
    return recorder.record


@functools.cache
def workdir() -> Path:
    """Where the reference's recorded run lives, once per session (removed at exit)."""
    path = Path(tempfile.mkdtemp(prefix="parity-trainers-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def keras_record() -> Record:
    """The reference's run: the same whatever the port does, so run once per session."""
    return run_keras(workdir() / "keras")


# ---- 14: the rows ----------------------------------------------------------------------------

def _per_epoch(record: Record, what) -> list:
    return [sorted({what(s) for s in record.steps if s.epoch == e})
            for e in sorted({s.epoch for s in record.steps})]


def wiring_rows(k: Record, t: Record, group: str = GROUP) -> list[Row]:
    """The exact facts: per epoch, the history's epoch and phase, the optimizer and its
    hyperparameters in effect at every step, the trainable tensors, and the optimizer's."""
    rows = [equal(group, "history: (epoch, phase) of every epoch", str(k.epochs), str(t.epochs))]
    kopt, topt = _per_epoch(k, lambda s: s.optimizer), _per_epoch(t, lambda s: s.optimizer)
    rows.append(verdict(group, "optimizer class and hyperparameters at every step, per epoch",
                        "; ".join(str(o) for o in kopt)[:200], "; ".join(str(o) for o in topt)[:200],
                        kopt == topt, tolerance="exact"))
    ktr = _per_epoch(k, lambda s: (s.trainable, s.numbers))
    ttr = _per_epoch(t, lambda s: (s.trainable, s.numbers))
    rows.append(verdict(group, "trainable tensors (Keras layers, tensors, numbers) at every step, "
                               "per epoch",
                        "; ".join(f"{len(x[0][0])} layers, {x[0][1]:,}" for x in ktr if x),
                        "; ".join(f"{len(x[0][0])} layers, {x[0][1]:,}" for x in ttr if x),
                        ktr == ttr, tolerance="exact"))
    kheld = all(s.optimizer_holds_trainable for s in k.steps)
    theld = all(s.optimizer_holds_trainable for s in t.steps)
    rows.append(verdict(group, "the optimizer holds exactly the trainable tensors, every step",
                        str(kheld), str(theld), kheld and theld, tolerance="exact"))
    return rows


def check_recorded(directory: Path, torch_record: Record | None = None) -> list[Row]:
    """Both trainers recorded (the port's record can be given: planted-mistake tests)."""
    k = keras_record()
    t = torch_record if torch_record is not None else run_torch(directory / "torch")
    rows = wiring_rows(k, t)
    ksteps = [sum(s.epoch == e for s in k.steps) for e in range(len(k.epochs))]
    tsteps = [sum(s.epoch == e for s in t.steps) for e in range(len(t.epochs))]
    # Each step's loss is recorded and shown, not compared: each run draws its own head init,
    # order, flips, angles and masks (the same step from the same state is check 9).
    losses = "; ".join(f"{name} " + " ".join(f"{s.loss:.3f}" for s in r.steps)
                       for name, r in (("keras", k), ("torch", t)))
    rows.append(equal(GROUP, "steps per epoch, and batch sizes",
                      f"{ksteps} {sorted({len(s.labels) for s in k.steps})}",
                      f"{tsteps} {sorted({len(s.labels) for s in t.steps})}",
                      note=f"losses of each step: {losses}"))
    rows += data_rows(k, t)
    rows += randomness_rows(k, t)
    return rows


def randomness_rows(k: Record, t: Record, group: str = GROUP) -> list[Row]:
    """Augmentation and Dropout: drawn in every training step and never outside one."""
    from scipy import stats

    def draws(r: Record) -> tuple[bool, str]:
        train = [d for d in r.draws if d[0] == "train"]
        sizes = [len(s.labels) for s in r.steps]
        angles = np.concatenate([d[2] for d in train]) if train else np.zeros(0)
        ok = ([d[1] for d in train] == sizes and len(train) == len(r.draws)
              and all(len(d[2]) == d[1] for d in train)
              and bool(np.all(np.abs(angles) <= 0.2 * 360)))
        return ok, (f"{len(train)} of {len(sizes)} steps, {len(r.draws) - len(train)} outside; "
                    f"|angle| <= {np.abs(angles).max() if angles.size else 0:.1f}")

    def dropped(r: Record) -> tuple[bool, str, float]:
        train = [d for d in r.dropout if d[0] == "train"]
        other = [d for d in r.dropout if d[0] != "train"]
        ok = (len(train) == len(r.steps) and all(d[1] for d in train)
              and not any(d[1] or d[2] for d in other))
        zeroed, total = sum(d[2] for d in train), sum(d[3] for d in train)
        p = stats.binomtest(zeroed, total, 0.2).pvalue if total else 0.0
        return ok, (f"{len(train)} steps in training mode, {len(other)} passes outside: "
                    f"{sum(d[2] for d in other)} zeroed; share {zeroed / max(total, 1):.4f}"), p

    (kok, kdesc), (tok, tdesc) = draws(k), draws(t)
    rows = [verdict(group, "augmentation: one angle per image in every training step, "
                           "none outside training", kdesc, tdesc, kok and tok, tolerance="exact")]
    (kok, kdesc, kp), (tok, tdesc, tp) = dropped(k), dropped(t)
    rows.append(verdict(group, "Dropout: in training mode in every training step only, share "
                               "zeroed = 0.2 (binomial p-value)", f"{kdesc} (p={kp:.3g})",
                        f"{tdesc} (p={tp:.3g})", kok and tok and kp > 1e-3 and tp > 1e-3,
                        tolerance="exact; p > 0.001"))
    return rows


# ---- 15: prediction --------------------------------------------------------------------------

PREDICT_FILES = 24


@functools.cache
def prediction_reference() -> dict[str, Any]:
    """The Keras run's saved model on validation files: its float32 predictions from the
    reference's own decoding, the float64 answer, and the run converted for the port."""
    from tl_common.head import decide
    from tl_keras import model as kmodel
    from tl_keras.data import load_image
    from tl_torch.checkpoint import MODEL_FILE, save_module
    from tl_torch.keras_interchange import module_from_keras

    record = keras_record()
    run = record.run_dir
    metrics = read_metrics(run)
    class_names = list(metrics["data"]["class_names"])
    files = load_splits(Path(metrics["data"]["root"]) if "root" in metrics["data"]
                        else _demo_root(), test_fraction=0.2, seed=42).validation
    paths = [p for i, p in enumerate(files.paths) if i % 2 == 0][:PREDICT_FILES]
    saved = keras.models.load_model(run / "model.keras")
    x32 = np.stack([load_image(p, IMAGE_SIZE).numpy() for p in paths])
    logits32 = keras.ops.convert_to_numpy(saved.predict(x32, verbose=0)).reshape(-1)
    with pairs.float64_policy():
        base = kmodel.build_base("none", IMAGE_SIZE)
        model64 = kmodel.build_model(base, seed=0)
    model64.set_weights([w.astype(np.float64) for w in saved.get_weights()])
    x64 = np.stack([exact.resize_bilinear(decoded(p), IMAGE_SIZE) for p in paths])
    logits64 = keras.ops.convert_to_numpy(model64(x64, training=False)).reshape(-1)
    ported = workdir() / "keras-for-torch"
    module, _ = module_from_keras(run / "model.keras", class_names=class_names)
    with _quiet():
        save_module(module, ported / MODEL_FILE)
    k_labels, k_probs = decide(logits32)
    e_labels, e_probs = decide(logits64)
    return {"paths": paths, "class_names": class_names, "ported": ported,
            "keras": ([class_names[i] for i in k_labels], k_probs),
            "exact": ([class_names[i] for i in e_labels], e_probs, np.abs(logits64))}


def _demo_root() -> Path:
    from tl_common.demo import demo_data_root

    return demo_data_root()


def check_prediction() -> list[Row]:
    """``python -m tl_torch.predict RUN_DIR FILES...`` (in this process) against the saved Keras
    model of the reference's run, the same weights in both."""
    from tl_torch.predict import load_run
    from tl_torch.predict import main as predict_main

    ref = prediction_reference()
    with _quiet():
        found = predict_main([str(ref["ported"]), *ref["paths"]])
    _, names, _ = load_run(ref["ported"])
    rows = [equal(PREDICT_GROUP, "class names and their order (model.ckpt vs the Keras run)",
                  str(ref["class_names"]), str(list(names))),
            equal(PREDICT_GROUP, "files, in the order given", _digest(ref["paths"]),
                  _digest([str(p) for p, _, _ in found]))]
    knames, kprobs = ref["keras"]
    enames, eprobs, margin = ref["exact"]
    tnames = [n for _, n, _ in found]
    tprobs = np.array([p for _, _, p in found])
    # The class is the logit's sign: the same in all three unless a logit lies within rounding
    # of 0 (the note gives the smallest |logit|).
    rows.append(verdict(PREDICT_GROUP, f"class predicted for each of {len(enames)} files",
                        _count(knames, ref["class_names"]), _count(tnames, ref["class_names"]),
                        knames == enames and tnames == enames, tolerance="exact",
                        note=f"smallest |logit| {float(margin.min()):.3g}"))
    rows.append(measured(PREDICT_GROUP, "probability of the class predicted",
                         bands.against_exact(eprobs, kprobs, tprobs if len(tprobs) == len(eprobs)
                                             else np.full(len(eprobs), np.nan)),
                         keras=summary(kprobs), torch=summary(tprobs),
                         note="vs the saved Keras model in float64 on the exact resize"))
    return rows


def _count(names: list[str], class_names: list[str]) -> str:
    return ", ".join(f"{names.count(c)} {c}" for c in class_names)


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]
