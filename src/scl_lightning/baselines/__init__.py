"""Pruning baselines measured on SCL's own masked layers, as Lightning callbacks for any module."""

from .magnitude import (
    GradualMagnitudePruning,
    OneShotMagnitudePruning,
    cubic_sparsity,
    prune_by_magnitude,
)

__all__ = [
    "GradualMagnitudePruning",
    "OneShotMagnitudePruning",
    "cubic_sparsity",
    "prune_by_magnitude",
]
