"""scl-lightning: Sparse Connectivity Learning for PyTorch Lightning.

Networks whose connections are pruned automatically while they learn: each weight becomes
``w * H(m)`` with a trainable mask variable ``m``, trained through a straight-through estimator
on ``task loss + lambda * (number of active connections)`` (Tang et al., arXiv 2201.05020).
"""

from typing import Any

from scl_lightning import callbacks
from scl_lightning.deploy import load_pruned, save_pruned
from scl_lightning.module import SCLModule
from scl_lightning.nn import (
    connection_count,
    coverage,
    export_pruned,
    global_sparsity,
    layer_sparsity,
    masked_modules,
    register_maskable,
    sparsify,
)

__version__ = "0.1.0"

#: experiment tooling offered at the top level, imported on first use: the package's layers
#: (nn, callbacks, the module) never import ``experiment/``, and neither does this facade
_LAZY = {
    "SafeCheckpointIO": "scl_lightning.experiment.checkpoint",
    "load_checkpoint": "scl_lightning.experiment.checkpoint",
    "load_sparse": "scl_lightning.experiment.reload",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scl_lightning' has no attribute {name!r}")


__all__ = [
    "SCLModule",
    "SafeCheckpointIO",
    "__version__",
    "callbacks",
    "connection_count",
    "coverage",
    "export_pruned",
    "global_sparsity",
    "layer_sparsity",
    "load_checkpoint",
    "load_pruned",
    "load_sparse",
    "masked_modules",
    "register_maskable",
    "save_pruned",
    "sparsify",
]
