"""The Keras reference's measurements, served to :mod:`benchmarks.runner` (see :mod:`benchmarks.worker`).

Everything goes through tl_keras' own code: ``build_base``/``build_model`` (augmentation inside the
model), ``set_phase`` and ``compile_for`` (Adam, then RMSprop), ``make_dataset`` (tf.data).

Training is timed with ``model.train_on_batch`` on a batch already held by TensorFlow: one call
runs the compiled train function ``fit`` runs for each step (augmentation, forward, loss, backward,
optimizer, metrics), without fit's epoch and callback bookkeeping, as the port's timing leaves
Lightning's out (measured here: ``fit`` over the same batch in memory takes the same time per
step). The first call traces the graph (kept apart, as ``first_call_s``). Each phase has a model of
its own (same seed, same weights), so that switching phases needs no new trace. Inference is
``predict_on_batch`` (the compiled predict function, augmentation off).
With ``jit_compile`` (configuration ``keras-xla``) the augmentation layers run outside the
compiled step and the model is built without them, as Keras refuses XLA for the recipe's model;
under ``KERAS_BACKEND=torch`` (``keras-torch-backend``) the same code runs on Keras' torch backend,
eagerly, with the batch held as a torch tensor.
Run: ``python -m benchmarks.keras_worker SPEC.json RESULT_FD``.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

import numpy as np

from benchmarks import config as C
from benchmarks.memory import keep_freed_memory_glibc
from benchmarks.worker import Bench, load_batch, read_spec, serve
from tl_common import recipe


def main(argv: list[str] | None = None) -> None:
    t_start = time.perf_counter()
    spec, result_fd = read_spec(argv)
    cfg, sizes = spec["config"], C.Sizes(**spec["sizes"])
    # Before TensorFlow is loaded, so that every allocation it makes is under the setting.
    kept = keep_freed_memory_glibc() if cfg["keep_freed_memory"] else False

    # tl_keras first: it sets TensorFlow's log level and oneDNN default and loads Triton before
    # TensorFlow (tl_common/compat.py).
    importlib.import_module("tl_keras")
    import keras

    from tl_keras.bases import preprocess_input
    from tl_keras.model import build_base, build_model, compile_for, data_augmentation, set_phase

    if keras.backend.backend() == "torch":
        import torch

        tf = None
        gpus = [torch.cuda.get_device_name()] if torch.cuda.is_available() else []
        info = {"device": gpus[0] if gpus else "cpu",
                "threads": {"intra_op": torch.get_num_threads(), "KERAS_BACKEND": "torch"},
                "versions": {"torch": torch.__version__, "keras": keras.__version__}}
    else:
        import tensorflow as tf

        if cfg.get("tf32") is not None:   # before any model is built
            tf.config.experimental.enable_tensor_float_32_execution(cfg["tf32"])
        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        info = {"device": gpus[0] if gpus else "cpu",
                "threads": {
                    "intra_op": tf.config.threading.get_intra_op_parallelism_threads()
                    or "0 (all cores)",
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads()
                    or "0 (all cores)",
                    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")},
                "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
                # as read back; the setting acts on NVIDIA GPUs only
                "tf32": (tf.config.experimental.tensor_float_32_execution_enabled()
                         if gpus else None)}
    info["keep_freed_memory"] = kept
    jit = bool(cfg.get("jit_compile"))
    info["jit_compile"] = jit
    if cfg["bf16"]:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")

    images_np, labels_np = load_batch(spec["batch_file"])
    # Held by the backend, as a dataset's batch would be: (N, H, W, 3) in [0, 255]; int labels as
    # make_dataset's label_mode="int".
    images = keras.ops.convert_to_tensor(images_np)
    labels = keras.ops.convert_to_tensor(labels_np.astype("int32"))
    n = int(images.shape[0])
    last: list[Any] = [None]

    def sync() -> None:  # eager CPU ops are synchronous; on a GPU, read one value back
        if last[0] is not None and gpus:
            keras.ops.convert_to_numpy(last[0][(0,) * len(last[0].shape)])

    def bench(fn, items: float = n, **kw) -> Bench:
        args = {"calls": sizes.calls, "warmup": sizes.warmup, "sync": sync, **kw}
        return Bench(fn, items, **args)

    base_name = cfg.get("base", C.DEFAULT_BASE)
    info["base"] = base_name

    def new_model() -> tuple[keras.Model, keras.Model]:
        keras.utils.set_random_seed(C.SEED)
        base = build_base(C.WEIGHTS, C.IMAGE_SIZE, base=base_name)
        # XLA: the model without its augmentation layers, which Keras cannot compile with XLA.
        model = build_model(base, seed=C.SEED, augment=not jit)
        model.jit_compile = jit
        return base, model

    augmentation = data_augmentation(C.SEED)
    augment_fn = (tf.function(lambda t: augmentation(t, training=True)) if tf is not None
                  else (lambda t: augmentation(t, training=True)))

    def train(phase: str, learning_rate: float) -> Bench:
        base, model = new_model()
        set_phase(base, phase, C.fine_tune_at(base_name))
        compile_for(model, phase, learning_rate)
        model.jit_compile = jit   # compile() resets it
        # train_on_batch returns the logs as numpy values: each call ends synchronised.
        if jit:
            def step() -> None:
                model.train_on_batch(augment_fn(images), labels)
        else:
            def step() -> None:
                model.train_on_batch(images, labels)
        return bench(step, info={"jit_compile": bool(model.jit_compile),
                                 "trainable_params": sum(int(np.prod(w.shape))
                                                         for w in model.trainable_weights)})

    models: dict[str, Any] = {}

    def inference_model() -> tuple[keras.Model, keras.Model]:
        if "inference" not in models:
            models["inference"] = new_model()
        return models["inference"]

    def infer() -> Bench:
        _, model = inference_model()
        return bench(lambda: model.predict_on_batch(images),
                     info={"jit_compile": bool(model.jit_compile)})

    def base_forward() -> Bench:
        base, _ = inference_model()
        x = preprocess_input(base, images)   # the base's own (tl_keras.bases)
        if tf is not None:
            forward = tf.function(lambda t: base(t, training=False), jit_compile=jit)
        else:
            import torch

            def forward(t):
                with torch.no_grad():
                    return base(t, training=False)

        def call() -> None:
            last[0] = forward(x)

        return bench(call)

    def augment() -> Bench:
        def call() -> None:
            last[0] = augment_fn(images)

        return bench(call)

    def matmul() -> Bench:
        size = sizes.matmul_n
        g = tf.random.Generator.from_seed(C.SEED)  # TensorFlow's backend only
        a, b = g.normal((size, size)), g.normal((size, size))

        def call() -> None:
            last[0] = tf.linalg.matmul(a, b)

        return Bench(call, 2 * size**3 / 1e9, calls=1, warmup=1, unit="GFLOP/s", sync=sync,
                     info={"n": size})

    def pipeline() -> dict[str, Bench]:
        from tl_common.files import load_splits
        from tl_keras.data import make_dataset

        files = load_splits(spec["data_root"], 0.2, C.SEED).train
        dataset = make_dataset(files, C.IMAGE_SIZE, C.BATCH_SIZE, shuffle=True, seed=C.SEED)

        def epoch(with_augmentation: bool) -> None:
            for batch, _labels in dataset:  # reshuffled on every pass, as in training
                last[0] = augment_fn(batch) if with_augmentation else batch
            sync()

        # A repetition is one epoch; the warm-up epoch traces the pipeline, fills the page cache.
        return {"pipeline_decode": Bench(lambda: epoch(False), len(files), sync=sync),
                "pipeline_decode_augment": Bench(lambda: epoch(True), len(files), sync=sync)}

    makers = {
        C.TRAIN_A: lambda: train("feature_extraction", C.LEARNING_RATE),
        C.TRAIN_B: lambda: train("fine_tuning", recipe.fine_tune_learning_rate(C.LEARNING_RATE)),
        C.INFER: infer,
        C.BASE_FORWARD: base_forward,
        C.AUGMENT: augment,
        C.MATMUL: matmul,
    }
    benches: dict[str, Bench] = {}
    for name in cfg["sections"]:
        if name == C.PIPELINE:
            benches.update(pipeline())
        else:
            benches[name] = makers[name]()
    serve(benches, info, result_fd, budget_s=sizes.budget_s, t_start=t_start)


if __name__ == "__main__":
    main()
