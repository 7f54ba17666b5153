"""Callbacks usable with any LightningModule whose network has masked layers."""

from scl_lightning.callbacks.exact_resume import ExactResume
from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.non_finite import NonFiniteError, StopOnNonFinite
from scl_lightning.callbacks.rank_agreement import (
    RankAgreementCheck,
    RankDivergenceError,
    parameter_fingerprints,
)
from scl_lightning.callbacks.run_summary import RunSummary
from scl_lightning.callbacks.sparse_connectivity_learning import SparseConnectivityLearning
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor
from scl_lightning.callbacks.wandb_artifacts import WandbArtifacts

__all__ = [
    "ExactResume",
    "MaskGradientNormalization",
    "NonFiniteError",
    "RankAgreementCheck",
    "RankDivergenceError",
    "RunSummary",
    "SparseConnectivityLearning",
    "SparsityMonitor",
    "StopOnNonFinite",
    "WandbArtifacts",
    "parameter_fingerprints",
]
