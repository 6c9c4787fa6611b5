"""What a run shows: one line per epoch in redirected logs, everything in ``train.log``, no known noise.

- ``EpochLines``: after each epoch, ``epoch 3/30  train/loss …  val/… elapsed … ETA …``. It goes to the
  console when stdout is not a terminal (nohup, SLURM, CI: the progress bar is off there) and always
  to the run's ``train.log``.
- ``say``: a line for the console that is also written to the log files (test metrics, errors).
- ``route_library_logs``: Lightning attaches its own console handler when it is imported before logging
  is configured, so its messages never reached ``train.log``; after Hydra configured logging they go
  through the root handlers, and Python warnings too.
- ``quiet_known_noise``: filters for specific messages known to carry no information for a user of
  this project (each one named; no blanket ignores): torch's pytree deprecation inside Lightning,
  Lightning's product tips, transformers' load report when only the new classification head is missing.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import lightning as L

log = logging.getLogger("perturb_models.progress")


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_log_files(message: str, level: int = logging.INFO, name: str = "perturb_models") -> None:
    """Write ``message`` to the log files only (the console got it already)."""
    record = logging.LogRecord(name, level, __file__, 0, message, None, None)
    for handler in _file_handlers():
        if record.levelno >= handler.level:
            handler.handle(record)


def say(message: str, stream=None, level: int = logging.INFO) -> None:
    """Print ``message`` as is and keep it in the log files (``train.log``)."""
    print(message, file=stream or sys.stdout, flush=True)
    to_log_files(message, level)


def route_library_logs() -> None:
    """Send Lightning's log records and Python warnings through the configured root handlers (train.log)."""
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


# (category, message regex, module regex): specific, known, harmless messages.
KNOWN_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    # torch 2.13 deprecates the pytree LeafSpec check that Lightning 2.6 still makes, 3-5 times a run;
    # nothing a user can change.
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # transformers 5 renames gradient checkpointing; peft and transformers' own forward still call the old
    # property on every step of a checkpointed LLM run (our code calls the new name where it exists).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)

# Lightning's rank_zero_info tips about its cloud products, printed on every run.
_TIP_MARKERS = ("litlogger", "litmodels", "💡 Tip")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _TIP_MARKERS)


class _DropNewHeadReport(logging.Filter):
    """transformers' LOAD REPORT when the only missing weights are the classification head (``score.*``),
    which every LLM run of this project creates on purpose and trains (LoRA + head)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
        keys = [(cells[0].strip(), cells[1].strip()) for cells in rows if cells[0].strip() not in ("Key", "")]
        return not keys or not all(key.startswith("score.") and status == "MISSING" for key, status in keys)


def quiet_known_noise() -> None:
    for category, message, module in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("transformers.modeling_utils", "transformers.utils.loading_report"):
        report = logging.getLogger(name)
        if not any(isinstance(f, _DropNewHeadReport) for f in report.filters):
            report.addFilter(_DropNewHeadReport())
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
        for handler in logger.handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())


def trainer_console_overrides(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """No progress bar when stdout is not a terminal (it prints nothing useful there); epoch lines instead."""
    if trainer_cfg.get("enable_progress_bar") is None and not stdout_is_terminal():
        return {"enable_progress_bar": False}
    return {}


def _format_value(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


class EpochLines(L.Callback):
    """One line per training epoch: train loss, validation metrics, elapsed time and an ETA."""

    def __init__(self, console: bool | None = None) -> None:
        self.console = console
        self._started: float | None = None
        self._first_epoch = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.monotonic()
        self._first_epoch = trainer.current_epoch

    def epoch_line(self, trainer) -> str:
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        parts = [
            f"epoch {epoch}/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else f"epoch {epoch}"
        ]
        loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train/loss {_format_value(loss)}")
        headline = [k for k in ("val/de_auroc_per_gene", "val/dir_auroc_per_gene") if k in metrics]
        parts += [f"{k} {_format_value(metrics[k])}" for k in headline]
        elapsed = time.monotonic() - (self._started or time.monotonic())
        parts.append(f"elapsed {timedelta(seconds=round(elapsed))}")
        done = epoch - self._first_epoch
        if trainer.max_epochs and trainer.max_epochs > 0 and done > 0:
            remaining = max(0, trainer.max_epochs - epoch)
            parts.append(
                f"ETA {timedelta(seconds=round(elapsed / done * remaining))}"
                + (" (or sooner: early stopping)" if remaining and _has_early_stopping(trainer) else "")
            )
        return "  ".join(parts)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        line = self.epoch_line(trainer)
        console = self.console if self.console is not None else not stdout_is_terminal()
        if console:
            log.info(line)
            if not logging.getLogger().handlers:  # no logging configured (train() called from Python)
                print(line, flush=True)
        else:
            to_log_files(line, name=log.name)


def _has_early_stopping(trainer) -> bool:
    return any(type(c).__name__ == "EarlyStopping" for c in trainer.callbacks)
