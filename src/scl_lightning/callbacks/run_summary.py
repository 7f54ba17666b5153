"""RunSummary: a table on the terminal and summary.json in the run directory at the end of fit."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from scl_lightning.flops import count_flops, example_from_batch, maskable_connectivity

__all__ = ["RunSummary", "format_summary"]


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, Tensor):
        return float(value.detach().cpu())
    return None if value is None else float(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The terminal table of a summary dict (global figures, then one row per layer)."""

    def fmt(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float) and key.endswith("_s"):
            return f"{v:.1f}"
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    keys = [
        "val_acc",
        "val_loss",
        "sparsity",
        "active_connections",
        "total_connections",
        "dense_flops",
        "effective_flops",
        "epochs",
        "train_time_s",
        "seed",
    ]
    width = max(len(k) for k in keys)
    lines = ["SCL run summary", "-" * 40]
    lines += [f"{k:<{width}}  {fmt(k, summary.get(k))}" for k in keys if k in summary]
    layers = summary.get("layers") or []
    if layers:
        name_w = max(5, *(len(layer["name"]) for layer in layers))
        lines += [
            "",
            f"{'layer':<{name_w}}  {'shape':<18} {'active':>10} {'total':>10} {'sparsity':>9}",
        ]
        for layer in layers:
            shape = "x".join(str(s) for s in layer["shape"])
            lines.append(
                f"{layer['name']:<{name_w}}  {shape:<18} {layer['active']:>10,} "
                f"{layer['total']:>10,} {layer['sparsity']:>9.4f}"
            )
    return "\n".join(lines)


class RunSummary(Callback):
    """At the end of ``fit``, print a summary table and write it as JSON in the run directory.

    The JSON holds ``val_acc``, ``val_loss`` (and ``val_acc_top5`` when logged), ``sparsity``,
    ``active_connections``, ``total_connections``, ``dense_flops`` and ``effective_flops`` (one
    sample, fvcore's convention), ``seed`` (from ``seed_everything``), ``epochs``,
    ``global_step``, ``train_time_s`` and one entry per maskable layer. Dense models report
    sparsity 0. The run directory is ``trainer.log_dir`` (the first logger's version directory);
    an existing file is never overwritten: a numbered name is used instead.

    Args:
        filename: name of the JSON file, e.g. ``summary.json``.
        print_table: print the table on rank zero.

    Raises:
        ValueError: if ``filename`` does not end in ``.json`` or contains a directory.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[RunSummary()], logger=False)
    """

    def __init__(self, filename: str = "summary.json", print_table: bool = True) -> None:
        if (
            not isinstance(filename, str)
            or not filename.endswith(".json")
            or Path(filename).name != filename
        ):
            raise ValueError(f"filename must be a bare file name ending in .json, got {filename!r}")
        self.filename = filename
        self.print_table = print_table
        self.path: Path | None = None
        self.summary: dict[str, Any] | None = None
        self._example: Tensor | None = None
        self._start = 0.0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None:
            example = example_from_batch(batch)
            self._example = example.detach().clone() if example is not None else None

    def build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The summary dict for the module's current state and the trainer's last metrics."""
        metrics = dict(trainer.callback_metrics)
        conn = maskable_connectivity(pl_module)
        active = sum(a for a, _ in conn.values())
        total = sum(t for _, t in conn.values())
        dense_flops = effective_flops = None
        layer_flops: dict[str, int] = {}
        example = pl_module.example_input_array
        if not isinstance(example, Tensor):
            example = self._example
        if example is not None and conn:
            try:
                counts = count_flops(pl_module, example.to(pl_module.device))
                dense_flops = counts.total
                effective_flops, _ = counts.effective({n: a / t for n, (a, t) in conn.items()})
                layer_flops = counts.layers
            except Exception as err:  # other people's modules may not trace
                rank_zero_warn(f"RunSummary: FLOPs tracing failed ({type(err).__name__}: {err})")
        seed = os.environ.get("PL_GLOBAL_SEED")
        summary: dict[str, Any] = {
            "val_acc": _metric(metrics, "val/acc"),
            "val_loss": _metric(metrics, "val/loss"),
        }
        if "val/acc_top5" in metrics:
            summary["val_acc_top5"] = _metric(metrics, "val/acc_top5")
        summary.update(
            sparsity=1.0 - active / total if total else 0.0,
            active_connections=active,
            total_connections=total,
            dense_flops=dense_flops,
            effective_flops=effective_flops,
            seed=int(seed) if seed is not None else None,
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            train_time_s=round(time.perf_counter() - self._start, 2) if self._start else None,
            layers=[
                {
                    "name": n,
                    "shape": list(cast(Tensor, pl_module.get_submodule(n).weight).shape),
                    "active": a,
                    "total": t,
                    "sparsity": 1.0 - a / t,
                    "dense_flops": layer_flops.get(n),
                }
                for n, (a, t) in conn.items()
            ],
        )
        return summary

    def _free_path(self, directory: Path) -> Path:
        path = directory / self.filename
        stem, n = path.stem, 1
        while path.exists():
            path = directory / f"{stem}-{n}.json"
            n += 1
        return path

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `trainer.log_dir` broadcasts from rank zero: every rank must read it (under DDP a rank
        # that returned first would leave rank zero waiting or failing).
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        self.summary = self.build(trainer, pl_module)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = self._free_path(directory)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        tmp.replace(self.path)
        if self.print_table:
            print(f"\n{format_summary(self.summary)}\n\nsummary written to {self.path}")
