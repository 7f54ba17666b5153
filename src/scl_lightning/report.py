"""``scl report RUN_DIR``: plots and a Markdown summary of a finished run.

Reads what a fit leaves in its run directory (the first logger's version directory, e.g.
``runs/digits_mlp/version_0``): ``summary.json`` (written by
:class:`~scl_lightning.callbacks.RunSummary`), ``metrics.csv`` (a ``CSVLogger``'s, with
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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "CheckpointInfo",
    "LayerStats",
    "Metrics",
    "ReportError",
    "Run",
    "load_run",
    "main",
    "write_report",
]

PROG = "scl report"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
IMAGES = {
    "layer_sparsity": "layer_sparsity.png",
    "training_curves": "training_curves.png",
    "flops": "flops.png",
}
DPI = 150
LOG_SCALE_SPAN = 30.0  # max/min of the positive FLOP bars above which the axis is logarithmic
DENSE_COLOR = "#b0b0b0"
ACTIVE_COLOR = "#1f77b4"
SPARSITY_COLOR = "#d62728"


class ReportError(Exception):
    """A problem with the run directory that the user can fix; printed as one line."""


# -- reading a run -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerStats:
    """One maskable layer's connectivity and FLOPs (one sample, fvcore's convention)."""

    name: str
    shape: tuple[int, ...]
    active: int
    total: int
    dense_flops: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / self.total if self.total else 0.0

    @property
    def effective_flops(self) -> float | None:
        """Dense FLOPs scaled by the active fraction, as :class:`~scl_lightning.flops.FlopCounts`
        computes them (exact for unstructured masks on Linear and convolution layers)."""
        if self.dense_flops is None or not self.total:
            return None
        return self.dense_flops * self.active / self.total


@dataclass
class Metrics:
    """The rows of a Lightning ``metrics.csv``: blank cells are ``None``."""

    columns: list[str]
    rows: list[dict[str, float | None]]

    @property
    def x_key(self) -> str:
        return "step" if "step" in self.columns else "epoch"

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(x, y)`` of the rows where ``key`` has a value, sorted by x; when several rows share
        one x (a step-level and an epoch-level row logged at the same step), the last wins."""
        if key not in self.columns:
            return [], []
        points: dict[float, float] = {}
        for row in self.rows:
            x, y = row.get(self.x_key), row.get(key)
            if x is not None and y is not None:
                points[x] = y
        xs = sorted(points)
        return xs, [points[x] for x in xs]

    def epoch_ends(self) -> dict[int, float]:
        """``{epoch: last step logged in it}`` (empty when there is no step column)."""
        if "step" not in self.columns or "epoch" not in self.columns:
            return {}
        ends: dict[int, float] = {}
        for row in self.rows:
            epoch, step = row.get("epoch"), row.get("step")
            if epoch is not None and step is not None:
                ends[int(epoch)] = max(step, ends.get(int(epoch), step))
        return ends


@dataclass
class CheckpointInfo:
    """What the report uses from a checkpoint: masks, weight shapes and hyper-parameters."""

    path: Path
    epoch: int | None
    global_step: int | None
    masks: dict[str, LayerStats]
    hparams: dict[str, Any]


@dataclass
class Run:
    """A finished run, read from its directory."""

    directory: Path
    summary_path: Path
    summary: dict[str, Any]
    layers: list[LayerStats]
    metrics: Metrics
    checkpoint: CheckpointInfo | None
    notes: list[str] = field(default_factory=list)  # cross-check results and warnings

    @property
    def name(self) -> str:
        return f"{self.directory.parent.name}/{self.directory.name}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and (isinstance(value, int) or float(value).is_integer())


_FLOAT_KEYS = ("val_acc", "val_loss", "val_acc_top5", "sparsity", "train_time_s")
_INT_KEYS = (
    "active_connections",
    "total_connections",
    "dense_flops",
    "effective_flops",
    "seed",
    "epochs",
    "global_step",
)


def read_summary(path: Path) -> dict[str, Any]:
    """``summary.json`` as a dict, its types checked.

    Raises:
        ReportError: if it cannot be read, is not JSON, or is not a run summary.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is corrupt (not valid JSON: {err})") from err
    bad = f"{path} is not a run summary written by scl's RunSummary"
    if not isinstance(data, dict):
        raise ReportError(f"{bad} (a JSON {type(data).__name__}, not an object)")
    for key in _FLOAT_KEYS:
        if data.get(key) is not None and not _is_number(data[key]):
            raise ReportError(f"{bad} ({key!r} is {data[key]!r}, not a number)")
    for key in _INT_KEYS:
        if data.get(key) is not None and not _is_integer(data[key]):
            raise ReportError(f"{bad} ({key!r} is {data[key]!r}, not an integer)")
    layers = data.get("layers", [])
    if not isinstance(layers, list):
        raise ReportError(f"{bad} ('layers' is not a list)")
    for i, layer in enumerate(layers):
        ok = (
            isinstance(layer, dict)
            and isinstance(layer.get("name"), str)
            and isinstance(layer.get("active"), int)
            and isinstance(layer.get("total"), int)
            and 0 <= layer["active"] <= layer["total"]
            and (layer.get("dense_flops") is None or isinstance(layer["dense_flops"], int))
            and isinstance(layer.get("shape", []), list)
            and all(isinstance(s, int) for s in layer.get("shape", []))
        )
        if not ok:
            raise ReportError(f"{bad} (layer entry {i} is malformed: {layer!r:.120})")
    return data


def _summary_layers(summary: dict[str, Any]) -> list[LayerStats]:
    return [
        LayerStats(
            name=layer["name"],
            shape=tuple(layer.get("shape", [])),
            active=layer["active"],
            total=layer["total"],
            dense_flops=layer.get("dense_flops"),
        )
        for layer in summary.get("layers", [])
    ]


def read_metrics(path: Path) -> Metrics:
    """A Lightning ``metrics.csv``: one header row, numeric cells, blank where not logged.

    Raises:
        ReportError: if it cannot be read, is empty, has rows that do not match the header,
            cells that are not numbers, or neither a ``step`` nor an ``epoch`` column.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    if not lines or not any(lines[0]):
        raise ReportError(f"{path} is empty (no header row)")
    columns = [c.strip() for c in lines[0]]
    if "step" not in columns and "epoch" not in columns:
        raise ReportError(
            f"{path} is corrupt or not a Lightning CSVLogger file (no 'step' or 'epoch' column)"
        )
    rows: list[dict[str, float | None]] = []
    for lineno, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) != len(columns):
            raise ReportError(
                f"{path} is corrupt: line {lineno} has {len(cells)} cells, "
                f"the header {len(columns)}"
            )
        row: dict[str, float | None] = {}
        for column, cell in zip(columns, cells, strict=True):
            cell = cell.strip()
            try:
                row[column] = float(cell) if cell else None
            except ValueError:
                raise ReportError(
                    f"{path} is corrupt: line {lineno}, column {column!r}: {cell!r:.40} "
                    "is not a number"
                ) from None
        rows.append(row)
    return Metrics(columns=columns, rows=rows)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The run's last checkpoint: ``last*.ckpt`` if any, else the newest ``*.ckpt``, looked for
    in ``RUN_DIR/checkpoints/`` and ``RUN_DIR``."""
    found = [
        p
        for d in (run_dir / "checkpoints", run_dir)
        if d.is_dir()
        for p in d.glob("*.ckpt")
        if p.is_file()
    ]
    if not found:
        return None
    last = [p for p in found if p.name.startswith("last")]
    return max(last or found, key=lambda p: (p.stat().st_mtime, p.name))


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Masks, weight shapes and hyper-parameters of a Lightning checkpoint (``weights_only``).

    Raises:
        ReportError: if the file cannot be loaded or has no ``state_dict``.
    """
    import torch

    try:
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # corrupt zip, pickle refused by weights_only, I/O error, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReportError(f"cannot load checkpoint {path}: {reason:.200}") from err
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ReportError(f"checkpoint {path} has no state_dict")
    masks: dict[str, LayerStats] = {}
    for key, mask in state.items():
        if not (isinstance(key, str) and key.endswith(".mask") and isinstance(mask, torch.Tensor)):
            continue
        name = key[: -len(".mask")]
        masks[name] = LayerStats(
            name=name,
            shape=tuple(mask.shape),
            active=int((mask > 0).sum()),  # H(m) = 1[m > 0]
            total=mask.numel(),
        )
    hparams: dict[str, Any] = {}
    for key in ("datamodule_hyper_parameters", "hyper_parameters"):
        if isinstance(ckpt.get(key), dict):
            hparams.update(ckpt[key])

    def as_int(value: Any) -> int | None:
        return int(value) if _is_number(value) else None

    return CheckpointInfo(
        path=path,
        epoch=as_int(ckpt.get("epoch")),
        global_step=as_int(ckpt.get("global_step")),
        masks=masks,
        hparams=hparams,
    )


def _cross_check(layers: list[LayerStats], ckpt: CheckpointInfo) -> list[str]:
    """Compare summary.json's per-layer active counts with the checkpoint's masks."""
    if not layers:
        return []
    if not ckpt.masks:
        if all(layer.active == layer.total for layer in layers):
            return ["The checkpoint has no masks (a dense model), as summary.json says."]
        return ["**Mismatch**: summary.json reports pruned layers but the checkpoint has no masks."]
    problems = []
    for layer in layers:
        mask = ckpt.masks.get(layer.name)
        if mask is None:
            if layer.active != layer.total:
                problems.append(f"`{layer.name}`: pruned in summary.json, no mask in checkpoint")
        elif (mask.active, mask.total) != (layer.active, layer.total):
            problems.append(
                f"`{layer.name}`: summary.json {layer.active:,}/{layer.total:,} active, "
                f"checkpoint masks {mask.active:,}/{mask.total:,}"
            )
    if problems:
        return [
            "**Mismatch** between summary.json and the checkpoint's masks (the checkpoint may be "
            "from another point of training): " + "; ".join(problems) + "."
        ]
    return [
        f"Checkpoint masks agree with summary.json: every layer's active connections recounted "
        f"from `H(m) = 1[m > 0]` ({len(layers)} layers)."
    ]


def _suggest_run_dirs(path: Path) -> str:
    found = [*path.glob(f"*/{SUMMARY}"), *path.glob(f"*/*/{SUMMARY}")]
    if not found:
        return ""
    newest = max(found, key=lambda p: p.stat().st_mtime).parent
    return f"; the newest run below it is {newest}"


def load_run(
    run_dir: str | os.PathLike[str], ckpt_path: str | os.PathLike[str] | None = None
) -> Run:
    """Read a finished run's summary, metrics and (last, or ``ckpt_path``) checkpoint.

    Raises:
        ReportError: if the directory is missing, is not a run directory, or its summary.json
            or metrics.csv cannot be read.
    """
    directory = Path(run_dir)
    if not directory.exists():
        raise ReportError(f"run directory {directory} does not exist")
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory (pass a run directory)")
    summary_path = directory / SUMMARY
    if not summary_path.is_file():
        raise ReportError(
            f"{directory} is not a finished run directory (no {SUMMARY}; it is written at the "
            f"end of `scl fit`){_suggest_run_dirs(directory)}"
        )
    summary = read_summary(summary_path)
    metrics_path = directory / METRICS
    if not metrics_path.is_file():
        raise ReportError(
            f"{directory} has no {METRICS}; scl report reads a CSVLogger's metrics (fit with a "
            "CSVLogger, e.g. --config configs/logger/csv.yaml)"
        )
    metrics = read_metrics(metrics_path)
    layers = _summary_layers(summary)
    notes: list[str] = []
    checkpoint = None
    path = Path(ckpt_path) if ckpt_path is not None else find_checkpoint(directory)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ReportError(f"checkpoint {ckpt_path} does not exist")
    if path is None:
        notes.append("Warning: no checkpoint found in the run directory; masks not cross-checked.")
    else:
        try:
            checkpoint = read_checkpoint(path)
        except ReportError as err:
            if ckpt_path is not None:
                raise
            notes.append(f"Warning: {err}; masks not cross-checked.")
    if checkpoint is not None:
        if layers:
            notes += _cross_check(layers, checkpoint)
        elif checkpoint.masks:
            layers = list(checkpoint.masks.values())
            notes.append(
                "summary.json lists no layers: the per-layer figures are the checkpoint's masks."
            )
    return Run(
        directory=directory,
        summary_path=summary_path,
        summary=summary,
        layers=layers,
        metrics=metrics,
        checkpoint=checkpoint,
        notes=notes,
    )


# -- plots ---------------------------------------------------------------------------------


def _compact(value: float) -> str:
    """3 significant digits with a k/M/G/T suffix: 19200 -> '19.2k'."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure (no pyplot): no global backend state, no display needed, Agg for PNGs.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _annotate_last(ax: Axes, xs: list[float], ys: list[float], text: str) -> None:
    """Label a curve's last point, above it when it is low (so it stays inside the axes)."""
    low = ys[-1] < 0.5
    ax.annotate(
        text,
        (xs[-1], ys[-1]),
        textcoords="offset points",
        xytext=(-4, 6 if low else -14),
        ha="right",
        fontsize=9,
    )


def _layer_axis(ax: Axes, layers: list[LayerStats]) -> None:
    ax.set_yticks(range(len(layers)), [layer.name for layer in layers])
    ax.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top
    ax.set_axisbelow(True)  # grid behind the bars
    ax.tick_params(axis="y", labelsize=9 if len(layers) <= 30 else 7)


def _height(n_layers: int, per_layer: float) -> float:
    return max(3.5, 1.6 + per_layer * n_layers)


def plot_layer_sparsity(run: Run, path: Path) -> None:
    """Horizontal bars of each layer's sparsity, the global sparsity as a dashed line."""
    from matplotlib.ticker import PercentFormatter

    layers = run.layers
    fig = _new_figure(10, _height(len(layers), 0.36))
    ax = fig.add_subplot()
    glob = run.summary.get("sparsity")
    title = f"Layerwise sparsity: {run.name}"
    if not layers:
        _no_data(ax, "no maskable layers in this run")
    else:
        values = [layer.sparsity for layer in layers]
        ax.barh(range(len(layers)), values, height=0.7, color=SPARSITY_COLOR, alpha=0.85)
        _layer_axis(ax, layers)
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("connections pruned (sparsity)")
        ax.grid(axis="x", alpha=0.3)
        small = len(layers) <= 30
        for i, (layer, v) in enumerate(zip(layers, values, strict=True)):
            inside = v > 0.75
            ax.text(
                v - 0.01 if inside else v + 0.01,
                i,
                f"{v:.1%}",
                va="center",
                ha="right" if inside else "left",
                color="white" if inside else "black",
                fontsize=8 if small else 6,
            )
            # kept connections, in a column right of the axes
            ax.text(
                1.02,
                i,
                f"{layer.active:,} / {layer.total:,} kept",
                va="center",
                ha="left",
                transform=ax.get_yaxis_transform(),
                fontsize=8 if small else 6,
                color="0.3",
            )
        if glob is not None:
            ax.axvline(glob, color="black", linestyle="--", linewidth=1.2)
            title += f"\nglobal sparsity {glob:.2%} (dashed line)"
        if all(v == 0 for v in values):
            title += ", dense: nothing pruned"
    ax.set_title(title)
    _save(fig, path)


def _epoch_axis(ax: Axes, metrics: Metrics) -> None:
    """Epoch numbers on the top axis, at the last logged step of each epoch."""
    ends = metrics.epoch_ends()
    if metrics.x_key != "step" or not ends:
        return
    epochs = sorted(ends)
    stride = max(1, math.ceil(len(epochs) / 10))
    chosen = epochs[stride - 1 :: stride]
    top = ax.secondary_xaxis("top")
    top.set_xticks([ends[e] for e in chosen], [str(e + 1) for e in chosen])
    top.set_xlabel("epochs completed", fontsize=9)
    top.tick_params(labelsize=8)


def plot_training_curves(run: Run, path: Path) -> None:
    """Two panels over training steps: sparsity (global and per layer) and accuracy."""
    from matplotlib.ticker import PercentFormatter

    metrics = run.metrics
    fig = _new_figure(10, 7)
    ax_s, ax_a = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1])
    x_label = "optimizer step" if metrics.x_key == "step" else "epoch"

    xs, ys = metrics.series("sparsity/global")
    layer_keys = [
        c
        for c in metrics.columns
        if c.startswith("sparsity/") and c != "sparsity/global" and metrics.series(c)[0]
    ]
    if xs:
        many = len(layer_keys) > 10
        for key in layer_keys:
            lx, ly = metrics.series(key)
            ax_s.plot(
                lx,
                ly,
                linewidth=0.8 if many else 1.2,
                alpha=0.35 if many else 0.8,
                color="0.5" if many else None,
                label=None if many else key.removeprefix("sparsity/"),
            )
        if many:
            ax_s.plot([], [], color="0.5", linewidth=0.8, label=f"{len(layer_keys)} layers")
        ax_s.plot(
            xs,
            ys,
            color="black",
            linewidth=2.2,
            label="global",
            marker="." if len(xs) < 30 else None,
        )
        _annotate_last(ax_s, xs, ys, f"{ys[-1]:.1%}")
        ax_s.set_ylim(-0.02, 1.02)
        ax_s.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax_s.legend(fontsize=8, loc="best")
        ax_s.grid(alpha=0.3)
        _epoch_axis(ax_s, metrics)
    else:
        _no_data(ax_s, "no sparsity/global in metrics.csv (was SparsityMonitor used?)")
    ax_s.set_ylabel("sparsity (pruned)")
    ax_s.set_title(f"Sparsity and accuracy during training: {run.name}")

    vx, vy = metrics.series("val/acc")
    tx, ty = metrics.series("train/acc")
    if vx or tx:
        if tx:
            ax_a.plot(
                tx, ty, color="0.55", linestyle="--", linewidth=1.2, label="train/acc (epoch)"
            )
        if vx:
            ax_a.plot(
                vx, vy, color=ACTIVE_COLOR, linewidth=2, marker="o", markersize=3, label="val/acc"
            )
            _annotate_last(ax_a, vx, vy, f"{vy[-1]:.2%}")
        ax_a.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax_a.set_ylim(top=1.01)
        ax_a.legend(fontsize=8, loc="best")
        ax_a.grid(alpha=0.3)
    else:
        _no_data(ax_a, "no val/acc or train/acc in metrics.csv")
    ax_a.set_ylabel("accuracy")
    ax_a.set_xlabel(x_label)
    _save(fig, path)


def plot_flops(run: Run, path: Path) -> None:
    """Grouped horizontal bars: each layer's dense and effective FLOPs."""
    from matplotlib.ticker import FuncFormatter

    layers = [layer for layer in run.layers if layer.dense_flops is not None]
    fig = _new_figure(10, _height(len(run.layers), 0.5))
    ax = fig.add_subplot()
    dense_total = run.summary.get("dense_flops")
    eff_total = run.summary.get("effective_flops")
    title = "FLOPs per layer (one sample)"
    if dense_total:
        title += f": dense {_compact(dense_total)} -> effective {_compact(eff_total or 0)}"
        title += f" ({(eff_total or 0) / dense_total:.2%})"
    if not layers:
        _no_data(ax, "no per-layer FLOPs in summary.json (FLOPs tracing failed or was off)")
    else:
        dense = [float(layer.dense_flops or 0) for layer in layers]
        eff = [layer.effective_flops or 0.0 for layer in layers]
        ys = range(len(layers))
        ax.barh([y - 0.2 for y in ys], dense, height=0.4, color=DENSE_COLOR, label="dense")
        ax.barh([y + 0.2 for y in ys], eff, height=0.4, color=ACTIVE_COLOR, label="effective")
        _layer_axis(ax, layers)
        positive = [v for v in dense + eff if v > 0]
        log = bool(positive) and max(positive) / min(positive) > LOG_SCALE_SPAN
        if log:
            ax.set_xscale("log")
            ax.set_xlim(min(positive) / 2, max(positive) * 4)
        else:
            ax.set_xlim(0, max(dense + eff + [1.0]) * 1.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
        ax.set_xlabel("FLOPs (multiply-adds, one sample)" + (", log scale" if log else ""))
        ax.grid(axis="x", alpha=0.3, which="both" if log else "major")
        small = len(layers) <= 30
        for y, d, e in zip(ys, dense, eff, strict=True):
            ax.text(d, y - 0.2, f" {_compact(d)}", va="center", fontsize=7 if small else 5)
            share = f" ({e / d:.1%})" if d else ""
            ax.text(
                max(e, min(positive) / 2) if log else e,
                y + 0.2,
                f" {_compact(e)}{share}",
                va="center",
                fontsize=7 if small else 5,
                color=ACTIVE_COLOR,
            )
        ax.legend(loc="best", fontsize=9)
    ax.set_title(title)
    _save(fig, path)


# -- Markdown ------------------------------------------------------------------------------

_HEADLINE = [
    ("val_acc", "Validation accuracy"),
    ("val_acc_top5", "Validation top-5 accuracy"),
    ("val_loss", "Validation loss"),
    ("sparsity", "Sparsity (fraction of connections pruned)"),
    ("active_connections", "Active connections"),
    ("total_connections", "Total maskable connections"),
    ("dense_flops", "Dense FLOPs (one sample)"),
    ("effective_flops", "Effective FLOPs (one sample)"),
    ("flops_ratio", "FLOPs ratio (effective / dense)"),
    ("seed", "Seed"),
    ("epochs", "Epochs"),
    ("global_step", "Optimizer steps"),
    ("train_time_s", "Training time (s)"),
]


def _fmt(key: str, value: Any) -> str:
    """How report.md writes a summary value: integers in full (with thousands separators),
    fractions to 4 decimals, seconds to 2."""
    if value is None:
        return "-"
    if key in _INT_KEYS:
        return f"{int(value):,}"
    if key.endswith("_s"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def _headline_sentence(summary: dict[str, Any]) -> str:
    parts = []
    active, total = summary.get("active_connections"), summary.get("total_connections")
    if active is not None and total:
        kept = f"Kept {active:,} of {total:,} connections ({1 - active / total:.2%} pruned"
        kept += f", {total / active:.1f}x fewer)" if active else ")"
        parts.append(kept)
    dense, eff = summary.get("dense_flops"), summary.get("effective_flops")
    if dense and eff is not None:
        parts.append(f"effective FLOPs {eff / dense:.2%} of dense")
    if summary.get("val_acc") is not None:
        parts.append(f"validation accuracy {summary['val_acc']:.2%}")
    return "; ".join(parts) + "." if parts else ""


def render_markdown(run: Run) -> str:
    """The text of report.md (image links relative to it)."""
    s = dict(run.summary)
    if s.get("dense_flops") and s.get("effective_flops") is not None:
        s["flops_ratio"] = s["effective_flops"] / s["dense_flops"]
    lines = [
        f"# SCL run report: {run.name}",
        "",
        f"Run directory: `{run.directory.resolve()}`  ",
        f"Summary: `{SUMMARY}`, metrics: `{METRICS}`"
        + (
            f", checkpoint: `{_rel(run.checkpoint.path, run.directory)}`"
            f" (epoch {run.checkpoint.epoch}, step {run.checkpoint.global_step})"
            if run.checkpoint
            else ", checkpoint: none"
        )
        + "  ",
        f"Generated by `scl report` on {datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        "",
        _headline_sentence(s),
        "",
        "## Headline",
        "",
        "| metric | key | value |",
        "|---|---|---:|",
    ]
    for key, label in _HEADLINE:
        if key in s:
            lines.append(f"| {label} | `{key}` | {_fmt(key, s[key])} |")
    lines += [
        "",
        "Values from `summary.json` (written at the end of fit); `flops_ratio` is derived. "
        "FLOPs count one multiply-add as one FLOP for one sample, as fvcore does.",
        "",
        "## Layers",
        "",
    ]
    if run.layers:
        lines += [
            "| layer | shape | active | total | sparsity | dense FLOPs | effective FLOPs |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for layer in run.layers:
            shape = "x".join(str(d) for d in layer.shape) or "-"
            eff = layer.effective_flops
            lines.append(
                f"| `{layer.name}` | {shape} | {layer.active:,} | {layer.total:,} | "
                f"{layer.sparsity:.4f} | {_fmt('dense_flops', layer.dense_flops)} | "
                f"{'-' if eff is None else f'{round(eff):,}'} |"
            )
        lines += [
            "",
            "Effective FLOPs of a layer: its dense FLOPs times its fraction of active connections.",
        ]
    else:
        lines.append("No maskable layers.")
    if run.notes:
        lines += ["", "### Cross-check", "", *(f"- {note}" for note in run.notes)]
    lines += [
        "",
        "## Plots",
        "",
        "### Layerwise sparsity",
        "",
        f"![Layerwise sparsity]({IMAGES['layer_sparsity']})",
        "",
        "Fraction of each layer's connections pruned at the end of training; the dashed line is "
        "the global sparsity.",
        "",
        "### Sparsity and accuracy during training",
        "",
        f"![Sparsity and accuracy during training]({IMAGES['training_curves']})",
        "",
        "Top: global sparsity (black) and each layer's, from `metrics.csv`. Bottom: validation "
        "accuracy (and training accuracy per epoch).",
        "",
        "### FLOPs per layer",
        "",
        f"![Dense vs effective FLOPs per layer]({IMAGES['flops']})",
        "",
        "Dense FLOPs (grey) and effective FLOPs under the final masks (blue), one sample.",
    ]
    hparams = {
        k: v
        for k, v in (run.checkpoint.hparams.items() if run.checkpoint else [])
        if not k.startswith("_") and (v is None or isinstance(v, (str, int, float, bool)))
    }
    if hparams:
        lines += [
            "",
            "<details><summary>Hyper-parameters (from the checkpoint)</summary>",
            "",
            "| name | value |",
            "|---|---|",
            *(f"| `{k}` | `{v}` |" for k, v in sorted(hparams.items())),
            "",
            "</details>",
        ]
    return "\n".join(lines) + "\n"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


# -- writing -------------------------------------------------------------------------------


def _candidates(out: Path) -> Iterator[Path]:
    yield out
    n = 1
    while True:
        yield out.with_name(f"{out.name}-{n}")
        n += 1


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
        (tmp / "report.md").write_text(render_markdown(run), encoding="utf-8")
        for candidate in _candidates(target):
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


# -- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Plot a finished run (layerwise sparsity, sparsity and accuracy over training, dense "
            "vs effective FLOPs per layer) and write a Markdown summary beside the plots."
        ),
        epilog=(
            "An existing report is never overwritten: if the output directory exists and is not "
            "empty, the next free DIR-1, DIR-2, ... is used."
        ),
    )
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a finished run's directory, holding summary.json and metrics.csv "
        "(e.g. runs/digits_mlp/version_0)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/report)"
    )
    parser.add_argument(
        "--ckpt",
        metavar="PATH",
        default=None,
        help="checkpoint to cross-check masks against (default: RUN_DIR's last checkpoint)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scl report``; returns the exit status (0, or 2 on an error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed by argparse)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        run = load_run(args.run_dir, args.ckpt)
        wanted = Path(args.out) if args.out is not None else run.directory / "report"
        out = write_report(run, wanted)
    except ReportError as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for note in run.notes:
        if note.startswith(("**Mismatch**", "Warning: ")):
            text = note.removeprefix("Warning: ").replace("**", "")
            print(f"{PROG}: warning: {text}", file=sys.stderr)
    if out != wanted:
        print(f"{PROG}: {wanted} already exists; wrote a new report beside it instead")
    print(f"{PROG}: report written to {out}")
    for name in ("report.md", *IMAGES.values()):
        print(f"  {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
