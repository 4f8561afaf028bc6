"""Check 11: both trainers end to end on the demo data, and their outputs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from parity_tests.rows import Row, equal, verdict
from tl_common.outputs import read_metrics

#: Keys only one framework writes: its library versions, and Lightning's device settings.
FRAMEWORK_KEYS = {"keras": {"versions.tensorflow", "versions.keras"},
                  "torch": {"versions.torch", "versions.lightning", "settings.accelerator",
                            "settings.devices", "settings.strategy", "settings.precision"}}
EPOCHS = (1, 1)
#: Validation accuracy after 1 + 1 epochs on the demo data (48 images): both runs must learn
#: (the Done-when of the trainers asks 0.90 after the full demo)...
MIN_VAL_ACCURACY = 0.9
#: ...and land close to each other. The two runs draw their head init, shuffling, augmentation
#: and dropout from different generators: two samples of one training outcome. Measured over
#: seeds 0-4, 1 + 1 epochs: 1.000 in all ten runs (Keras and torch). The band allows 5 of the 48
#: validation images: three binomial standard deviations at a true accuracy of 0.95
#: (3 * sqrt(0.95 * 0.05 / 48) = 0.094).
VAL_ACCURACY_BAND = 0.1


def key_paths(doc: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("per_class",):
            paths |= key_paths(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            paths |= {f"{path}[].{k}" for k in value[0]}
        else:
            paths.add(path)
    return paths


def run_both(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``python -m tl_keras.train`` and ``python -m tl_torch.train`` on the demo, in-process."""
    from tl_keras.train import main as keras_main
    from tl_torch.train import main as torch_main

    common = ["--demo", "--initial-epochs", str(EPOCHS[0]), "--fine-tune-epochs", str(EPOCHS[1])]
    keras_main([*common, "--output-dir", str(directory / "keras")])
    torch_main([*common, "--output-dir", str(directory / "torch")])
    return read_metrics(directory / "keras"), read_metrics(directory / "torch")


def check_end_to_end(directory: Path) -> list[Row]:
    group = "11 end to end"
    k, t = run_both(directory)
    kkeys = key_paths(k) - FRAMEWORK_KEYS["keras"]
    tkeys = key_paths(t) - FRAMEWORK_KEYS["torch"]
    rows = [verdict(group, "metrics.json: the same keys (beyond versions and Lightning's flags)",
                    f"{len(kkeys)} keys", f"{len(tkeys)} keys", kkeys == tkeys, tolerance="exact",
                    note=f"only keras: {sorted(kkeys - tkeys)[:3]} only torch: "
                         f"{sorted(tkeys - kkeys)[:3]}" if kkeys != tkeys else "")]
    for phase in ("feature_extraction", "fine_tuning"):
        for kind in ("trainable", "non_trainable"):
            rows.append(equal(group, f"counts: {phase} {kind}", k["counts"][phase][kind],
                              t["counts"][phase][kind]))
    for split in ("train", "validation", "test"):
        rows.append(equal(group, f"{split} files and labels (sha256 of the list)",
                          k["data"]["files"][split]["sha256"][:16],
                          t["data"]["files"][split]["sha256"][:16]))
    rows.append(equal(group, "weights file (sha256)", (k["weights"]["sha256"] or "")[:16],
                      (t["weights"]["sha256"] or "")[:16]))
    rows.append(equal(group, "history: epochs and phases",
                      str([(h["epoch"], h["phase"][:4]) for h in k["history"]]),
                      str([(h["epoch"], h["phase"][:4]) for h in t["history"]])))
    kacc, tacc = k["history"][-1]["val_accuracy"], t["history"][-1]["val_accuracy"]
    rows.append(verdict(group, f"final validation accuracy >= {MIN_VAL_ACCURACY:g} in both",
                        f"{kacc:.3f}", f"{tacc:.3f}", min(kacc, tacc) >= MIN_VAL_ACCURACY,
                        tolerance=f">= {MIN_VAL_ACCURACY:g}"))
    rows.append(Row(group, "final validation accuracy, Keras vs torch", f"{kacc:.3f}", f"{tacc:.3f}",
                    abs(kacc - tacc), f"band {VAL_ACCURACY_BAND:g}",
                    abs(kacc - tacc) <= VAL_ACCURACY_BAND))
    return rows
