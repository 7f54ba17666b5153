"""What the ``scl`` command writes on the terminal, besides what the run itself reports.

Lightning's defaults are made for an interactive terminal and for networks without mask
variables; here ``scl`` swaps in the model summary and progress output that fit SCL runs and
log files, and keeps out lines that say nothing about the run (product tips, a deprecation
inside Lightning). Each switch is narrow: other warnings and log lines are untouched.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import (
    Callback,
    ModelSummary,
    RichModelSummary,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from scl_lightning.callbacks._logging import active_wandb_loggers
from scl_lightning.callbacks.plain_progress_bar import PlainProgressBar
from scl_lightning.callbacks.sparse_model_summary import SparseModelSummary

__all__ = [
    "configured_callbacks",
    "evaluation_run_line",
    "is_terminal",
    "quiet_evaluation_noise",
    "quiet_known_noise",
    "use_terminal_callbacks",
]

#: Lightning's rank-zero messages go through these loggers (fabric's, then pytorch's)
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _ProductTips(logging.Filter):
    """Drops Lightning's advertisements for its cloud services ("💡 Tip: ... litlogger",
    "... litmodels"), printed on every run that does not use them; nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Tip:" in message[:8] and ("litlogger" in message or "litmodels" in message))


def quiet_known_noise() -> None:
    """Keep two lines out of every ``scl`` run's output (idempotent):

    * Lightning's tips that advertise ``litlogger``/``litmodels``;
    * torch 2.13's ``FutureWarning`` that ``LeafSpec`` is deprecated, raised by Lightning's
      own ``lightning/pytorch/utilities/_pytree.py`` (nothing a user can change; matched by
      its message and that module only).
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ProductTips) for f in logger.filters):
            logger.addFilter(_ProductTips())


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (a pipe, a file or a closed stream is not)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def use_terminal_callbacks(
    trainer: pl.Trainer, configured: Iterable[Callback], stdout: TextIO | None = None
) -> None:
    """Replace the model summary and progress bar that Lightning added by default (those not
    among ``configured``, the callbacks the user's configuration built):

    * the model summary by :class:`~scl_lightning.callbacks.SparseModelSummary` (the network's
      own parameters, mask variables apart, and FLOPs in the project's convention);
    * when ``stdout`` (default ``sys.stdout``) is not a terminal, the tqdm bar by
      :class:`~scl_lightning.callbacks.PlainProgressBar` (one line per epoch, no carriage
      returns).

    Nothing is added where Lightning added nothing (``enable_model_summary=False``,
    ``enable_progress_bar=False``), and a summary or bar the user configured is kept.
    """
    mine = {id(callback) for callback in configured}
    terminal = is_terminal(sys.stdout if stdout is None else stdout)
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    for i, callback in enumerate(callbacks):
        if id(callback) in mine:
            continue
        if type(callback) in (ModelSummary, RichModelSummary):
            callbacks[i] = SparseModelSummary(max_depth=getattr(callback, "_max_depth", 1))
        elif type(callback) is TQDMProgressBar and not terminal:
            callbacks[i] = PlainProgressBar()


def evaluation_run_line(trainer: pl.Trainer, subcommand: str) -> str | None:
    """The line ``scl validate``/``scl test`` print before they start: where the evaluation is
    logged. Each evaluation is a run of its own (a new version directory, a new W&B run), so
    the training run's ``metrics.csv`` and ``config.yaml`` stay as training left them.

    Reads ``trainer.log_dir``, which is collective: call it on every rank.
    """
    log_dir = trainer.log_dir
    if not trainer.loggers:
        return None
    where: list[str] = []
    first = trainer.loggers[0]
    if isinstance(first, (CSVLogger, TensorBoardLogger)) and log_dir is not None:
        directory = Path(log_dir)
        where.append(f"{directory}{'' if directory.exists() else ' (a new run directory)'}")
    if trainer.is_global_zero and active_wandb_loggers(trainer.loggers):
        where.append("a new W&B run")
    if not where:
        return None
    return (
        f"scl: {subcommand} logs to {' and to '.join(where)}; the run that trained the "
        "checkpoint is left as it was"
    )


def quiet_evaluation_noise() -> None:
    """Keep out of ``scl validate``/``scl test`` Lightning's warning that a ``ModelCheckpoint``
    restored from the checkpoint has a new ``dirpath`` and will not reload the training run's
    best and last paths: an evaluation logs into a new run directory on purpose and saves no
    checkpoint (matched by its message and Lightning's ``model_checkpoint`` module only)."""
    warnings.filterwarnings(
        "ignore",
        message=r"The dirpath has changed from",
        category=UserWarning,
        module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
    )


def configured_callbacks(trainer_config: Any) -> list[Callback]:
    """The callbacks a LightningCLI configuration instantiated (``trainer.callbacks``)."""
    callbacks = trainer_config.get("callbacks") if trainer_config else None
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
