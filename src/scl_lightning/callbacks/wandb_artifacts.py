"""Deprecated alias of :mod:`scl_lightning.experiment.wandb_artifacts` (removed in 0.3)."""

from scl_lightning._deprecation import deprecated_module

__getattr__, __dir__, __all__ = deprecated_module(
    "scl_lightning.callbacks.wandb_artifacts", "scl_lightning.experiment.wandb_artifacts"
)
