"""From masks to a smaller model: pruned-weight files in safetensors (nothing runs on load).

:func:`save_pruned` writes the state dict of :func:`scl_lightning.export_pruned` with its
metadata, atomically; :func:`load_pruned` reads it back without unpickling anything.
"""

from scl_lightning.deploy.export import (
    PRUNED_FORMAT,
    PRUNED_METADATA_KEYS,
    load_pruned,
    save_pruned,
)

__all__ = ["PRUNED_FORMAT", "PRUNED_METADATA_KEYS", "load_pruned", "save_pruned"]
