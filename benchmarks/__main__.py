"""``python -m benchmarks``: the port against the Keras reference, on this machine, in one run.

Usage::

    python -m benchmarks [--quick] [--bases NAME ...] [--output DIR] [--repeats N] [--bf16]
                         [--tf32] [--profile] [--no-demo] [--all-keras] [--wait-quiet SECONDS]

Measures, each framework in fresh subprocesses of its own (kept alive side by side, their
repetitions taken in turn: see :mod:`benchmarks.runner`), on the same demo images: (a) phase-A
and (b) phase-B training throughput, (c) inference throughput, (d) the input pipeline on the
demo's JPEG files, (e) peak memory, (f) the two demo runs end to end (not with ``--quick``), and
the base's achieved GFLOP/s against a measured fp32 matmul peak. Keras is measured with oneDNN on
(tl_keras' setting), off (TensorFlow's default on this CPU), and on with glibc's freed-memory
setting (``--all-keras``: also off with it), and with XLA (``jit_compile=True``; the augmentation
outside the compiled step, since Keras refuses XLA for the recipe's model); the best of them, row
by row, is the denominator. The reference on Keras 3's torch backend is measured as the
alternative a user might pick instead of a port (rows a-kt, b-kt, c-kt). The port is measured with
and without that setting, and with OpenMP's passive wait policy (a suggestion). ``--quick``
measures the two primary configurations and Keras with XLA, briefly (each other base adds a
few minutes). Writes ``DIR/benchmark.json`` and ``DIR/benchmark.md`` (default DIR:
benchmarks/results), worker logs in ``DIR/logs``.

Every base ``--base`` takes is measured (``--bases`` chooses; default all four): the recipe's,
mobilenet_v2, on everything above; each other base (mobilenet_v3_large, efficientnet_b0,
resnet50) afterwards in a round of its own, on (a), (b) (from its default fine-tuning point) and
(c) only, with the primary configurations: the port as its trainer runs it, and Keras with oneDNN
on and off (the full run adds oneDNN + glibc's setting; ``--all-keras`` every float32 Keras
configuration, XLA included), fewer repetitions (:func:`benchmarks.config.base_plan`,
:func:`benchmarks.config.base_sizes`). The report has a table per base. On a machine with a GPU, torch
uses it (cuda when available), and TensorFlow uses one if it sees it; each framework keeps its
own TF32 default there (torch: TF32 in convolutions only; TensorFlow: in both), which the report
states, and ``--tf32`` adds both frameworks with TF32 off and on.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import bf16, report
from benchmarks import config as C
from benchmarks.runner import REPO_ROOT, make_batch, run_demo, run_workers
from tl_common.machine import describe, load_average


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the two primary configurations only, few repetitions, no demo runs")
    p.add_argument("--bases", nargs="+", choices=C.ALL_BASES, default=list(C.ALL_BASES),
                   metavar="NAME",
                   help=f"the bases to measure, of {', '.join(C.ALL_BASES)} (default: all; "
                        f"{C.DEFAULT_BASE} gets every measurement, the others (a), (b), (c))")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                   help="folder for benchmark.json, benchmark.md and logs/")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repetitions per measurement (default {C.FULL.repeats}, "
                        f"quick {C.QUICK.repeats})")
    p.add_argument("--bf16", action="store_true",
                   help="also measure bf16 (torch autocast, Keras mixed_bfloat16): changes the "
                        "numbers, reported apart")
    p.add_argument("--tf32", action="store_true",
                   help="NVIDIA GPUs: also measure both frameworks with TF32 off and on "
                        "(the primaries keep each framework's default)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the port's phase-A and phase-B steps (torch.profiler)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo runs (f)")
    p.add_argument("--all-keras", action="store_true",
                   help="also measure Keras with oneDNN off and glibc's setting on")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="SECONDS",
                   help="before each process, wait up to this long for other work on the machine "
                        "to stop (default 10, quick 5; 0: never wait)")
    args = p.parse_args(argv)
    args.bases = list(dict.fromkeys(args.bases))   # each once, in the order given
    if args.wait_quiet is not None and args.wait_quiet < 0:
        p.error(f"--wait-quiet={args.wait_quiet}: expected seconds >= 0")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats={args.repeats}: expected a positive integer")
    if args.tf32 and not cuda_available():
        p.error("--tf32: torch sees no CUDA GPU here; TF32 is a setting of NVIDIA GPUs (Ampere "
                "and later)")
    return args


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (torch imported in this process only to ask)."""
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    sizes = C.QUICK if args.quick else C.FULL
    if args.repeats is not None:
        sizes = replace(sizes, repeats=args.repeats)
    wait_quiet_s = args.wait_quiet if args.wait_quiet is not None else (5 if args.quick else 10)
    out = args.output.resolve()
    work, logs = out / "work", out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, flush=True)

    from tl_common.demo import demo_data_root
    from tl_common.files import load_splits

    machine = describe()
    data_root = demo_data_root()
    batch_file = work / "batch.npz"
    make_batch(batch_file, data_root)
    recipe_base = C.DEFAULT_BASE in args.bases
    others = [b for b in args.bases if b != C.DEFAULT_BASE]
    configs = (C.plan(quick=args.quick, bf16=args.bf16, all_keras=args.all_keras, tf32=args.tf32)
               if recipe_base else [])
    base_sizes = C.base_sizes(C.QUICK if args.quick else C.FULL)
    if args.repeats is not None:   # asked for: every base gets as many
        base_sizes = replace(base_sizes, repeats=args.repeats)
    demo = recipe_base and not (args.quick or args.no_demo)
    say(f"benchmarks: {len(configs)} configurations{' + 2 demo runs' if demo else ''}"
        + (f", then {', '.join(others)} in rounds of their own" if others else "")
        + f"; load average {machine['load_average_at_start']}; output {out}")
    common = {"batch_file": batch_file, "data_root": data_root, "wait_quiet_s": wait_quiet_s,
              "say": say}
    profile_dir = out / "profile" if args.profile else None
    results = (run_workers(configs, sizes=sizes, work=work, logs=logs, profile_dir=profile_dir,
                           **common) if configs else {})
    demos = {}
    if demo:
        for framework in ("keras", "torch"):
            demos[framework] = run_demo(framework, logs=logs, wait_quiet_s=wait_quiet_s, say=say)
    bases = {}
    for base in others:
        bases[base] = measure_base(base, quick=args.quick, all_keras=args.all_keras,
                                   sizes=base_sizes, work=work / base, logs=logs / base,
                                   profile_dir=profile_dir / base if profile_dir else None,
                                   **common)

    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    rows = report.build_rows(summary, results, demos) if recipe_base else []
    if recipe_base:
        bases = {C.DEFAULT_BASE: {
            **report.base_report(C.DEFAULT_BASE, summary, results),
            "configs": [c.name for c in configs
                        if c is C.TORCH or c in report.KERAS_CONFIGS]}, **bases}
    every_result = {**results, **{f"{name}@{base}": runs for base, entry in bases.items()
                                  for name, runs in entry.get("results", {}).items()}}
    doc = {
        "command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in
                                                      (sys.argv[1:] if argv is None else argv)),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "sizes": sizes.to_dict(), "base_sizes": base_sizes.to_dict(),
        "wait_quiet_s": wait_quiet_s,
        "batch_size": C.BATCH_SIZE, "image_size": C.IMAGE_SIZE, "weights": C.WEIGHTS,
        "train_images": len(load_splits(data_root, 0.2, C.SEED).train),
        "machine": machine, "threads": threads_of(every_result),
        "configs": {c.name: c.to_dict() for c in configs},
        "rows": rows, "targets": report.targets(rows, summary, results), "summary": summary,
        "bf16": bf16.gains(summary, results),
        "demos": demos, "results": results, "bases": bases,
        "load_average_at_end": load_average(),
        "elapsed_s": time.perf_counter() - started,
    }
    json_path, md_path = report.write(doc, out)
    say("")
    say(md_path.read_text())
    say(f"wrote {json_path} and {md_path}")
    failed = [r for runs in every_result.values() for r in runs if r.get("returncode")]
    return 1 if failed else 0


def threads_of(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each framework's threads and device, as its primary worker read them back."""
    threads: dict[str, Any] = {}
    for name, runs in results.items():
        run = next((r for r in runs if "threads" in r), None)
        framework = (run or {}).get("config", {}).get("framework")
        if run and framework not in threads and name.split("@")[0] in (C.TORCH.name,
                                                                       C.KERAS_ONEDNN.name):
            threads[framework] = {**run["threads"], "device": run.get("device"),
                                  **({"tf32": run["tf32"]} if run.get("tf32") is not None
                                     else {})}
    return threads


def measure_base(base: str, *, quick: bool, all_keras: bool, sizes: C.Sizes, work: Path,
                 logs: Path, batch_file: Path, data_root: Path, profile_dir: Path | None,
                 wait_quiet_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    """A base other than the recipe's, in a round of its own: (a), (b), (c) of the port and of the
    Keras configurations :func:`benchmarks.config.base_plan` names; its entry of ``bases``."""
    configs = C.base_plan(base, quick=quick, all_keras=all_keras)
    say(f"{base}: {len(configs)} configurations, fine_tune_at {C.fine_tune_at(base)}")
    work.mkdir(parents=True, exist_ok=True)
    load, t0 = load_average(), time.perf_counter()
    results = run_workers(configs, sizes=sizes, work=work, logs=logs, batch_file=batch_file,
                          data_root=data_root, profile_dir=profile_dir, wait_quiet_s=wait_quiet_s,
                          say=say)
    summary = {name: report.summarize_runs(runs) for name, runs in results.items()}
    return {**report.base_report(base, summary, results), "configs": [c.name for c in configs],
            "summary": summary, "results": results, "load_average": [load, load_average()],
            "elapsed_s": time.perf_counter() - t0}


if __name__ == "__main__":
    raise SystemExit(main())
