"""``scl report RUN_DIR``: plots and a Markdown summary of a finished run.

Reads what a fit leaves in its run directory (the first logger's version directory, e.g.
``runs/digits_mlp/version_0``): ``summary.json`` (written by
:class:`~scl_lightning.experiment.RunSummary`), ``metrics.csv`` (a ``CSVLogger``'s, with
``sparsity/*``, ``flops/*`` and ``val/acc`` as :class:`~scl_lightning.callbacks.SparsityMonitor`
and :class:`~scl_lightning.SCLModule` log them) and the last checkpoint. It writes, into
``RUN_DIR/report/`` or ``--out DIR``:

* ``layer_sparsity.png``: one horizontal bar per maskable layer, the global sparsity as a line;
* ``training_curves.png``: global (and per-layer) sparsity, and validation accuracy, over the
  optimizer steps of training, with the epochs on the top axis;
* ``flops.png``: dense vs effective FLOPs per layer (one sample), log scale when they span
  more than a factor of 30;
* ``report.md``: the headline numbers, a per-layer table and the three images.

Per-layer figures come from ``summary.json``; the checkpoint's ``*.mask`` tensors recount each
layer's active connections as a cross-check (the result is written into the report) and stand in
for the summary's layers when it has none. Checkpoints are loaded with ``weights_only=True``.

An existing report is never overwritten: when the output directory exists and is not empty,
the next free ``<name>-1``, ``<name>-2``, ... beside it is used, and the command says so. The
report is assembled in a temporary directory and moved into place at the end, so a failure
leaves no half-written report.

Errors a user can act on end in one line, ``scl report: error: ...``, and exit status 2
(``SCL_DEBUG=1`` shows the traceback).

Example::

    scl report runs/digits_mlp/version_0
    scl report runs/digits_mlp/version_0 --out reports/digits

The package, by concern: :mod:`.run` reads and checks the run directory, :mod:`.plots` draws the
figures, :mod:`.markdown` renders ``report.md``, :mod:`.write` writes the report directory and
:mod:`.cli` is the command line.
"""

from .cli import build_parser, main
from .markdown import render_markdown
from .plots import plot_flops, plot_layer_sparsity, plot_training_curves
from .run import (
    CheckpointInfo,
    LayerStats,
    Metrics,
    ReportError,
    Run,
    find_checkpoint,
    load_run,
    read_checkpoint,
    read_metrics,
    read_summary,
)
from .write import write_report

__all__ = [
    "CheckpointInfo",
    "LayerStats",
    "Metrics",
    "ReportError",
    "Run",
    "build_parser",
    "find_checkpoint",
    "load_run",
    "main",
    "plot_flops",
    "plot_layer_sparsity",
    "plot_training_curves",
    "read_checkpoint",
    "read_metrics",
    "read_summary",
    "render_markdown",
    "write_report",
]
