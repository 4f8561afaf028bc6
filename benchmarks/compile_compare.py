"""The port's speed path against ``torch.compile``, side by side in one process.

Run: ``python -m benchmarks.compile_compare [--quick] [--bf16] [--output DIR]``.

For each way of running the port's model, the recipe's three throughputs, as the main harness
names them: (a) a phase-A training step, (b) a phase-B training step (layers from
``fine_tune_at`` trainable), (c) inference in eval mode; and the base's forward alone, the first
call's time (tracing or compiling), the process's peak memory, and the input shapes each way
cannot run. The ways:

- ``port``: the trainer's own path (``TransferModule``, the base folded by :func:`tl_torch.fast.fold`,
  the frozen blocks through oneDNN Graph);
- ``compile``: the same module with ``fast=False`` (the plain base, which dynamo traces) through
  ``module.compile()`` (inductor, CPU C++ code generation; freezing, which folds BatchNorm and
  keeps weights as constants in inference, as ``TORCHINDUCTOR_FREEZING`` says, on by default
  here);
- ``compile-max-autotune``: the same with ``mode="max-autotune-no-cudagraphs"``.

Repetitions alternate between the ways (a round of each, then again), so that a change of load
on the machine touches all of them alike; the verdict is the ratio of medians. ``--bf16`` adds
each way under ``torch.autocast(bfloat16)`` (what ``--precision bf16-mixed`` runs).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_FREEZING", "1")   # read when inductor is first imported

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks import config as C  # noqa: E402
from tl_common.machine import describe  # noqa: E402

WAYS = ("port", "compile", "compile-max-autotune")
SECTIONS = ("train_a", "train_b", "infer", "base_forward")
SHAPE_PROBES = (32, 97)


def build(way: str, phase: str, bf16: bool):
    """(module, step) for one way and phase; ``step()`` runs one training step or forward."""
    import contextlib

    import torch

    from tl_torch.module import TransferModule
    from tl_torch.weights import build_base

    base = build_base(C.WEIGHTS, C.IMAGE_SIZE, generator=torch.Generator().manual_seed(C.SEED))
    module = TransferModule(base, learning_rate=C.LEARNING_RATE,
                            fine_tune_learning_rate=C.LEARNING_RATE / 10,
                            fine_tune_at=C.FINE_TUNE_AT, seed=C.SEED)
    if way != "port":
        module.fast = False
        module.base.to(memory_format=torch.channels_last)
        module.compile(mode=None if way == "compile" else "max-autotune-no-cudagraphs")
    module.set_phase("fine_tuning" if phase == "train_b" else "feature_extraction")

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    if phase in ("infer", "base_forward"):
        module.eval()
        if phase == "base_forward":
            net = module.folded_base if way == "port" else module.base
            if way != "port":
                net = torch.compile(net, mode=None if way == "compile" else
                                    "max-autotune-no-cudagraphs")

            def step(x: torch.Tensor, _labels: torch.Tensor) -> None:
                with torch.inference_mode(), autocast():
                    net(module.base.preprocess(x).contiguous(memory_format=torch.channels_last))
        else:
            def step(x: torch.Tensor, _labels: torch.Tensor) -> None:
                with torch.inference_mode(), autocast():
                    module(x)
        return module, step
    module.train()
    module.on_train_epoch_start()
    optimizer = module.configure_optimizers()

    def step(x: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast():
            loss = module.shared_step((x, labels), module.train_loss, module.train_acc,
                                      augment=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return module, step


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(ways: list[str], bf16_too: bool, repeats: int, batch: int) -> dict:
    import torch

    torch.manual_seed(C.SEED)
    x = torch.rand(batch, 3, C.IMAGE_SIZE, C.IMAGE_SIZE) * 255
    labels = torch.randint(0, 2, (batch,))
    results: dict = {}
    variants = [(way, bf16) for way in ways for bf16 in ((False, True) if bf16_too else (False,))]
    for section in SECTIONS:
        steps, first = {}, {}
        for way, bf16 in variants:
            name = f"{way}{'-bf16' if bf16 else ''}"
            try:
                _, step = build(way, section, bf16)
                first[name] = timed(lambda s=step: s(x, labels))
                timed(lambda s=step: s(x, labels))
                steps[name] = step
            except Exception as error:  # noqa: BLE001 - a way that cannot run is a result
                results.setdefault(section, {})[name] = {"error": f"{type(error).__name__}: "
                                                                  f"{str(error).splitlines()[0]}"}
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                samples[name].append(batch / timed(lambda s=step: s(x, labels)))
        for name, values in samples.items():
            results.setdefault(section, {})[name] = {
                "images_per_s": statistics.median(values), "samples": values,
                "first_call_s": first[name]}
        print(f"{section}: " + ", ".join(f"{n} {v.get('images_per_s', 0):.0f}/s"
                                        for n, v in results[section].items()), flush=True)
    return results


def shape_probes(ways: list[str]) -> dict:
    """Which input sizes (batch 1) each way runs in inference, and the first call's seconds."""
    import torch

    probes: dict = {}
    for way in ways:
        for size in SHAPE_PROBES:
            x = torch.rand(1, 3, size, size) * 255
            try:
                _, step = build(way, "infer", False)
                probes.setdefault(way, {})[size] = {"first_call_s": timed(lambda s=step, x=x: s(x, None))}
            except Exception as error:  # noqa: BLE001
                probes.setdefault(way, {})[size] = {"error": f"{type(error).__name__}: "
                                                             f"{str(error).splitlines()[0]}"}
    return probes


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# torch.compile against the port's path", "",
             f"Machine: {m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}; "
             f"{', '.join(m['simd'])}), {m['usable_cpus']} usable CPUs, load average at start "
             f"{m['load_average_at_start']}", "",
             f"torch {doc['torch']}; batch {doc['batch']}; {doc['repeats']} alternating "
             "repetitions; images/s (median), ratio to `port`, first call in seconds.", "",
             "| section | way | images/s | vs port | first call (s) |", "|---|---|---|---|---|"]
    for section, ways in doc["results"].items():
        port = ways.get("port", {}).get("images_per_s")
        for name, r in ways.items():
            if "error" in r:
                lines.append(f"| {section} | {name} | fails: {r['error']} | | |")
                continue
            ratio = f"{r['images_per_s'] / port:.2f}x" if port else ""
            lines.append(f"| {section} | {name} | {r['images_per_s']:.1f} | {ratio} | "
                         f"{r['first_call_s']:.1f} |")
    lines += ["", "Inference at other sizes (batch 1): first call (s), or the failure.", "",
              "| way | " + " | ".join(f"{s} px" for s in SHAPE_PROBES) + " |",
              "|---|" + "---|" * len(SHAPE_PROBES)]
    for way, sizes in doc["shapes"].items():
        cells = [f"{v['first_call_s']:.1f}" if "first_call_s" in v else f"fails ({v['error']})"
                 for v in sizes.values()]
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    lines += ["", f"Peak memory of the process: {doc['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 repetitions, no max-autotune")
    p.add_argument("--bf16", action="store_true", help="each way also under bf16 autocast")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/compile"))
    args = p.parse_args(argv)
    import torch

    from tl_torch.runtime import keep_freed_memory

    keep_freed_memory()   # as the trainer runs
    ways = list(WAYS[:2] if args.quick else WAYS)
    repeats = args.repeats or (3 if args.quick else 7)
    args.output.mkdir(parents=True, exist_ok=True)
    doc = {"machine": describe(), "torch": torch.__version__, "batch": C.BATCH_SIZE,
           "repeats": repeats, "inductor_freezing": os.environ["TORCHINDUCTOR_FREEZING"],
           "results": measure(ways, args.bf16, repeats, C.BATCH_SIZE), "shapes": {}}
    for stage in ("throughputs", "shapes"):
        if stage == "shapes":   # compiled again per size: written after the throughputs
            doc["shapes"] = shape_probes(ways)
        doc["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (args.output / "compile_compare.json").write_text(json.dumps(doc, indent=1))
        (args.output / "compile_compare.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
