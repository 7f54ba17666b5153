"""Deprecated: ``scl_lightning.training`` was split by concern (removed in 0.3).

The mask parameter group went to :mod:`scl_lightning.callbacks.mask_group`, the phases to the
SCL engine (:mod:`scl_lightning.callbacks.sparse_connectivity_learning`), the collapse guard to
:mod:`scl_lightning.nn.collapse`.
"""

from scl_lightning._deprecation import deprecated_module

__getattr__, __dir__, __all__ = deprecated_module(
    "scl_lightning.training",
    "scl_lightning.callbacks.mask_group",
    moved={
        "validate_phases": "scl_lightning.callbacks.sparse_connectivity_learning",
        "masks_trainable": "scl_lightning.callbacks.sparse_connectivity_learning",
        "LayerCollapseGuard": "scl_lightning.nn.collapse",
        "LayerCollapseWarning": "scl_lightning.nn.collapse",
        "validate_positive": "scl_lightning._utils",
    },
)
