"""The recipe's classifier as a LightningModule, and the callback that switches phases.

Model: augmentation (training steps only) -> ``x / 127.5 - 1`` (the base's preprocessing) -> base
(BatchNorm in inference mode, always) -> global average pooling -> Dropout(0.2) -> Linear(1280, 1)
(the base's feature width: 960 for MobileNetV3Large, 2048 for ResNet50), a logit (class 1 is
positive), initialised like Keras' ``Dense``: Glorot-uniform kernel, zero bias. With N > 2
classes the head is Linear(1280, N), trained with cross-entropy, as the Keras reference's
``Dense(N)`` with sparse categorical cross-entropy from logits.

Phases, as in the recipe:
- ``feature_extraction``: base frozen; ``Adam(learning_rate)`` with Keras' update rule;
- ``fine_tuning``: Keras layers from ``fine_tune_at`` on unfrozen; ``RMSprop(learning_rate / 10)``
  with Keras' update rule; a new optimizer, as recompiling in Keras makes one.
:class:`TwoPhaseFineTuning` switches at the epoch boundary; the phase is saved in checkpoints,
so a run resumed in either phase rebuilds the right optimizer before its state is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from tl_common import recipe
from tl_common.head import head_units
from tl_common.outputs import PHASES, format_counts, show_layer_table
from tl_torch.augment import RandomFlipRotation
from tl_torch.backbones import backbone_of
from tl_torch.backbones.folding import fold_pairs
from tl_torch.fast import fold
from tl_torch.freezing import count_params, freeze, layer_table
from tl_torch.model import MobileNetV2Base
from tl_torch.optim import KerasAdam, KerasRMSprop
from tl_torch.weights import config_of, make_base


def keras_dense_init_(linear: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """Keras' ``Dense`` defaults: Glorot-uniform kernel (bound sqrt(6 / (fan_in + fan_out)),
    about 0.0684 for 1280 -> 1), zero bias. torch's default init differs."""
    fan_out, fan_in = linear.weight.shape
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.zero_()
    return linear


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one process: runs resumed at an epoch boundary draw the same."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The seed of torch's global generator (dropout) for one training step on one process."""
    return (epoch_seed(seed, epoch, rank) * 1_000_033 + 2 * batch + 1) % (2**63)


class TransferModule(L.LightningModule):
    """Base + head, trained in two phases; logs Keras' history keys."""

    def __init__(self, base: nn.Module | None = None, *,
                 learning_rate: float = recipe.LEARNING_RATE,
                 fine_tune_learning_rate: float = recipe.FINE_TUNE_LEARNING_RATE,
                 fine_tune_at: int | None = None, dropout: float = recipe.DROPOUT,
                 seed: int = 42, augment: bool = True,
                 fast: bool = True, num_classes: int = 2,
                 class_names: Sequence[str] | None = None, image_size: int | None = None,
                 base_config: dict[str, Any] | None = None, weights: str | None = None) -> None:
        """``base``: a built base (:func:`tl_torch.build_base`); without one, an empty base is
        made from ``base_config`` (:func:`tl_torch.weights.config_of`: MobileNetV2's keyword
        arguments, or another base's name; absent in checkpoints from before they were saved:
        Keras' MobileNetV2, the only one then), for ``load_from_checkpoint`` to fill.
        ``fine_tune_at``: by default the base's own point (``tl_common.bases``).
        ``class_names``, ``image_size`` and ``weights`` (the weight source) are the run's, kept in
        the checkpoint so that it alone serves predictions.
        """
        super().__init__()
        if base is None:
            base = make_base(base_config)
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(class_names) != num_classes:
                raise ValueError(f"class_names={class_names} names {len(class_names)} classes, "
                                 f"num_classes={num_classes}")
        self.save_hyperparameters(ignore=["base"])
        # What rebuilds this base, read from the base itself; plain data, so that checkpoints
        # load with torch.load(weights_only=True).
        self.hparams.base_config = config_of(base)
        backbone = backbone_of(base)
        if fine_tune_at is None:
            self.hparams.fine_tune_at = backbone.default_fine_tune_at(base)
        self.hparams.class_names = class_names
        self.hparams.weights = weights if weights is not None else getattr(base, "weights_source",
                                                                           None)
        self.base = base
        self.augment = RandomFlipRotation(recipe.ROTATION_FACTOR) if augment else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = keras_dense_init_(nn.Linear(backbone.facts.features,
                                                      head_units(num_classes)),
                                            torch.Generator().manual_seed(seed))
        self.binary = num_classes == 2
        self.loss_fn = nn.BCEWithLogitsLoss() if self.binary else nn.CrossEntropyLoss()
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc, self.val_acc, self.test_acc = (self._accuracy() for _ in range(3))
        self.phase = "feature_extraction"
        self.set_phase("feature_extraction")
        # The augmentation's random draws: seeded per epoch (on_train_epoch_start); public, so
        # a comparison can set its own.
        self.augment_generator: torch.Generator | None = None
        # What features() runs: the base folded (tl_torch.fast.fold: the same function, faster;
        # it reads the base's weights and freezing at each call, so it is built once), or the
        # base's own modules with fast=False. An attribute, so a comparison can run both.
        # The other bases fold their gradient-free Conv + BatchNorm pairs at each call instead
        # (tl_torch.backbones.folding; tests/test_backbones_folding.py bounds the difference).
        self.fast = fast
        self.folded_base = (fold(self.base) if isinstance(self.base, MobileNetV2Base)
                            else fold_pairs(self.base))
        if self.fast:  # oneDNN's convolutions are fastest on channels-last tensors
            self.base.to(memory_format=torch.channels_last)

    def _accuracy(self) -> Metric:
        """Keras' BinaryAccuracy(threshold=0) / SparseCategoricalAccuracy: a share of images."""
        return (BinaryAccuracy() if self.binary
                else MulticlassAccuracy(num_classes=self.hparams.num_classes, average="micro"))

    # ---- phases ------------------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        """Freeze as the recipe does: the whole base, or the Keras layers below fine_tune_at."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}; expected one of {PHASES}")
        freeze(self.base, len(self.base.keras_layers) if phase == "feature_extraction"
               else self.hparams.fine_tune_at)
        self.phase = phase

    def counts(self) -> dict[str, int]:
        trainable, non_trainable = count_params(self)
        return {"trainable": trainable, "non_trainable": non_trainable}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.phase == "feature_extraction":
            return KerasAdam(params, lr=self.hparams.learning_rate)
        return KerasRMSprop(params, lr=self.hparams.fine_tune_learning_rate)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["phase"] = self.phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before configure_optimizers on resume: the optimizer state then fits.
        self.set_phase(checkpoint.get("phase", "feature_extraction"))

    # ---- forward -----------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] images -> pooled base features (N, C), C = 1280 for MobileNetV2."""
        if self.fast:
            images = images.contiguous(memory_format=torch.channels_last)
        backbone = self.folded_base if self.fast else self.base
        x = backbone(self.base.preprocess(images))             # (N, C, H/32, W/32)
        return x.mean(dim=(2, 3))                               # (N, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] images (N, 3, H, W) -> logits: (N,) for two classes, (N, classes) beyond."""
        logits = self.classifier(self.dropout(self.features(images)))
        return logits.squeeze(-1) if self.binary else logits

    def probabilities(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index, probability of that class) per image, from :meth:`forward`'s logits:
        :func:`tl_common.head.decide`'s rule on tensors, which the accuracy, the trainer's printed
        predictions and ``tl_torch.predict`` all use. Two classes: by the logit's sign, with
        sigmoid(|logit|); N classes: the largest logit, with its softmax probability."""
        if self.binary:
            return (logits > 0).long(), torch.sigmoid(logits.abs())
        probs, labels = torch.softmax(logits, dim=-1).max(dim=-1)
        return labels, probs

    def on_train_epoch_start(self) -> None:
        # Augmentation draws from its own generator, seeded per epoch: see epoch_seed.
        seed = epoch_seed(self.hparams.seed, self.current_epoch, self.global_rank)
        self.augment_generator = torch.Generator().manual_seed(seed + 1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws from torch's global generator, which Lightning's DataLoader iterators
        # also draw from (one number each) -- after on_train_epoch_start in an uninterrupted run,
        # before it in the first epoch of a resumed one. Seeding per step makes each step's
        # masks depend on (seed, epoch, batch, rank) alone, so a resumed run draws the same.
        torch.manual_seed(step_seed(self.hparams.seed, self.current_epoch, batch_idx,
                                    self.global_rank))

    def shared_step(self, batch, loss_metric: MeanMetric, acc_metric: Metric,
                    augment: bool) -> torch.Tensor:
        """One batch as training, validation and testing run it: augmentation (``augment``,
        drawn from :attr:`augment_generator`), forward, the loss (returned), and the loss and
        accuracy metrics updated."""
        images, labels = batch
        if augment and self.augment is not None:
            images = self.augment(images, generator=self.augment_generator)
        logits = self(images)
        loss = self.loss_fn(logits, labels.float() if self.binary else labels.long())
        # Accuracy of logit > 0 (sigmoid > 0.5), as BinaryAccuracy(threshold=0.0) in Keras, or of
        # the largest logit; integer predictions, so torchmetrics applies no threshold of its own.
        predicted, _ = self.probabilities(logits.detach())
        loss_metric.update(loss.detach(), weight=labels.numel())
        acc_metric.update(predicted, labels)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.shared_step(batch, self.train_loss, self.train_acc, augment=True)
        self.log("loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("accuracy", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.shared_step(batch, self.val_loss, self.val_acc, augment=False)
        self.log("val_loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val_accuracy", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self.shared_step(batch, self.test_loss, self.test_acc, augment=False)
        self.log("test_loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test_accuracy", self.test_acc, on_step=False, on_epoch=True)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Probabilities: of class 1 per image (two classes), of each class (N classes)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        logits = self(images)
        return torch.sigmoid(logits) if self.binary else torch.softmax(logits, dim=-1)


def rewrap_ddp(trainer: L.Trainer) -> bool:
    """Wrap the module in DDP afresh after its trainable parameters changed; True if it did.

    DDP records which parameters need gradients when it wraps a model, and synchronises only
    those: parameters unfrozen later would train apart on each process. Lightning has no public
    call for this (its ``BaseFinetuning`` only adds parameter groups to the optimizer, under DDP
    with ``find_unused_parameters``), so this is the one place that uses its strategy's
    internals: the ``model`` setter and ``configure_ddp()`` of ``DDPStrategy`` (Lightning 2.6).
    ``tests/test_torch_train.py::test_ddp_rewrap_uses_what_lightning_has`` fails when they
    change; the DDP test checks that the unfrozen layers stay equal on both processes.
    """
    strategy = trainer.strategy
    if not isinstance(strategy.model, DistributedDataParallel):
        return False
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()
    return True


class TwoPhaseFineTuning(Callback):
    """Switch from feature extraction to fine-tuning when epoch ``initial_epochs`` begins:
    unfreeze from ``fine_tune_at`` and replace Adam by RMSprop (Lightning's fine-tuning
    callbacks freeze in a callback the same way, but keep BatchNorm in training mode).
    The layer table goes to ``layer_table`` (a ``.csv`` path; None: not written) with a one-line
    summary on the console, the whole table too with ``print_layers``."""

    def __init__(self, initial_epochs: int, *, layer_table: str | Path | None = None,
                 print_layers: bool = False) -> None:
        self.initial_epochs = initial_epochs
        self.layer_table, self.print_layers = layer_table, print_layers

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: TransferModule) -> None:
        if trainer.current_epoch < self.initial_epochs or pl_module.phase == "fine_tuning":
            return
        pl_module.set_phase("fine_tuning")
        rewrap_ddp(trainer)
        trainer.strategy.setup_optimizers(trainer)
        counts = pl_module.counts()
        show_layer_table(layer_table(pl_module.base),
                         self.layer_table if trainer.is_global_zero else None,
                         print_all=self.print_layers, echo=trainer.print)
        trainer.print(format_counts("fine_tuning", counts["trainable"], counts["non_trainable"]))
