"""Checks 5 and 8: BatchNorm through training, optimizer steps; the demo batches check 9 trains on."""

from __future__ import annotations

import functools

import keras
import numpy as np
import torch

from parity_tests import pairs
from parity_tests.rows import Row, measured, verdict
from tl_common import bands, recipe
from tl_common.demo import demo_weights_path
from tl_keras import model as kmodel
from tl_torch.module import TransferModule

#: torch's own optimizers, given Keras' arguments, must miss Keras' update by more than this
#: (relative): the trap the Keras-rule optimizers exist for.
TORCH_DEFAULT_MISS = 1e-3

FINE_TUNE_AT = recipe.FINE_TUNE_AT
PHASES = (("feature_extraction", recipe.LEARNING_RATE),
          ("fine_tuning", recipe.FINE_TUNE_LEARNING_RATE))


# ---- helpers ---------------------------------------------------------------------------------

def _torch_module(size: int, **kwargs) -> TransferModule:
    module = TransferModule(pairs.torch_base(demo_weights_path(), size), fine_tune_at=FINE_TUNE_AT,
                            learning_rate=PHASES[0][1], fine_tune_learning_rate=PHASES[1][1],
                            **kwargs)
    return module.train()


def torch_phase(module: TransferModule, phase: str) -> torch.optim.Optimizer:
    """Enter a phase as training does: freeze, new optimizer."""
    module.set_phase(phase)
    return module.configure_optimizers()


def _keras_phase(base, model, phase: str, lr: float, *, eager: bool = True) -> None:
    kmodel.set_phase(base, phase, FINE_TUNE_AT)
    kmodel.compile_for(model, phase, lr)
    # Eager runs the same kernels without tracing a training graph per phase (~20 s each here):
    # cheaper for a few steps, dearer for many.
    model.run_eagerly = eager


def _bn_state(kbase=None, tbase=None) -> dict[str, dict[str, np.ndarray]]:
    """{BN layer name: {gamma, beta, moving_mean, moving_variance}} of either framework."""
    out = {}
    if kbase is not None:
        for layer in kbase.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                out[layer.name] = dict(zip(("gamma", "beta", "moving_mean", "moving_variance"),
                                           (w.copy() for w in layer.get_weights()), strict=True))
    else:
        for layer in tbase.keras_layers:
            if layer.type == "BatchNormalization":
                m = layer.module
                out[layer.name] = {"gamma": m.weight.detach().clone().numpy(),
                                   "beta": m.bias.detach().clone().numpy(),
                                   "moving_mean": m.running_mean.clone().numpy(),
                                   "moving_variance": m.running_var.clone().numpy()}
    return out


def _bn_changes(before: dict, after: dict, index: dict[str, int]) -> dict[str, list[str]]:
    changed = {"stats": [], "affine_unfrozen": [], "affine_frozen": []}
    for name in before:
        if any(not np.array_equal(before[name][k], after[name][k])
               for k in ("moving_mean", "moving_variance")):
            changed["stats"].append(name)
        if any(not np.array_equal(before[name][k], after[name][k]) for k in ("gamma", "beta")):
            changed["affine_unfrozen" if index[name] >= FINE_TUNE_AT else "affine_frozen"].append(name)
    return changed


# ---- 5 BatchNorm -----------------------------------------------------------------------------

def check_batchnorm(size: int = 96, steps: int = 2,
                    frameworks: tuple[str, ...] = ("keras", "torch")) -> list[Row]:
    """BatchNorm's settings, and what training steps in each phase do to its variables.

    ``frameworks`` restricts the training part (the planted-mistake tests train the port only).
    """
    group = "5 BatchNorm"
    images, labels = pairs.demo_images(size), pairs.demo_labels()
    kbase = pairs.keras_base(demo_weights_path(), size)
    module = _torch_module(size)
    module.augment_generator = torch.Generator().manual_seed(0)
    index = {layer.name: i for i, layer in enumerate(kbase.layers)}
    kbns = [layer for layer in kbase.layers if isinstance(layer, keras.layers.BatchNormalization)]
    tbns = [layer.module for layer in module.base.keras_layers if layer.type == "BatchNormalization"]
    n = len(kbns)
    unfrozen = sum(index[b.name] >= FINE_TUNE_AT for b in kbns)
    rows = [
        verdict(group, "epsilon of every BatchNorm", f"{sorted({b.epsilon for b in kbns})}",
                f"{sorted({b.eps for b in tbns})}",
                all(k.epsilon == t.eps for k, t in zip(kbns, tbns, strict=True)), tolerance="exact"),
        verdict(group, "momentum: torch = 1 - Keras for every BatchNorm",
                f"{sorted({b.momentum for b in kbns})}", f"{sorted({round(b.momentum, 12) for b in tbns})}",
                all(abs((1 - k.momentum) - t.momentum) < 1e-12 for k, t in zip(kbns, tbns, strict=True)),
                tolerance="exact"),
    ]
    kmodel_ = kmodel.build_model(kbase, seed=0)
    for phase, lr in PHASES:
        changes = {}
        if "keras" in frameworks:
            _keras_phase(kbase, kmodel_, phase, lr)
            before = _bn_state(kbase=kbase)
            for _ in range(steps):
                kmodel_.train_on_batch(images, labels)
            changes["keras"] = _bn_changes(before, _bn_state(kbase=kbase), index)
        if "torch" in frameworks:
            # As the trainer runs (BatchNorm folded into the convolutions: tl_torch.fast), and
            # with the base's own BatchNorm modules running (TransferModule(fast=False)).
            for variant, folded in (("torch", True), ("torch unfolded", False)):
                optimizer = torch_phase(module, phase)
                module.fast = folded
                before = _bn_state(tbase=module.base)
                for _ in range(steps):
                    loss = module.shared_step((pairs.nchw(images), torch.from_numpy(labels)),
                                        module.train_loss, module.train_acc, augment=True)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                changes[variant] = _bn_changes(before, _bn_state(tbase=module.base), index)
        kc = changes.get("keras")
        tcs = [changes[v] for v in ("torch", "torch unfolded") if v in changes]

        def stats(c):
            return "not run" if c is None else f"{n - len(c['stats'])}/{n} unchanged"

        def affine(c):
            return ("not run" if c is None else
                    f"{len(c['affine_unfrozen'])} changed, {len(c['affine_frozen'])} frozen changed")

        def torch_cell(describe, tcs=tcs) -> str:
            return ("not run" if not tcs else
                    " | ".join(f"{label}: {describe(c)}" for label, c in zip(("folded", "unfolded"),
                                                                           tcs, strict=False)))

        ran = [c for c in (kc, *tcs) if c is not None]
        rows.append(verdict(group, f"{phase}, {steps} training steps: moving statistics unchanged",
                            stats(kc), torch_cell(stats), all(not c["stats"] for c in ran),
                            tolerance="bitwise"))
        expected = unfrozen if phase == "fine_tuning" else 0
        rows.append(verdict(group, f"{phase}: gamma/beta changed exactly in the unfrozen layers "
                                   f"({expected} of {n})", affine(kc), torch_cell(affine),
                            all(len(c["affine_unfrozen"]) == expected and not c["affine_frozen"]
                                for c in ran), tolerance="exact"))
    if "keras" in frameworks:
        rows.append(_keras_nested_training_trap(size, images, labels))
    return rows


def _keras_nested_training_trap(size: int, images: np.ndarray, labels: np.ndarray) -> Row:
    """The recipe as written (``x = base(x, training=False)`` in a functional model) under Keras 3:
    ``fit``'s ``training=True`` overrides the nested ``training=False`` (keras-team/keras#20285),
    so the unfrozen BatchNorm layers update their moving statistics in fine-tuning. Why
    ``tl_keras`` calls the base through ``InferenceMode``."""
    base = pairs.keras_base(demo_weights_path(), size)
    inputs = keras.Input((size, size, 3))
    x = base(keras.applications.mobilenet_v2.preprocess_input(inputs), training=False)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x)))
    _keras_phase(base, model, "fine_tuning", PHASES[1][1])
    before = _bn_state(kbase=base)
    model.train_on_batch(images, labels)
    index = {layer.name: i for i, layer in enumerate(base.layers)}
    changed = _bn_changes(before, _bn_state(kbase=base), index)["stats"]
    return verdict("5 BatchNorm", "trap: the recipe's plain nested base(x, training=False), "
                                  "fine-tuning, 1 step: moving statistics updated",
                   f"{len(changed)}/{len(before)} changed", "n/a (always inference mode)",
                   bool(changed), tolerance="> 0 changed",
                   note="Keras 3 overrides the nested training=False (keras-team/keras#20285); "
                        "tl_keras wraps the base in InferenceMode")


# ---- 8 optimizers ----------------------------------------------------------------------------

def _optimizer_case(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Zero weights (the update is then the weight itself: no cancellation hides differences),
    and 5 steps of gradients of the head's and a depthwise kernel's shapes, some tiny (where
    Adam's and RMSprop's epsilon placement matters)."""
    rng = np.random.default_rng(seed)
    shapes = [(1280, 1), (1,), (3, 3, 96, 1)]
    weights = [np.zeros(s, np.float32) for s in shapes]
    grads = []
    for _ in range(5):
        g = [rng.normal(0, 1e-2, s).astype(np.float32) for s in shapes]
        g[0][: 64] *= 1e-4  # |g| ~ 1e-6
        grads.append(g)
    return weights, grads


def _keras_steps(optimizer, weights, grads) -> list[list[np.ndarray]]:
    """Keras' optimizer on these weights and gradients, in their dtype."""
    variables = [keras.Variable(w, dtype=w.dtype) for w in weights]
    out = []
    for g in grads:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(x) for x in g], variables, strict=True))
        out.append([v.numpy().copy() for v in variables])
    return out


def _torch_steps(make, weights, grads) -> list[list[np.ndarray]]:
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    optimizer = make(params)
    out = []
    for g in grads:
        for p, x in zip(params, g, strict=True):
            p.grad = torch.from_numpy(x.copy())
        optimizer.step()
        out.append([p.detach().numpy().copy() for p in params])
    return out


def _relative(keras_w: list[np.ndarray], torch_w: list[np.ndarray]) -> float:
    scale = max(float(np.max(np.abs(w))) for w in keras_w)
    return max(float(np.max(np.abs(k - t))) for k, t in zip(keras_w, torch_w, strict=True)) / scale


def check_optimizers() -> list[Row]:
    """The optimizers the port configures in each phase, against Keras' Adam and RMSprop."""
    group = "8 optimizers"
    weights, grads = _optimizer_case()
    module = TransferModule(pairs.torch_base("none", 32), fast=False, learning_rate=PHASES[0][1],
                            fine_tune_learning_rate=PHASES[1][1])
    rows = []
    for (phase, lr), keras_cls, torch_own in (
            (PHASES[0], keras.optimizers.Adam,
             lambda p, lr=PHASES[0][1]: torch.optim.Adam(p, lr=lr, eps=1e-7)),
            (PHASES[1], keras.optimizers.RMSprop,
             lambda p, lr=PHASES[1][1]: torch.optim.RMSprop(p, lr=lr, alpha=0.9, eps=1e-7))):
        module.set_phase(phase)
        port = module.configure_optimizers()
        make = lambda params, port=port: type(port)(params, **port.defaults)  # noqa: E731
        kw = _keras_steps(keras_cls(learning_rate=lr), weights, grads)
        kw64 = _keras_steps(keras_cls(learning_rate=lr), [w.astype(np.float64) for w in weights],
                            [[g.astype(np.float64) for g in step] for step in grads])
        tw = _torch_steps(make, weights, grads)
        name = f"{keras_cls.__name__}(learning_rate={lr:g}) vs {type(port).__name__}"
        for steps in (1, 5):
            k, k64, t = (np.concatenate([w.ravel() for w in ws[steps - 1]]) for ws in (kw, kw64, tw))
            rows.append(measured(group, f"{name}: {steps} step{'s' * (steps > 1)}",
                                 bands.against_exact(k64, k, t, how="vs Keras' optimizer in float64"),
                                 keras=f"max |w| {np.abs(k).max():.3g}",
                                 torch=f"max |w| {np.abs(t).max():.3g}",
                                 note="weights start at 0: the weights are the updates"))
        own = _relative(kw[0], _torch_steps(torch_own, weights, grads)[0])
        rows.append(Row(group, f"trap: torch.optim.{'Adam' if phase == 'feature_extraction' else 'RMSprop'}"
                               " with Keras' arguments misses Keras' step", "", f"{own:.3g}", own,
                        f"> {TORCH_DEFAULT_MISS:g} rel", own > TORCH_DEFAULT_MISS,
                        note="why the port has its own optimizers"))
    return rows


# ---- the demo batches of check 9 -------------------------------------------------------------------

def demo_batches(size: int, steps: int, batch: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` fixed batches of demo training images (decoded once, cycled), both classes in
    each, in a fixed shuffled order."""
    images, labels = _demo_train(size)
    order = np.random.default_rng(0).permutation(len(labels))
    out = []
    for i in range(steps):
        j = (i * batch) % (len(order) - batch + 1)
        idx = order[j:j + batch]
        out.append((images[idx], labels[idx]))
    return out


@functools.cache
def _demo_train(size: int) -> tuple[np.ndarray, np.ndarray]:
    from tl_keras.data import make_dataset

    files = pairs.demo_splits().train
    batches = list(make_dataset(files, size, 64, shuffle=False, seed=0).as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
