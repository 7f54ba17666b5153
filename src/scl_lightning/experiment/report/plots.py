"""The report's figures, drawn with matplotlib on bare ``Figure`` objects (no pyplot state, no
display) and saved as PNGs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .run import LayerStats, Metrics, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["IMAGES", "plot_flops", "plot_layer_sparsity", "plot_training_curves"]

#: the file name of each figure in the report directory
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
