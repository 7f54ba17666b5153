"""Writing a report directory: the figures and ``report.md``, assembled in a temporary directory
and moved into place at the end, never over an existing report."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scl_lightning._utils import free_paths

from .markdown import MARKDOWN, render_markdown
from .plots import IMAGES, plot_flops, plot_layer_sparsity, plot_training_curves
from .run import ReportError, Run

__all__ = ["write_report"]


def _taken(path: Path) -> bool:
    """Whether ``path`` holds something a report must not replace (an empty directory doesn't)."""
    if not path.exists() and not path.is_symlink():
        return False
    return not (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))


def write_report(run: Run, out: str | os.PathLike[str] | None = None) -> Path:
    """Write the plots and report.md into ``out`` (default ``RUN_DIR/report``), or the next free
    ``out-1``, ``out-2``, ... when ``out`` exists and is not empty. Returns the directory.

    Raises:
        ReportError: if the directory cannot be written.
    """
    target = Path(out) if out is not None else run.directory / "report"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as err:
        raise ReportError(f"cannot create the report directory in {target.parent}: {err}") from err
    try:
        plot_layer_sparsity(run, tmp / IMAGES["layer_sparsity"])
        plot_training_curves(run, tmp / IMAGES["training_curves"])
        plot_flops(run, tmp / IMAGES["flops"])
        (tmp / MARKDOWN).write_text(render_markdown(run), encoding="utf-8")
        for candidate in free_paths(target):
            if _taken(candidate):
                continue
            try:
                os.replace(tmp, candidate)  # an empty directory is replaced; anything else raises
            except OSError:
                if _taken(candidate):  # filled meanwhile by someone else
                    continue
                raise
            return candidate
        raise AssertionError("unreachable")  # pragma: no cover
    except OSError as err:
        raise ReportError(f"cannot write the report into {target.parent}: {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
