"""The experiment settings: one definition, the recipe's defaults, and both trainers' CLIs.

``python -m tl_keras.train`` and ``python -m tl_torch.train`` are generated from :class:`Settings`
with jsonargparse, so the two share every flag, ``--config exp.yaml`` drives either one
identically, and ``--print_config`` shows the resolved settings. Values are checked here, before
any work starts, and a bad one ends the run with one line naming the flag and what is accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from tl_common import recipe
from tl_common.bases import BASES, DEFAULT_BASE, MIN_IMAGE_SIZE, MOBILENET_V2_ONLY_SOURCES
from tl_common.demo import DEMO_SETS
from tl_common.errors import UserError
from tl_common.weights import TORCH_WEIGHT_SOURCES, WEIGHT_SOURCES, expand_weights


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run; the defaults are the recipe's."""

    data_dir: str | None = field(default=None, metadata=_help(
        "folder with train/ and validation/ class folders (default: cats_and_dogs_filtered "
        "in ~/.keras/datasets, downloaded when absent)"))
    demo: bool = field(default=False, metadata=_help(
        "use the offline demo: a generated two-class JPEG set and the demo weights"))
    demo_set: str = field(default="easy", metadata=_help(
        "which generated set --demo uses: easy (validation accuracy passes 0.9 after a few to all "
        "ten feature-extraction epochs, depending on --seed, and is 1.0 from the first "
        "fine-tuning epoch) or hard (the classes' "
        "cues mixed and partly hidden: about 0.75-0.9 validation accuracy after feature "
        "extraction, higher after fine-tuning)"))
    base: str = field(default=DEFAULT_BASE, metadata=_help(
        f"the pretrained network under the head, as keras.applications builds it with "
        f"include_top=False: {', '.join(BASES)}"))
    weights: str | None = field(default=None, metadata=_help(
        "imagenet, demo, none, torchvision (the PyTorch port only), or a Keras "
        ".h5/.keras/.weights.h5 file (default: demo with --demo, else imagenet)"))
    init_from: str | None = field(default=None, metadata=_help(
        "start from a trained model instead of --weights (the PyTorch port only): the model.ckpt "
        "of python -m tl_torch.convert from-keras or of a tl_torch.train run (its file, or its "
        "folder); with --initial-epochs 0 the run fine-tunes it at once"))
    image_size: int = field(default=160, metadata=_help(
        f"square input size in pixels (>= {MIN_IMAGE_SIZE})"))
    batch_size: int = field(default=32, metadata=_help("images per batch"))
    initial_epochs: int = field(default=10, metadata=_help(
        "epochs of feature extraction (base frozen)"))
    fine_tune_epochs: int = field(default=10, metadata=_help(
        "epochs of fine-tuning, numbered on from feature extraction"))
    fine_tune_at: int | None = field(default=None, metadata=_help(
        f"Keras layer index from which the base is unfrozen for fine-tuning (0..the base's "
        f"layer count; default: the base's own point, {recipe.FINE_TUNE_AT} for {DEFAULT_BASE}, "
        f"see docs/bases.md)"))
    learning_rate: float = field(default=recipe.LEARNING_RATE, metadata=_help(
        "Adam learning rate, feature extraction"))
    fine_tune_learning_rate: float | None = field(default=None, metadata=_help(
        "RMSprop learning rate, fine-tuning (default: a tenth of --learning-rate)"))
    dropout: float = field(default=recipe.DROPOUT, metadata=_help("dropout rate before the classifier"))
    test_fraction: float = field(default=0.2, metadata=_help(
        "share of the validation files set aside as the test split, per class"))
    seed: int = field(default=42, metadata=_help(
        "seed for the test split, shuffling, augmentation, dropout and the head's init"))
    num_nodes: int = field(default=1, metadata=_help(
        "machines the run spans, each running --devices processes (the PyTorch port only; "
        "start it on every node with torchrun or SLURM: see the README)"))
    limit_batches: int | None = field(default=None, metadata=_help(
        "at most this many batches per epoch in training, validation and test (quick runs)"))
    skip_bad_images: bool = field(default=False, metadata=_help(
        "drop unreadable image files with a warning instead of stopping"))
    output_dir: str | None = field(default=None, metadata=_help(
        "where the run's outputs go (default: runs/<framework>)"))
    resume: bool = field(default=False, metadata=_help(
        "continue the run in --output-dir from its last finished epoch"))
    overwrite: bool = field(default=False, metadata=_help(
        "replace a finished run already in --output-dir"))
    print_layers: bool = field(default=False, metadata=_help(
        "print the full layer table (index, type, name, trainable) when fine-tuning starts; "
        "it is always written to layer_table.csv"))

    def __post_init__(self) -> None:
        # No --fine-tune-at: the base's own point, where its index is known (an unknown base is
        # refused by validate); the field then holds a number, as metrics.json records it.
        if self.fine_tune_at is None and self.base in BASES:
            object.__setattr__(self, "fine_tune_at",
                               BASES[self.base].default_fine_tune_at(self.weights_source))

    # ---- derived values -------------------------------------------------------------------
    @property
    def weights_source(self) -> str:
        """The weight source after defaults: ``demo`` with ``--demo``, else ``imagenet``."""
        if self.weights is not None:
            return self.weights
        return "demo" if self.demo else "imagenet"

    @property
    def fine_tuning_lr(self) -> float:
        """Fine-tuning learning rate: the recipe uses a tenth of feature extraction's."""
        if self.fine_tune_learning_rate is not None:
            return self.fine_tune_learning_rate
        return recipe.fine_tune_learning_rate(self.learning_rate)

    @property
    def total_epochs(self) -> int:
        return self.initial_epochs + self.fine_tune_epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    """The command-line spelling of a settings field: ``fine_tune_at`` -> ``--fine-tune-at``."""
    return "--" + name.replace("_", "-")


@contextlib.contextmanager
def naming_flag(name: str, value: object) -> Iterator[None]:
    """Make a :class:`UserError` raised inside name the flag it is about: a weights file that does
    not fit says ``--weights='x.h5': ...``, whichever loader found the fault."""
    try:
        yield
    except UserError as err:
        if str(err).startswith(flag(name)):
            raise
        raise UserError(f"{flag(name)}={value!r}: {err}") from None


def validate(settings: Settings, framework: str = "keras") -> Settings:
    """Check every value before any work starts; raise :class:`UserError` on the first bad one."""
    s = settings
    sources = WEIGHT_SOURCES + (TORCH_WEIGHT_SOURCES if framework == "torch" else ())

    def bad(name: str, accepted: str) -> UserError:
        return UserError(f"{flag(name)}={getattr(s, name)!r} is not accepted: {accepted}")

    if s.base not in BASES:
        raise bad("base", f"expected one of {', '.join(BASES)}")
    facts = BASES[s.base]
    for name in ("batch_size", "fine_tune_epochs", "num_nodes"):
        if getattr(s, name) < 1:
            raise bad(name, "expected a positive integer")
    if s.initial_epochs < (0 if s.init_from is not None else 1):
        raise bad("initial_epochs", "expected a positive integer (0 only with --init-from, "
                                    "whose head is trained already)")
    if s.image_size < MIN_IMAGE_SIZE:
        raise bad("image_size", f"{facts.keras_application} needs at least {MIN_IMAGE_SIZE} "
                                "pixels")
    layers = facts.layer_count(s.weights_source)
    if not 0 <= s.fine_tune_at <= layers:
        raise bad("fine_tune_at", f"expected a Keras layer index in 0..{layers}")
    if not s.learning_rate > 0:
        raise bad("learning_rate", "expected a positive number")
    if s.fine_tune_learning_rate is not None and not s.fine_tune_learning_rate > 0:
        raise bad("fine_tune_learning_rate", "expected a positive number")
    if not 0 <= s.dropout < 1:
        raise bad("dropout", "expected a rate in [0, 1)")
    if not 0 < s.test_fraction < 1:
        raise bad("test_fraction", "expected a fraction in (0, 1)")
    if s.limit_batches is not None and s.limit_batches < 1:
        raise bad("limit_batches", "expected a positive integer")
    if s.demo_set not in DEMO_SETS:
        raise bad("demo_set", f"expected one of {', '.join(DEMO_SETS)}")
    if s.demo_set != "easy" and not s.demo:
        raise UserError(f"--demo-set={s.demo_set} needs --demo: it chooses the demo's data")
    if s.demo and s.data_dir is not None:
        raise UserError("--demo and --data-dir exclude each other: the demo brings its own data")
    if s.resume and s.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    _check_port_only(s, framework)
    w = s.weights
    if w in TORCH_WEIGHT_SOURCES and framework != "torch":
        raise bad("weights", f"{w} weights are for the PyTorch port (python -m tl_torch.train); "
                             f"the Keras reference takes {', '.join(WEIGHT_SOURCES)} or a file")
    if w is not None and w not in sources and not _looks_like_path(w):
        raise bad("weights", f"expected one of {', '.join(sources)}, or a Keras weights "
                             "or model file (.h5, .keras)")
    if s.base != DEFAULT_BASE and s.weights_source in MOBILENET_V2_ONLY_SOURCES:
        raise UserError(f"--weights={s.weights_source} is not accepted with --base={s.base}: "
                        f"{s.weights_source} weights exist for {DEFAULT_BASE} only; pass "
                        "--weights imagenet, none or a Keras weights file of the base"
                        + (" (--demo alone means --weights demo)" if s.weights is None else ""))
    return s


def _check_port_only(s: Settings, framework: str) -> None:
    """--num-nodes and --init-from: the Keras reference refuses them rather than ignoring them (a
    multi-node launch would run one whole copy per node, all writing one folder); the port checks
    that --init-from names something."""
    if framework != "torch":
        if s.num_nodes != 1:
            raise UserError(f"--num-nodes={s.num_nodes} is not accepted: the Keras reference trains "
                            "on one machine; use python -m tl_torch.train for several nodes")
        if s.init_from is not None:
            raise UserError(f"--init-from={s.init_from!r} is not accepted: the Keras reference "
                            "starts from --weights; continuing from a model.ckpt is the PyTorch "
                            "port's (python -m tl_torch.train)")
        return
    if s.init_from is None:
        return
    if s.weights is not None:
        raise UserError("--init-from and --weights exclude each other: the model started from "
                        "brings its own weights")
    if s.resume:
        return  # the run's own checkpoint continues it; --init-from is only recorded
    if not Path(s.init_from).exists():
        raise UserError(f"--init-from={s.init_from!r}: no such file or folder; expected the "
                        "model.ckpt of python -m tl_torch.convert from-keras or of a "
                        "tl_torch.train run, or its folder")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".h5", ".keras", ".hdf5")) or Path(value).exists()


def build_parser(framework: str, description: str) -> ArgumentParser:
    """The trainer's parser: every :class:`Settings` field as a ``--dashed-flag``, plus config.

    Framework-specific flags (Lightning's ``--accelerator`` ...) are added by the caller.
    """
    parser = ArgumentParser(
        prog=f"python -m tl_{framework}.train",
        description=description,
        exit_on_error=False,
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file of settings (the keys as in --print_config)")
    types = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        help_text = f.metadata.get("help", "")
        if types[f.name] is bool:
            parser.add_argument(flag(f.name), action=ActionYesNo(no_prefix="no-"),
                                default=f.default, help=help_text)
        else:
            parser.add_argument(flag(f.name), type=types[f.name], default=f.default,
                                help=help_text)
    return parser


def settings_from(namespace: Namespace, framework: str) -> Settings:
    """Pick the :class:`Settings` fields out of a parsed namespace and validate them.

    Paths are taken as a shell would take them: ``~`` expanded in ``--data-dir``,
    ``--output-dir`` and a ``--weights`` file (a ``--weights=~/w.h5`` or a config's
    ``weights: ~/w.h5`` reaches no shell)."""
    values = {f.name: namespace.get(f.name) for f in dataclasses.fields(Settings)}
    if values["output_dir"] is None:
        values["output_dir"] = str(Path("runs") / framework)
    for name in ("data_dir", "output_dir"):
        if values[name] is not None:
            values[name] = os.path.expanduser(values[name])
    values["weights"] = expand_weights(values["weights"])
    if values["init_from"] is not None:
        values["init_from"] = os.path.expanduser(values["init_from"])
    return validate(Settings(**values), framework)


def parse(parser: ArgumentParser, argv: list[str] | None) -> Namespace:
    """Parse, turning jsonargparse's multi-line errors into one :class:`UserError` line."""
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as err:
        message = " ".join(str(err).split())
        message = re.sub(r'Parser key "(\w+)":', lambda m: flag(m.group(1)) + ":", message)
        message = message.replace("a <class 'int'>", "an integer").replace(
            "a <class 'float'>", "a number")
        # An optional number (--fine-tune-at, --limit-batches) lists each Union member's
        # complaint; the one about the number is the one that helps.
        message = re.sub(r"Does not validate against any of the Union subtypes .*?Errors: - "
                         r"(Expected [^-]*?) - Expected a <class 'NoneType'>.*Given value: (.*)$",
                         r"\1. Got value: \2", message)
        raise UserError(message) from None
