"""Callbacks usable with any LightningModule whose network has masked layers."""

from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.run_summary import RunSummary
from scl_lightning.callbacks.sparse_connectivity_learning import SparseConnectivityLearning
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor
from scl_lightning.callbacks.wandb_artifacts import WandbArtifacts

__all__ = [
    "MaskGradientNormalization",
    "RunSummary",
    "SparseConnectivityLearning",
    "SparsityMonitor",
    "WandbArtifacts",
]
