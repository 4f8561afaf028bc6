"""Check 12: more than two classes — the head, its counts, a training trajectory, both CLIs.

Two classes keep the recipe's one-logit head; N > 2 classes give Keras ``Dense(N)`` with sparse
categorical cross-entropy from logits and ``SparseCategoricalAccuracy``, and the port
``Linear(1280, N)`` with ``CrossEntropyLoss`` and ``MulticlassAccuracy(average="micro")``. Compared
on a generated three-class folder of real JPEGs (the demo's cats and dogs, and "owls": the demo's
cats in negative), with one truncated file in it that both trainers must leave out alike
(``--skip-bad-images``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageOps

from parity_tests import checks_steps, pairs
from parity_tests.checks_e2e import FRAMEWORK_KEYS, key_paths
from parity_tests.rows import Row, equal, verdict
from tl_common.demo import draw_animal
from tl_common.files import load_splits
from tl_common.mobilenet_v2 import LAST_FILTERS  # the head: 1280 weights and a bias per logit
from tl_common.outputs import read_metrics
from tl_keras import model as kmodel

GROUP = "12 more than two classes"
CLASSES = ("cats", "dogs", "owls")
#: Images per class and split: 8 to train on (24, three batches of 8), 5 to validate (1 to test).
PER_CLASS = {"train": 8, "validation": 5}
#: A file cut short, among the training cats: both CLIs run with --skip-bad-images.
CORRUPT = "train/cats/cat.0099.jpg"
SIZE, BATCH, STEPS = 96, 8, 5
#: The recipe's counts with its one-logit head (1280 + 1 trainable in feature extraction).
RECIPE_COUNTS = {"feature_extraction": (1_281, 2_257_984), "fine_tuning": (1_862_721, 396_544)}


def make_three_classes(root: Path) -> Path:
    """The folder, drawn once per directory (deterministic)."""
    if (root / ".complete").exists():
        return root
    for s, (split, count) in enumerate(PER_CLASS.items()):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([12, s, label, i])
                image = draw_animal(rng, dog=name == "dogs")
                if name == "owls":
                    image = ImageOps.invert(image)
                image.save(folder / f"{name[:-1]}.{i:04d}.jpg", quality=int(rng.integers(80, 96)))
    whole = (root / "train" / "cats" / "cat.0000.jpg").read_bytes()
    (root / CORRUPT).write_bytes(whole[: len(whole) // 2])
    (root / ".complete").write_text("ok\n")
    return root


def expected_counts(num_classes: int) -> dict[str, tuple[int, int]]:
    """The recipe's counts with the head of ``num_classes`` logits in place of its one."""
    head = (LAST_FILTERS + 1) * kmodel.head_units(num_classes)
    one = LAST_FILTERS + 1
    return {phase: (trainable - one + head, frozen)
            for phase, (trainable, frozen) in RECIPE_COUNTS.items()}


# ---- head and counts ---------------------------------------------------------------------------

def _heads_and_counts() -> list[Row]:
    rows = []
    kbase = pairs.keras_base("none", SIZE)
    tbase = pairs.torch_base("none", SIZE)
    for n in (2, 3):
        kmodel_ = kmodel.build_model(kbase, seed=0, num_classes=n)
        module = _torch_module_for(tbase, n)
        kernel = kmodel_.get_layer("dense").get_weights()[0]
        rows.append(equal(GROUP, f"{n} classes: head kernel shape (Keras (in, out); torch "
                                 "weight transposed)", tuple(kernel.shape),
                          tuple(module.classifier.weight.T.shape)))
        for phase in ("feature_extraction", "fine_tuning"):
            kmodel.set_phase(kbase, phase)
            module.set_phase(phase)
            k, t = kmodel.count_params(kmodel_), module.counts()
            t = (t["trainable"], t["non_trainable"])
            want = expected_counts(n)[phase]
            rows.append(verdict(GROUP, f"{n} classes, {phase}: (trainable, non-trainable), and "
                                       f"the recipe's with a head of {kmodel.head_units(n)}",
                                str(k), str(t), k == t == want, tolerance="exact",
                                note=f"expected {want}"))
    return rows


def _torch_module_for(base, num_classes: int):
    from tl_torch.module import TransferModule

    return TransferModule(base, num_classes=num_classes, fast=False)


# ---- a training trajectory ------------------------------------------------------------------------

def _batches(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """2 x STEPS fixed batches of the folder's readable training images (Keras' pipeline),
    every class in each, cycled in a fixed shuffled order."""
    from tl_keras.data import make_dataset

    files = load_splits(root, 0.2, 0, skip_bad_images=True).train
    images, labels = zip(*make_dataset(files, SIZE, 64, shuffle=False, seed=0).as_numpy_iterator(),
                         strict=True)
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(0).permutation(len(labels))
    out = []
    for i in range(2 * STEPS):
        j = (i * BATCH) % (len(order) - BATCH + 1)
        idx = order[j:j + BATCH]
        out.append((images[idx], labels[idx]))
    return out


def _trajectory(root: Path) -> list[Row]:
    """STEPS steps of each phase, step by step from a shared state and free-running (check 9's
    comparisons), on the three-class folder; no augmentation or dropout."""
    setup = checks_steps.Setup(size=SIZE, batch=BATCH, steps=STEPS, free_steps=STEPS,
                               num_classes=len(CLASSES), augment=False, dropout=0.0, group=GROUP)
    return checks_steps.run(setup, _batches(root)).rows


# ---- both command lines ---------------------------------------------------------------------------

@contextlib.contextmanager
def _keras_eagerly() -> Iterator[None]:
    """The Keras CLI compiles eagerly here: tracing its train step twice costs ~40 s, and these
    rows compare files and counts, not kernels."""
    import tl_keras.train as keras_train

    compile_for = keras_train.compile_for

    def eagerly(model, phase: str, learning_rate: float) -> None:
        compile_for(model, phase, learning_rate)
        model.run_eagerly = True

    keras_train.compile_for = eagerly
    try:
        yield
    finally:
        keras_train.compile_for = compile_for


def _run_both(root: Path, directory: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Both CLIs; their metrics.json and the warnings each printed on stderr."""
    from tl_keras.train import main as keras_main
    from tl_torch.train import main as torch_main

    common = ["--data-dir", str(root), "--weights", "demo", "--image-size", str(SIZE),
              "--batch-size", str(BATCH), "--initial-epochs", "1", "--fine-tune-epochs", "1",
              "--skip-bad-images", "--overwrite"]
    warnings = []
    for name, main in (("keras", keras_main), ("torch", torch_main)):
        err = io.StringIO()
        with _keras_eagerly(), contextlib.redirect_stderr(err):
            main([*common, "--output-dir", str(directory / name)])
        warnings.append("\n".join(line for line in err.getvalue().splitlines()
                                  if line.startswith("warning: --skip-bad-images")))
    return read_metrics(directory / "keras"), read_metrics(directory / "torch"), warnings


def _end_to_end(root: Path, directory: Path) -> list[Row]:
    k, t, warnings = _run_both(root, directory)
    expected_warning = (f"warning: --skip-bad-images: left out 1 unreadable image file: "
                        f"{root / CORRUPT} (truncated JPEG (the data ends before the image does))")
    kkeys = key_paths(k) - FRAMEWORK_KEYS["keras"]
    tkeys = key_paths(t) - FRAMEWORK_KEYS["torch"]
    rows = [
        verdict(GROUP, "CLIs, 1 + 1 epochs: metrics.json keys (beyond versions and Lightning's "
                       "flags)", f"{len(kkeys)} keys", f"{len(tkeys)} keys", kkeys == tkeys,
                tolerance="exact",
                note="" if kkeys == tkeys else f"only keras: {sorted(kkeys - tkeys)[:3]} "
                                               f"only torch: {sorted(tkeys - kkeys)[:3]}"),
        verdict(GROUP, "CLIs: class_names, from the class folders",
                str(k["data"]["class_names"]), str(t["data"]["class_names"]),
                k["data"]["class_names"] == t["data"]["class_names"] == list(CLASSES),
                tolerance="exact"),
        verdict(GROUP, "CLIs: --skip-bad-images left out the same file",
                str([s["path"] for s in k["data"]["skipped"]]),
                str([s["path"] for s in t["data"]["skipped"]]),
                k["data"]["skipped"] == t["data"]["skipped"]
                and [s["path"] for s in k["data"]["skipped"]] == [CORRUPT], tolerance="exact"),
    ]
    rows.append(verdict(GROUP, "CLIs: the warning on stderr names the file left out",
                        warnings[0][-60:], warnings[1][-60:],
                        warnings == [expected_warning] * 2, tolerance="exact"))
    for split in ("train", "validation", "test"):
        rows.append(equal(GROUP, f"CLIs: {split} files and labels (sha256 of the kept list)",
                          k["data"]["files"][split]["sha256"][:16],
                          t["data"]["files"][split]["sha256"][:16]))
    want = expected_counts(len(CLASSES))
    for phase in ("feature_extraction", "fine_tuning"):
        kc = (k["counts"][phase]["trainable"], k["counts"][phase]["non_trainable"])
        tc = (t["counts"][phase]["trainable"], t["counts"][phase]["non_trainable"])
        rows.append(verdict(GROUP, f"CLIs: counts, {phase}", str(kc), str(tc),
                            kc == tc == want[phase], tolerance="exact"))
    rows.append(equal(GROUP, "CLIs: history epochs and phases",
                      str([(h["epoch"], h["phase"][:4]) for h in k["history"]]),
                      str([(h["epoch"], h["phase"][:4]) for h in t["history"]])))
    rows.append(verdict(GROUP, "CLIs: test accuracy reported, a share of 3 test images",
                        f"{k['test']['accuracy']:.3f}", f"{t['test']['accuracy']:.3f}",
                        all(round(d["test"]["accuracy"] * 3, 4) in (0, 1, 2, 3) for d in (k, t)),
                        tolerance="k/3"))
    return rows


def check_multiclass(directory: Path) -> list[Row]:
    """All rows of check 12; ``directory`` holds the generated folder and both runs' outputs."""
    root = make_three_classes(Path(directory) / "three_classes")
    return _heads_and_counts() + _trajectory(root) + _end_to_end(root, Path(directory))
