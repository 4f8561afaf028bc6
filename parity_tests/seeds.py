"""Check 17 and ``python -m parity_tests seeds``: both trainers over several seeds on the hard demo.

A single run of each framework cannot tell a wrong port from a right one: the two draw their head
init, shuffling, augmentation and dropout from different generators, so two right runs differ.
What they share is the distribution of outcomes. Each framework is run as users run it
(``python -m tl_<framework>.train --demo --demo-set hard --seed S``) for the same seeds, and at the
end of each phase, the mean validation accuracy, validation loss and training loss of the port's
runs must lie within :data:`BAND_SE` standard errors of the reference's mean; so must the mean
change of each over the switch (the first epoch of fine-tuning minus the last of feature
extraction, run by run). The switch is where a wrong fine-tuning rate or optimizer shows most:
measured, a tenfold rate shakes the training loss there (0.86 against 0.38), and the runs have
mostly recovered by the end. Taken run by run, the change leaves out what feature extraction
left behind: the head's initial draw, which weighs most on phase A, differs between the two
frameworks for one seed.

The standard error is that of the difference of the two means, from the seed-to-seed spread
measured in the same study (sample variance of each framework, over its runs). An accuracy's
variance is never taken below that of sampling its validation set (p(1 - p) / n at the pooled
accuracy): a few seeds that happen to agree must not make the band narrower than the counting
noise of the set itself. With 5 seeds per framework the statistic has about 8 degrees of freedom;
5 standard errors leave a right port a chance of about 0.1 % per row to fail (9 rows: about 1 %
per study).

``python -m parity_tests seeds [--seeds N] [--output DIR] [--torch-flags "..."]`` runs the study
and writes ``seeds.json``, ``seeds.md`` and ``seeds.png`` (both frameworks' validation curves, mean
and per seed). ``--torch-flags`` passes flags to the port only: plant a mistake
(``--torch-flags="--fine-tune-learning-rate 1e-4"``) and watch a row fail.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parity_tests.rows import Row, failures, verdict
from tl_common.errors import UserError
from tl_common.outputs import atomic_write_bytes, read_metrics

GROUP = "17 seeds (hard demo)"
FRAMEWORKS = ("keras", "torch")
ENV = "TL_PARITY_SEEDS"
#: Standard errors of the difference of the means that a judged epoch's values may be apart.
BAND_SE = 5.0
DEFAULT_SEEDS = 5
DATA_FLAGS = ("--demo", "--demo-set", "hard")
#: The suite's study (check 17): the recipe's 10 + 10 epochs at 96 px, so that 5 seeds of both
#: frameworks fit in a report run; ``python -m parity_tests seeds`` defaults to the full recipe.
SUITE_FLAGS = ("--image-size", "96")
#: Per epoch: what the study keeps and judges, and how the report names it.
METRICS = {"val_accuracy": "val accuracy", "val_loss": "val loss", "loss": "training loss"}
#: Bump when a run's record changes, so that older records are not reused.
RECORD_FORMAT = 2


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def run_one(framework: str, seed: int, directory: Path, flags: Sequence[str],
            name: str | None = None) -> dict[str, Any]:
    """One training run in its own process, its output in ``directory/<name>-seed<S>``.

    A finished run already there from the same command is read, not run again: a study that was
    interrupted, or a second study that plants a mistake in the port only, reuses what it can.
    """
    out = directory / f"{name or framework}-seed{seed}"
    cmd = [sys.executable, "-m", f"tl_{framework}.train", *flags, "--seed", str(seed),
           "--output-dir", str(out)]
    record = directory / f"{name or framework}-seed{seed}.json"
    if record.exists():
        done = json.loads(record.read_text())
        if (done.get("format") == RECORD_FORMAT and done.get("command") == cmd[1:]
                and (out / "metrics.json").exists()):
            return done["result"]
    log = directory / f"{name or framework}-seed{seed}.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([*cmd, "--overwrite"], stdout=f, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"{shlex.join(cmd)} failed with status {proc.returncode}: {tail[0]} "
                        f"(whole log: {log})")
    metrics = read_metrics(out)
    result = {"seed": seed, "seconds": round(time.perf_counter() - started, 1),
              "validation_files": metrics["data"]["files"]["validation"]["count"],
              "files_sha256": {split: metrics["data"]["files"][split]["sha256"]
                               for split in ("train", "validation", "test")},
              "history": [{k: h[k] for k in ("epoch", "phase", *METRICS)}
                          for h in metrics["history"]]}
    atomic_write_bytes(record, json.dumps({"format": RECORD_FORMAT, "command": cmd[1:],
                                           "result": result}).encode())
    return result


def run_study(directory: Path, seeds: Sequence[int], flags: Sequence[str] = (),
              torch_flags: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Both trainers for every seed (Keras first, then the port), with a progress bar."""
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    common = [*DATA_FLAGS, *flags]
    runs: dict[str, list[dict[str, Any]]] = {fw: [] for fw in FRAMEWORKS}
    jobs = [(fw, s) for s in seeds for fw in FRAMEWORKS]
    with tqdm(jobs, desc="seed study", unit="run", disable=not progress) as bar:
        for framework, seed in bar:
            bar.set_postfix_str(f"{framework} seed {seed}")
            extra = list(torch_flags) if framework == "torch" else []
            name = f"torch{_slug(extra)}" if extra else framework
            runs[framework].append(run_one(framework, seed, directory, [*common, *extra], name))
    return {"flags": common, "torch_flags": list(torch_flags), "seeds": list(seeds), "runs": runs}


def _slug(flags: Sequence[str]) -> str:
    """A folder-name suffix for port-only flags: ``--lr 1e-3`` -> ``+lr-1e-3``."""
    text = "-".join(f.lstrip("-") for f in flags)
    return "+" + "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)[:60]


def _values(runs: list[dict[str, Any]], epoch: int, metric: str) -> np.ndarray:
    return np.array([next(h[metric] for h in r["history"] if h["epoch"] == epoch) for r in runs])


def difference(k: np.ndarray, t: np.ndarray, metric: str, n_validation: int) -> tuple[float, float]:
    """|mean(t) - mean(k)| and the standard error of that difference (see the module's text)."""
    var_k, var_t = (float(np.var(v, ddof=1)) if v.size > 1 else 0.0 for v in (k, t))
    if metric == "val_accuracy":
        p = float(np.mean(np.concatenate([k, t])))
        floor = p * (1 - p) / n_validation
        var_k, var_t = max(var_k, floor), max(var_t, floor)
    se = math.sqrt(var_k / k.size + var_t / t.size)
    return abs(float(t.mean() - k.mean())), se


def _summary(v: np.ndarray) -> str:
    return f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]"


def phase_ends(history: list[dict[str, Any]]) -> dict[str, int]:
    """The last epoch of each phase, from one run's history."""
    ends: dict[str, int] = {}
    for h in history:
        ends[h["phase"]] = h["epoch"]
    return ends


def judged_epochs(history: list[dict[str, Any]]) -> list[tuple[int, str, bool]]:
    """(epoch, where, change) for what is judged: each phase's last epoch (its values), and the
    first epoch after a switch (``change``: its values minus the epoch before's, run by run)."""
    out: list[tuple[int, str, bool]] = []
    for i, h in enumerate(history):
        phase = h["phase"].replace("_", " ")
        if i > 0 and h["phase"] != history[i - 1]["phase"]:
            out.append((h["epoch"], f"change into {phase} (ep {history[i - 1]['epoch']}→"
                                    f"{h['epoch']})", True))
        if i == len(history) - 1 or h["phase"] != history[i + 1]["phase"]:
            out.append((h["epoch"], f"end of {phase} (ep {h['epoch']})", False))
    return out


def rows(study: dict[str, Any]) -> list[Row]:
    """The judged rows: the same data and epochs, then each phase's end, accuracy and loss."""
    k_runs, t_runs = study["runs"]["keras"], study["runs"]["torch"]
    n_val = k_runs[0]["validation_files"]
    def schedules(runs: list[dict[str, Any]]) -> set[str]:
        return {str([(h["epoch"], h["phase"]) for h in r["history"]]) for r in runs}

    # The seed also draws the test split out of the validation folder: each seed has its own
    # lists, which both frameworks must share.
    same = [k["seed"] == t["seed"] and k["files_sha256"] == t["files_sha256"]
            for k, t in zip(k_runs, t_runs, strict=True)]
    differ = [r["seed"] for r, ok in zip(k_runs, same, strict=True) if not ok]
    out = [verdict(GROUP, "files and labels of every split: the same in both, seed by seed",
                   f"{len(k_runs)} runs", f"{len(t_runs)} runs", all(same), tolerance="exact",
                   note=f"differ at seeds {differ}" if differ else "sha256 of each split's list"),
           verdict(GROUP, "epochs and phases: one schedule for every run",
                   f"{len(schedules(k_runs))} schedule(s)", f"{len(schedules(t_runs))} schedule(s)",
                   len(schedules(k_runs)) == 1 and schedules(k_runs) == schedules(t_runs),
                   tolerance="exact")]
    flags = " ".join(study["flags"])
    for epoch, where, change in judged_epochs(k_runs[0]["history"]):
        for metric, label in METRICS.items():
            k, t = _values(k_runs, epoch, metric), _values(t_runs, epoch, metric)
            if change:  # each run against itself: what the switch did, whatever came before
                k = k - _values(k_runs, epoch - 1, metric)
                t = t - _values(t_runs, epoch - 1, metric)
            diff, se = difference(k, t, "change" if change else metric, n_val)
            limit = BAND_SE * se
            out.append(Row(GROUP, f"{label}, {where}",
                           _summary(k), _summary(t), diff,
                           f"{BAND_SE:g} s.e. = {limit:.3g}", bool(diff <= limit),
                           note=f"means [range] of {k.size} and {t.size} seeds; seed-to-seed sd: "
                                f"keras {np.std(k, ddof=1):.3g}, torch {np.std(t, ddof=1):.3g}; "
                                f"{n_val} validation images; {flags}",
                           limit=limit))
    # Every epoch, reported: the largest distance of the means in standard errors.
    worst = (0.0, 0, "")
    for h in k_runs[0]["history"]:
        for metric in METRICS:
            k, t = _values(k_runs, h["epoch"], metric), _values(t_runs, h["epoch"], metric)
            diff, se = difference(k, t, metric, n_val)
            z = diff / se if se > 0 else (0.0 if diff == 0 else math.inf)
            worst = max(worst, (z, h["epoch"], metric))
    out.append(Row(GROUP, "every epoch: largest distance of the means (in s.e.)", "", "",
                   worst[0], f"reported ({BAND_SE:g} s.e. judged at the epochs above)", True,
                   note=f"epoch {worst[1]}, {worst[2]}", judged=False))
    return out


def plot(study: dict[str, Any], path: Path) -> None:
    """Validation accuracy, validation loss and training loss per epoch: each seed thin, each
    framework's mean bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METRICS), 1, figsize=(8, 10), sharex=True)
    for color, framework in zip(("tab:orange", "tab:blue"), FRAMEWORKS, strict=True):
        runs = study["runs"][framework]
        epochs = [h["epoch"] for h in runs[0]["history"]]
        for ax, metric in zip(axes, METRICS, strict=True):
            values = np.array([[h[metric] for h in r["history"]] for r in runs])
            for row in values:
                ax.plot(epochs, row, color=color, alpha=0.25, lw=1)
            mean, sd = values.mean(axis=0), values.std(axis=0, ddof=1) if len(runs) > 1 else 0
            ax.plot(epochs, mean, "-o", ms=3, color=color,
                    label=f"{framework}: mean of {len(runs)} seeds (band: ±1 sd)")
            ax.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.15)
    switch = phase_ends(study["runs"]["keras"][0]["history"]).get("feature_extraction")
    for ax, (metric, label) in zip(axes, METRICS.items(), strict=True):
        if switch:
            ax.axvline(switch + 0.5, color="grey", linestyle=":")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if metric == "val_accuracy" else "upper right", fontsize=8)
    axes[0].set_title(f"hard demo, {len(study['seeds'])} seeds per framework: "
                      f"{' '.join(study['flags'][3:]) or 'the recipe'}"
                      f"{' | port: ' + ' '.join(study['torch_flags']) if study['torch_flags'] else ''}",
                      fontsize=9)
    axes[-1].set_xlabel("epoch (dotted: fine-tuning starts)")
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def markdown(study: dict[str, Any], table: list[Row]) -> str:
    lines = [f"# Seed study: {' '.join(study['flags'])}", "",
             f"Seeds {study['seeds']}; port-only flags: {study['torch_flags'] or 'none'}.", "",
             "| check | keras | torch | diff | tolerance | verdict |", "|---|---|---|---|---|---|"]
    for r in table:
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(f"| {r.check} | {r.keras} | {r.torch} | "
                     f"{'' if r.diff is None else f'{r.diff:.3g}'} | {r.tolerance} | "
                     f"{verdict if r.judged else 'reported'} |")
    lines += ["", "Per epoch, mean over seeds (keras / torch):", "",
              "| epoch | phase | " + " | ".join(METRICS.values()) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    k_runs, t_runs = study["runs"]["keras"], study["runs"]["torch"]
    for h in k_runs[0]["history"]:
        e = h["epoch"]
        cells = [f"{_values(k_runs, e, m).mean():.3f} / {_values(t_runs, e, m).mean():.3f}"
                 for m in METRICS]
        lines.append(f"| {e} | {h['phase']} | " + " | ".join(cells) + " |")
    seconds = {fw: sum(r["seconds"] for r in study["runs"][fw]) for fw in FRAMEWORKS}
    lines += ["", f"Wall time: keras {seconds['keras']:.0f} s, torch {seconds['torch']:.0f} s "
                  "(each run in its own process, imports included)."]
    return "\n".join(lines) + "\n"


def write_outputs(study: dict[str, Any], table: list[Row], directory: Path) -> list[Path]:
    paths = [directory / "seeds.json", directory / "seeds.md", directory / "seeds.png"]
    atomic_write_bytes(paths[0], json.dumps(
        {**study, "rows": [r.as_dict() for r in table]}, indent=1).encode())
    atomic_write_bytes(paths[1], markdown(study, table).encode())
    plot(study, paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parity_tests seeds",
        description="Both trainers over several seeds on the hard demo; the port's mean "
                    "validation accuracy and loss at each phase's end within "
                    f"{BAND_SE:g} standard errors of the reference's.")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help=f"runs per framework, seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--output", default="parity_report/seeds",
                        help="folder for the runs and seeds.json/.md/.png")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size for both (default: the recipe's 160)")
    parser.add_argument("--initial-epochs", type=int, default=None)
    parser.add_argument("--fine-tune-epochs", type=int, default=None)
    parser.add_argument("--torch-flags", default="",
                        help="extra flags for the port only, e.g. to plant a mistake")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        raise UserError(f"--seeds={args.seeds} is not accepted: a spread needs at least 2 seeds")
    flags = [f for name in ("image_size", "initial_epochs", "fine_tune_epochs")
             if getattr(args, name) is not None
             for f in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    directory = Path(args.output).expanduser()
    study = run_study(directory, range(args.seeds), flags, shlex.split(args.torch_flags))
    table = rows(study)
    from parity_tests.report import format_table

    print(format_table(table))
    for path in write_outputs(study, table, directory):
        print(f"wrote {path}")
    return 1 if failures(table) else 0

