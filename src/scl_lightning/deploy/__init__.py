"""From masks to a smaller, faster model.

:func:`save_pruned` writes the state dict of :func:`scl_lightning.export_pruned` with its
metadata, atomically; :func:`load_pruned` reads it back without unpickling anything.
:func:`compact` removes the units and channels a pruned network no longer uses;
:func:`export_model` writes a network as ``dense``, ``compact``, ``sparse`` or ``onnx`` with a
report of what it saves, and :func:`load_export` reads any of them back (``scl export`` on the
command line). :func:`select_output` makes a network with a structured output (a dict, a
dataclass, a ``ModelOutput``) return one of its tensors, for a format that cannot store the rest.
"""

from scl_lightning.deploy.compact import CompactReport, compact
from scl_lightning.deploy.export import (
    PRUNED_FORMAT,
    PRUNED_METADATA_KEYS,
    load_pruned,
    save_pruned,
)
from scl_lightning.deploy.formats import (
    FORMATS,
    ExportedModule,
    ExportReport,
    export_model,
    load_export,
    select_output,
)

__all__ = [
    "FORMATS",
    "PRUNED_FORMAT",
    "PRUNED_METADATA_KEYS",
    "CompactReport",
    "ExportReport",
    "ExportedModule",
    "compact",
    "export_model",
    "load_export",
    "load_pruned",
    "save_pruned",
    "select_output",
]
