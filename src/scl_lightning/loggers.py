"""Deprecated alias of :mod:`scl_lightning.experiment.loggers` (removed in 0.3)."""

from scl_lightning._deprecation import deprecated_module

__getattr__, __dir__, __all__ = deprecated_module(
    "scl_lightning.loggers",
    "scl_lightning.experiment.loggers",
    moved={
        "active_wandb_loggers": "scl_lightning.callbacks._logging",
        "logs_this_step": "scl_lightning.callbacks._logging",
    },
)
