"""What ``python -m tl_torch.train`` shows on its console, beyond the recipe's own lines.

Lightning's messages that the project itself causes, and understands, are left out or said once
in the project's words; everything else Lightning says is shown as it says it:
- the tip to install ``litlogger`` (an advertisement, printed on every run) is left out;
- the warning that modules are "in eval mode at the start of training" is by design here: the
  base runs in inference mode in both phases, as the recipe's ``base(x, training=False)``
  (BatchNorm keeps its moving statistics). The warning is filtered, and :class:`InferenceModeNote`
  prints one line saying so instead;
- the progress bar counts epochs from 1, as ``metrics.json``, the plot and Keras do
  (:class:`EpochFromOneBar`).
Lightning's notes on ``limit_*_batches`` are avoided at the source: the trainer passes no limit
when the user set none (``tl_torch.train.build_trainer``).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

#: Lightning's logger of ``rank_zero_info`` messages (the litlogger tip among them).
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"
#: How the litlogger tip begins (Lightning 2.6, ``logger_connector.py``).
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
#: Lightning's warning about modules in eval mode (``fit_loop.py``), as a regular expression.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LITLOGGER_TIP)


def quiet_lightning() -> None:
    """Leave out the two Lightning messages this project causes by design (module docstring).
    Idempotent; every process of a DDP run calls it, since each runs the script's ``main``."""
    log = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _DropLitLoggerTip) for f in log.filters):
        log.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)


def inference_mode_note(count: int) -> str:
    """The one line that replaces Lightning's eval-mode warning."""
    return (f"note: {count} modules of the base stay in inference mode while training, by design: "
            "BatchNorm keeps its moving statistics in both phases, as the recipe's "
            "base(x, training=False) (Lightning's warning about them is not shown)")


class InferenceModeNote(Callback):
    """Prints :func:`inference_mode_note` once as training starts, before the progress bar does
    (a line printed while a bar is drawn lands after it in a log file)."""

    def __init__(self) -> None:
        self.shown = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        count = sum(not module.training for module in pl_module.modules())
        if count and not self.shown:
            trainer.print(inference_mode_note(count))
            self.shown = True


class EpochFromOneBar(TQDMProgressBar):
    """Lightning's progress bar, with epochs counted 1..N as in ``metrics.json`` and Keras.

    Its start of an epoch is Lightning's own, but for the description: calling Lightning's
    first would show its 0-based count for a moment. One bar for all epochs (``leave=False``,
    Lightning's default), so the bar is reset, not replaced."""

    def __init__(self) -> None:
        super().__init__(leave=False)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        total = self.total_train_batches
        bar = self.train_progress_bar
        bar.reset(total=None if total == float("inf") else total)
        bar.initial = 0
        bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
