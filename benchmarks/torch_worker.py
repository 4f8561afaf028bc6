"""The PyTorch port's measurements, served to :mod:`benchmarks.runner` (see :mod:`benchmarks.worker`).

Everything goes through the port's own code paths:
- training: ``TransferModule.shared_step`` (augmentation, preprocessing, base with the folded frozen part,
  head, loss, metrics) + backward + the optimizer ``configure_optimizers`` returns (KerasAdam in
  phase A, KerasRMSprop in phase B), after ``set_phase`` and ``on_train_epoch_start`` (which
  refreshes the folded layers), as the Lightning loop calls them; Lightning's own per-step
  bookkeeping (logging) is left out, as Keras' ``train_on_batch`` leaves out ``fit``'s callbacks;
- inference: ``module(images)`` in eval mode under ``torch.inference_mode`` (as Lightning
  validates), folded as in phase-A validation; also as in phase-B validation (folded below
  ``fine_tune_at``) and unfolded (``TransferModule(fast=False)``);
- base forward: the folded base alone on preprocessed images (with ``--bf16``, under autocast
  too: the gain that bounds the others');
- input: ``ImageFolderDataModule``'s loaders (threads decoding every epoch, and the in-memory
  cache) and ``RandomFlipRotation``.
Each measurement has a module of its own (same seed, same weights), so that none changes another's
phase. Run: ``python -m benchmarks.torch_worker SPEC.json RESULT_FD``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from benchmarks import config as C
from benchmarks.worker import Bench, load_batch, read_spec, serve
from tl_common import recipe


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    spec, result_fd = read_spec(argv)
    cfg, sizes = spec["config"], C.Sizes(**spec["sizes"])
    from tl_torch.runtime import keep_freed_memory

    # First, as tl_torch.train does, before the large tensors are allocated.
    kept = keep_freed_memory() if cfg["keep_freed_memory"] else False

    import torch

    from tl_torch.module import TransferModule
    from tl_torch.weights import build_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("tf32") is not None:   # before any model is built
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    info = {"keep_freed_memory": kept,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": {"intra_op": torch.get_num_threads(),
                        "inter_op": torch.get_num_interop_threads(),
                        "backend": torch.__config__.parallel_info().splitlines()[-1].strip(),
                        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset")},
            "versions": {"torch": torch.__version__},
            # as read back; the setting acts on NVIDIA GPUs only
            "tf32": ({"matmul": torch.backends.cuda.matmul.allow_tf32,
                      "convolutions": torch.backends.cudnn.allow_tf32}
                     if device.type == "cuda" else None)}

    base_name = cfg.get("base", C.DEFAULT_BASE)
    info["base"] = base_name

    def new_module() -> TransferModule:
        base = build_base(C.WEIGHTS, C.IMAGE_SIZE, generator=torch.Generator().manual_seed(C.SEED),
                          base=base_name)
        return TransferModule(base, learning_rate=C.LEARNING_RATE,
                              fine_tune_learning_rate=recipe.fine_tune_learning_rate(C.LEARNING_RATE),
                              fine_tune_at=C.fine_tune_at(base_name), seed=C.SEED).to(device)

    images_np, labels_np = load_batch(spec["batch_file"])
    # NCHW and contiguous, as the DataLoader collates the data module's (3, H, W) images.
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(labels_np).long().to(device)
    n = images.shape[0]
    bf16 = cfg["bf16"]

    def autocast():
        return (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())

    def bench(fn, items: float = n, **kw) -> Bench:
        args = {"calls": sizes.calls, "warmup": sizes.warmup, "sync": sync, **kw}
        return Bench(fn, items, **args)

    # ---- training steps ------------------------------------------------------------------------
    def train_step(phase: str):
        module = new_module()
        module.train()
        module.set_phase(phase)
        module.on_train_epoch_start()  # seeds this epoch's draws
        optimizer = module.configure_optimizers()
        batch = (images, labels)

        def step() -> None:
            if hasattr(module, "on_train_batch_start"):  # seeds the step's dropout draws
                module.on_train_batch_start(batch, 0)
            with autocast():
                loss = module.shared_step(batch, module.train_loss, module.train_acc, augment=True)
            optimizer.zero_grad(set_to_none=True)  # Lightning's default
            loss.backward()
            optimizer.step()

        return step, module

    def frozen_graphs(module: TransferModule) -> dict[str, Any]:
        """After the warm-up: the frozen blocks' graphs the folded base keeps, and the input
        shapes that run through the units instead (with why); nothing for a base without them."""
        folded = module.folded_base
        if folded is None or not hasattr(folded, "cache_info") or not module.fast:
            return {}
        kept = folded.cache_info()
        return {"graphs": [f"{g.stages} stages, {g.input_shape}, {dtype_name(g.dtype)}"
                           for g in kept.graphs],
                "graph_fallbacks": [f"{stages} stages, {shape}, {dtype_name(dtype)}: {why}"
                                    for (stages, shape, dtype), why in kept.fallbacks.items()]}

    # ---- inference -----------------------------------------------------------------------------
    def inference(phase: str, fold: bool) -> Bench:
        module = new_module().eval()
        module.set_phase(phase)
        module.fast = fold  # the folded base (tl_torch.fast.fold), or the base's own modules

        def forward() -> None:
            with torch.inference_mode(), autocast():
                module(images)

        return bench(forward, after_warm=lambda: frozen_graphs(module))

    def base_forward() -> Bench:
        module = new_module().eval()
        module.set_phase("feature_extraction")
        with torch.inference_mode():
            x = module.base.preprocess(images).contiguous(memory_format=torch.channels_last)

        backbone = module.folded_base if module.folded_base is not None else module.base

        def forward() -> None:
            with torch.inference_mode(), autocast():
                backbone(x)

        return bench(forward, after_warm=lambda: frozen_graphs(module))

    def augment() -> Bench:
        module = new_module().train()
        generator = torch.Generator().manual_seed(C.SEED)
        return bench(lambda: module.augment(images, generator=generator))

    def matmul() -> Bench:
        size = sizes.matmul_n
        g = torch.Generator().manual_seed(C.SEED)
        a = torch.randn(size, size, generator=g).to(device)
        b = torch.randn(size, size, generator=g).to(device)
        return Bench(lambda: torch.matmul(a, b), 2 * size**3 / 1e9, calls=1, warmup=1,
                     unit="GFLOP/s", sync=sync, info={"n": size})

    benches: dict[str, Bench] = {}
    steps: dict[str, Any] = {}
    for name in cfg["sections"]:
        if name in (C.TRAIN_A, C.TRAIN_B):
            steps[name] = train_step("feature_extraction" if name == C.TRAIN_A else "fine_tuning")
            benches[name] = bench(steps[name][0],
                                  after_warm=lambda m=steps[name][1]: frozen_graphs(m))
        elif name == C.INFER:
            benches[name] = inference("feature_extraction", fold=True)
        elif name == C.INFER_B:
            benches[name] = inference("fine_tuning", fold=True)
        elif name == C.INFER_UNFOLDED:
            benches[name] = inference("feature_extraction", fold=False)
        elif name == C.BASE_FORWARD:
            benches[name] = base_forward()
        elif name == C.AUGMENT:
            benches[name] = augment()
        elif name == C.MATMUL:
            benches[name] = matmul()
        elif name == C.PIPELINE:
            benches.update(pipeline(spec, new_module().train(), device, sync))

    extra = {}
    if spec.get("profile_dir") and not bf16:
        extra["profile"] = lambda: profile(Path(spec["profile_dir"]),
                                           {k: step for k, (step, _) in steps.items()})
    serve(benches, info, result_fd, budget_s=sizes.budget_s, extra=extra, t_start=t_start)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pipeline(spec: dict[str, Any], module, device, sync) -> dict[str, Bench]:
    """Decode + resize (+ augment) of the demo's training JPEGs: the decoding threads, and the cache.

    A repetition is one epoch over the training files; the warm-up epoch fills the page cache."""
    import torch

    from tl_common.settings import Settings
    from tl_torch.data import ImageCache, ImageFolderDataModule, available_cores

    settings = Settings(data_dir=spec["data_root"], batch_size=C.BATCH_SIZE,
                        image_size=C.IMAGE_SIZE, seed=C.SEED)
    generator = torch.Generator().manual_seed(C.SEED)
    state = {"epoch": 0}

    def run_epoch(loader, augment: bool) -> None:
        loader.sampler.set_epoch(state["epoch"])  # as Lightning does: a fresh order per epoch
        state["epoch"] += 1
        for images, _labels in loader:
            images = images.to(device, non_blocking=True)
            if augment:
                module.augment(images, generator=generator)
        sync()

    data = ImageFolderDataModule(settings, cache=False)
    data.setup()
    files = data.splits.train
    loader = data.train_dataloader()
    cached = ImageFolderDataModule(settings, cache=True)
    cached.setup()
    cached.dataset("train")  # built once, as in training
    cached_loader = cached.train_dataloader()
    n = len(files)
    return {
        "pipeline_decode": Bench(lambda: run_epoch(loader, False), n,
                                 info={"threads": loader.threads}),
        "pipeline_decode_augment": Bench(lambda: run_epoch(loader, True), n,
                                         info={"threads": loader.threads}),
        "pipeline_cache_build": Bench(lambda: ImageCache(files, C.IMAGE_SIZE, desc="cache"), n,
                                      info={"threads": available_cores()}),
        "pipeline_cached_augment": Bench(lambda: run_epoch(cached_loader, True), n),
    }


def profile(folder: Path, steps: dict[str, Any]) -> dict[str, Any]:
    """torch.profiler's operators by self CPU time over a few steps of each training phase."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    folder.mkdir(parents=True, exist_ok=True)
    steps_profiled = 3
    summary: dict[str, Any] = {}
    for name, step in steps.items():
        step()  # warm
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps_profiled):
                step()
            wall = time.perf_counter() - t0
        averages = prof.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=30)
        (folder / f"torch_profile_{name}.txt").write_text(
            f"{steps_profiled} steps, {wall / steps_profiled * 1e3:.0f} ms/step under the profiler\n"
            + table)
        total = sum(e.self_cpu_time_total for e in averages) or 1.0
        top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        summary[name] = {
            "ms_per_step": wall / steps_profiled * 1e3,
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps_profiled,
                         "share": e.self_cpu_time_total / total,
                         "calls_per_step": e.count / steps_profiled} for e in top],
        }
    return summary


if __name__ == "__main__":
    main()
