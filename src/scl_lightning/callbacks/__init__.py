"""The method in Lightning, usable with any LightningModule whose network has masked layers.

The experiment tooling that used to live here (``ExactResume``, ``StopOnNonFinite``,
``RankAgreementCheck``, ``RunSummary``, ``WandbArtifacts``...) is in
:mod:`scl_lightning.experiment`; the old names still resolve, with a ``DeprecationWarning``,
until 0.3.
"""

from scl_lightning._deprecation import deprecated_names
from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.plain_progress_bar import PlainProgressBar
from scl_lightning.callbacks.sparse_connectivity_learning import SparseConnectivityLearning
from scl_lightning.callbacks.sparse_model_summary import SparseModelSummary
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor

__all__ = [
    "MaskGradientNormalization",
    "PlainProgressBar",
    "SparseConnectivityLearning",
    "SparseModelSummary",
    "SparsityMonitor",
]

__getattr__ = deprecated_names(
    "scl_lightning.callbacks",
    dict.fromkeys(
        (
            "ExactResume",
            "NonFiniteError",
            "RankAgreementCheck",
            "RankDivergenceError",
            "RunSummary",
            "StopOnNonFinite",
            "WandbArtifacts",
            "parameter_fingerprints",
        ),
        "scl_lightning.experiment",
    ),
)
