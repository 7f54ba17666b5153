"""What the callbacks ask of the Trainer's loggers (private: shared by the callbacks, the
module and ``experiment/``, which imports it from here, never the other way round)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

__all__ = ["active_wandb_loggers", "logs_this_step"]


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning writes this training batch's step metrics to the loggers: only at its
    logging steps (every ``log_every_n_steps`` optimizer steps), after the last micro-batch of
    an optimizer step. A step-level value logged on other batches is computed for nothing."""
    if trainer.fit_loop._should_accumulate():
        return False
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


def active_wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    """The W&B loggers among ``loggers`` (Lightning's ``WandbLogger`` or a subclass) whose run is
    not disabled (``WANDB_MODE=disabled``).

    Call it on rank zero only: it starts each logger's W&B run (``logger.experiment``) if the
    run has not started yet. Needs no ``import wandb`` when no W&B logger is present.
    """
    return [
        logger
        for logger in loggers
        if isinstance(logger, WandbLogger) and not getattr(logger.experiment, "disabled", False)
    ]
