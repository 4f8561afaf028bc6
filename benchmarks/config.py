"""What is measured, how often, and in which process configurations: the settings in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from tl_common import recipe
from tl_common.bases import BASES, DEFAULT_BASE

BATCH_SIZE = 32           # the recipe's
IMAGE_SIZE = 160          # the recipe's
FINE_TUNE_AT = recipe.FINE_TUNE_AT    # the recipe's phase-B freezing point (Keras layer index)
LEARNING_RATE = recipe.LEARNING_RATE  # phase A (Adam); phase B: recipe.fine_tune_learning_rate
SEED = 42
WEIGHTS = "none"          # random weights: throughput does not depend on their values
#: Every base ``--base`` takes, the recipe's first: ``python -m benchmarks --bases`` chooses.
ALL_BASES = (DEFAULT_BASE, *(name for name in BASES if name != DEFAULT_BASE))


def fine_tune_at(base: str) -> int:
    """The phase-B freezing point of ``base``: its default (:mod:`tl_common.bases`), for the
    weights measured here (for MobileNetV2 the recipe's 100)."""
    return BASES[base].default_fine_tune_at(WEIGHTS)


@dataclass(frozen=True)
class Sizes:
    """How much each measurement runs. Defaults fit the full run in ~10 minutes on 2 CPU cores."""

    repeats: int = 9          # timed repetitions per measurement (median and spread over these)
    warmup: int = 3           # untimed calls first (the first traces Keras' graphs; the
                              # port's heap settles over its first steps)
    calls: int = 2            # batches timed together in one repetition (an epoch of the input
                              # pipeline, or one matmul, is a repetition alone)
    matmul_n: int = 4096      # the fp32 peak: an n x n by n x n matmul
    budget_s: float = 25.0    # per measurement and worker: past it, stop after MIN_REPEATS

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


#: Repetitions a measurement always gets, even past its time budget (a median needs a few).
MIN_REPEATS = 3

FULL = Sizes()
QUICK = Sizes(repeats=3, warmup=1, calls=1, matmul_n=2048, budget_s=8.0)

#: Sections, by name. Each worker measures those of its configuration, in this order.
TRAIN_A, TRAIN_B = "train_a", "train_b"
INFER, INFER_B, INFER_UNFOLDED = "infer", "infer_fine_tuning", "infer_unfolded"
BASE_FORWARD, AUGMENT, PIPELINE, MATMUL = "base_forward", "augment", "pipeline", "matmul"
CORE = (TRAIN_A, TRAIN_B, INFER, BASE_FORWARD)


@dataclass(frozen=True)
class Config:
    """One fresh worker process: a framework and the settings it runs under."""

    name: str
    framework: str                       # "torch" or "keras"
    label: str                           # what it is, for the report
    sections: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    keep_freed_memory: bool = False      # glibc mallopt before anything else (tl_torch.runtime)
    bf16: bool = False                   # changes the numbers: reported apart
    jit_compile: bool = False            # Keras: XLA (see KERAS_XLA)
    tf32: bool | None = None             # NVIDIA GPUs: TF32 for float32 matrix products and
                                         # convolutions, on or off; None: the framework's default
                                         # (torch: convolutions only; TensorFlow: both)
    primary: bool = False                # the configuration the trainer itself runs
    base: str = DEFAULT_BASE             # the base (``--base``) both frameworks build

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


TORCH = Config("torch", "torch", "port as its trainer runs it (keep_freed_memory on)",
               (TRAIN_A, TRAIN_B, INFER, INFER_B, INFER_UNFOLDED, BASE_FORWARD, AUGMENT, PIPELINE,
                MATMUL), keep_freed_memory=True, primary=True)
#: A measured suggestion, not what the trainer runs: OpenMP threads that sleep at once when idle
#: instead of spinning, which keeps the port fast when other processes want the same cores.
TORCH_OMP_PASSIVE = replace(TORCH, name="torch-omp-passive",
                            label="port with OMP_WAIT_POLICY=PASSIVE (a suggestion)",
                            sections=CORE, env={"OMP_WAIT_POLICY": "PASSIVE"}, primary=False)
TORCH_NO_KEEP = Config("torch-no-keep", "torch", "port without keep_freed_memory", CORE)
KERAS_ONEDNN = Config("keras-onednn", "keras", "Keras as tl_keras runs it (TF_ENABLE_ONEDNN_OPTS=1)",
                      (TRAIN_A, TRAIN_B, INFER, BASE_FORWARD, AUGMENT, PIPELINE, MATMUL),
                      env={"TF_ENABLE_ONEDNN_OPTS": "1"}, primary=True)
KERAS_EIGEN = Config("keras-no-onednn", "keras", "TensorFlow's default here (TF_ENABLE_ONEDNN_OPTS=0)",
                     CORE, env={"TF_ENABLE_ONEDNN_OPTS": "0"})
KERAS_ONEDNN_KEEP = Config("keras-onednn-keep", "keras", "TF_ENABLE_ONEDNN_OPTS=1 + glibc mallopt",
                           CORE, env={"TF_ENABLE_ONEDNN_OPTS": "1"}, keep_freed_memory=True)
KERAS_EIGEN_KEEP = Config("keras-no-onednn-keep", "keras", "TF_ENABLE_ONEDNN_OPTS=0 + glibc mallopt",
                          CORE, env={"TF_ENABLE_ONEDNN_OPTS": "0"}, keep_freed_memory=True)
#: Keras at its XLA best. Keras refuses ``jit_compile=True`` for the recipe's model (RandomRotation
#: says ``supports_jit = False``; Keras warns and runs without XLA), so this configuration runs
#: what a Keras user would do for XLA: the same augmentation layers outside the compiled graph
#: (as a tf.data map would), then the model without them, compiled with ``jit_compile=True``;
#: inference and the base forward through XLA alike.
KERAS_XLA = Config("keras-xla", "keras", "Keras with XLA (jit_compile=True; augmentation outside "
                   "the compiled step)", (TRAIN_A, TRAIN_B, INFER, BASE_FORWARD),
                   env={"TF_ENABLE_ONEDNN_OPTS": "1"}, jit_compile=True)
#: The alternative a user might pick instead of a port: the reference's own code on Keras 3's
#: torch backend (eager PyTorch underneath). Compared in rows of its own, not a Keras baseline.
KERAS_TORCH_BACKEND = Config("keras-torch-backend", "keras",
                             "the reference on Keras 3's torch backend (KERAS_BACKEND=torch)",
                             (TRAIN_A, TRAIN_B, INFER, BASE_FORWARD),
                             env={"KERAS_BACKEND": "torch"}, keep_freed_memory=True)
#: GPUs (``--tf32``): float32 with TF32 off in both frameworks (float32 throughout), then on
#: (numbers change; reported apart, never a baseline). The primaries keep each framework's default.
TORCH_TF32_OFF = replace(TORCH, name="torch-tf32-off", label="port, TF32 off (float32 throughout)",
                         sections=CORE, tf32=False, primary=False)
TORCH_TF32_ON = replace(TORCH_TF32_OFF, name="torch-tf32-on",
                        label="port, TF32 on (matrix products and convolutions; changes the numbers)",
                        tf32=True)
KERAS_TF32_OFF = replace(KERAS_ONEDNN, name="keras-tf32-off",
                         label="Keras, TF32 off (float32 throughout)", sections=CORE, tf32=False,
                         primary=False)
KERAS_TF32_ON = replace(KERAS_TF32_OFF, name="keras-tf32-on",
                        label="Keras, TF32 on (changes the numbers)", tf32=True)
TORCH_BF16 = replace(TORCH, name="torch-bf16", label="port, bf16 autocast (changes the numbers)",
                     sections=(TRAIN_A, TRAIN_B, INFER, BASE_FORWARD), bf16=True, primary=False)
KERAS_BF16 = replace(KERAS_ONEDNN, name="keras-bf16",
                     label="Keras, mixed_bfloat16 policy (changes the numbers)",
                     sections=(TRAIN_A, TRAIN_B, INFER), bf16=True, primary=False)


def plan(*, quick: bool, bf16: bool, all_keras: bool = False,
         tf32: bool = False) -> list[Config]:
    """The worker processes of one round, frameworks alternating; quick runs the two primaries
    and Keras with XLA (a candidate for the best Keras).

    glibc's setting is tried for Keras with oneDNN on, its faster configuration here (2x); with
    ``all_keras`` also with oneDNN off. ``tf32`` (GPUs) adds both frameworks with TF32 off and on.
    """
    if quick:
        configs = [TORCH, KERAS_ONEDNN, KERAS_XLA]
    else:
        configs = [TORCH, KERAS_ONEDNN, TORCH_NO_KEEP, KERAS_EIGEN, TORCH_OMP_PASSIVE,
                   KERAS_ONEDNN_KEEP, KERAS_XLA, KERAS_TORCH_BACKEND]
        if all_keras:
            configs.append(KERAS_EIGEN_KEEP)
    if tf32:
        configs += [TORCH_TF32_OFF, KERAS_TF32_OFF, TORCH_TF32_ON, KERAS_TF32_ON]
    if bf16:
        configs += [TORCH_BF16, KERAS_BF16]
    return configs


#: What a base other than the recipe's is measured on: (a), (b), (c) only.
BASE_SECTIONS = (TRAIN_A, TRAIN_B, INFER)


def base_plan(base: str, *, quick: bool, all_keras: bool = False) -> list[Config]:
    """The worker processes of a base other than the recipe's, measured in a round of its own
    (its own workers, alive together, their repetitions in turn), (a), (b), (c) only.

    Kept cheap, primary configurations and the Keras ones that can be the best: the port as its
    trainer runs it; Keras as tl_keras runs it (oneDNN on); TensorFlow's default here (oneDNN
    off), the best Keras in some rows (benchmarks/RESULTS.md); the full run adds oneDNN on with
    glibc's setting, the best Keras in others. XLA (slower than oneDNN on every base measured
    here, and slow to compile), the torch backend and bf16 are left to the recipe's base;
    ``all_keras`` adds every float32 Keras configuration, XLA included.
    """
    if base not in BASES:
        raise ValueError(f"base={base!r}; expected one of {', '.join(BASES)}")
    keras = [KERAS_ONEDNN, KERAS_EIGEN] + ([] if quick else [KERAS_ONEDNN_KEEP])
    if all_keras:
        keras = [KERAS_ONEDNN, KERAS_EIGEN, KERAS_ONEDNN_KEEP, KERAS_EIGEN_KEEP, KERAS_XLA]
    return [replace(cfg, sections=BASE_SECTIONS, base=base) for cfg in [TORCH, *keras]]


def base_sizes(sizes: Sizes) -> Sizes:
    """A base other than the recipe's: fewer repetitions, one batch each, a shorter budget (its
    steps are up to 5x MobileNetV2's), so that three more bases add minutes to a full run."""
    return replace(sizes, repeats=min(sizes.repeats, 5), warmup=min(sizes.warmup, 2), calls=1,
                   budget_s=min(sizes.budget_s, 12.0))
