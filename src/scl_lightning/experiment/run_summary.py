"""RunSummary: a table on the terminal and summary.json in the run directory at the end of fit."""

from __future__ import annotations

import json
import os
import time
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from scl_lightning._utils import next_free_path
from scl_lightning.deploy.export import atomic_file
from scl_lightning.nn.coverage import coverage
from scl_lightning.nn.flops import example_from_batch, flop_counts
from scl_lightning.nn.stats import connectivity

__all__ = ["RunSummary", "format_summary"]


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, Tensor):
        return float(value.detach().cpu()) if value.numel() == 1 else None
    return None if value is None else float(value)


#: spellings of the validation accuracy and loss looked for, in order, when not given
_VAL_ACC_KEYS = ("val/acc", "val_acc", "val/accuracy", "val_accuracy", "valid/acc", "val/acc1")
_VAL_LOSS_KEYS = ("val/loss", "val_loss", "valid/loss", "validation_loss")
#: ... and of the test accuracy and loss
_TEST_ACC_KEYS = ("test/acc", "test_acc", "test/accuracy", "test_accuracy", "test/acc1")
_TEST_LOSS_KEYS = ("test/loss", "test_loss")

#: ``test_split`` of a summary, from the data module's ``held_out_test``
TEST_HELD_OUT = "held out: read by neither training nor validation, never used for tuning"
TEST_NOT_DECLARED = (
    "not declared held out by the data module (no held_out_test): may be the validation split"
)


def _scalars(metrics: dict[str, Any], prefixes: str | tuple[str, ...]) -> dict[str, float]:
    """The scalar metrics whose names start with ``prefixes``, by name."""
    return {
        key: value
        for key in sorted(metrics)
        if key.startswith(prefixes) and (value := _metric(metrics, key)) is not None
    }


def _first_present(metrics: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in metrics), None)


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
        "test_acc",
        "test_loss",
        "test_split",
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
    cover = summary.get("coverage")
    if cover:
        dense = cover["dense_layers"]
        layers = cover["masked_layers"] + len(dense)
        lines.append(
            f"{'coverage':<{width}}  {cover['masked_layers']} of {layers} weight layers masked, "
            f"{cover['share_not_masked']:.1%} of parameters not under SCL"
        )
        lines += [f"  dense: {d['name'] or '(root)'} ({d['reason']}: {d['detail']})" for d in dense]
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
    """At the end of ``fit``, print a summary table and write it as JSON in the run directory;
    a test of the fitted model that follows adds its results.

    The JSON holds ``val_acc``, ``val_loss`` (and ``val_acc_top5`` when logged), ``sparsity``,
    ``active_connections``, ``total_connections`` (over the masked layers, as
    :class:`~scl_lightning.nn.Connectivity` defines them), ``sparsity_including_dense``,
    ``dense_flops`` and ``effective_flops`` (one sample, fvcore's convention; the same trace as
    :class:`~scl_lightning.callbacks.SparsityMonitor`'s), ``seed`` (from ``seed_everything``),
    ``coverage`` (:meth:`scl_lightning.nn.Coverage.as_dict`: masked layers, each weight layer
    left dense with why, the share of the parameters not under SCL; ``None`` for a network with
    no maskable layer), ``epochs``, ``global_step``, ``train_time_s``, ``metrics`` (every
    scalar ``val*``/``test*`` metric the module logged, under its own name) and one entry per
    maskable layer. Dense models
    report sparsity 0. The run directory is ``trainer.log_dir`` (the first logger's version
    directory); an existing file is never overwritten: a numbered name is used instead.

    ``val_acc`` and ``val_loss`` are read from ``val_acc_key`` and ``val_loss_key``, or, when
    those are not given, from the first of the usual spellings the module logged (``val/acc``,
    ``val_acc``, ``val/accuracy``, ...; ``val/loss``, ``val_loss``, ...), so other people's
    modules get them too; ``None`` when the module logs none of them.

    When the same Trainer then tests the model it has just fitted (``trainer.test(model)``
    with no ``ckpt_path``, as ``scl fit`` does on a held-out test split), the same file is
    rewritten with ``test_acc``, ``test_loss`` (``test_acc_top5``), the ``test*`` metrics and
    ``test_split``: whether the data module declares its test split held out
    (``held_out_test``), i.e. never read by training or validation and so never used for
    tuning. A test of another checkpoint or model leaves the summary alone.

    Args:
        filename: name of the JSON file, e.g. ``summary.json``.
        print_table: print the table on rank zero.
        val_acc_key: the logged key of the validation accuracy (``None``: look for it).
        val_loss_key: the logged key of the validation loss (``None``: look for it).
        table_after_test: print the table when the test that follows ``fit`` ends, with its
            results, instead of at the end of ``fit`` (``scl fit`` sets it when it tests); a
            test that is not the fitted model's, or runs no batch, prints the fit's table.

    Raises:
        ValueError: if ``filename`` does not end in ``.json`` or contains a directory, or a
            metric key or ``table_after_test`` is of the wrong type.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[RunSummary()], logger=False)
    """

    def __init__(
        self,
        filename: str = "summary.json",
        print_table: bool = True,
        val_acc_key: str | None = None,
        val_loss_key: str | None = None,
        table_after_test: bool = False,
    ) -> None:
        if (
            not isinstance(filename, str)
            or not filename.endswith(".json")
            or Path(filename).name != filename
        ):
            raise ValueError(f"filename must be a bare file name ending in .json, got {filename!r}")
        for name, key in (("val_acc_key", val_acc_key), ("val_loss_key", val_loss_key)):
            if key is not None and (not isinstance(key, str) or not key):
                raise ValueError(f"{name} must be a logged metric's name or None, got {key!r}")
        if not isinstance(table_after_test, bool):
            raise ValueError(f"table_after_test must be True or False, got {table_after_test!r}")
        self.filename = filename
        self.print_table = print_table
        self.val_acc_key = val_acc_key
        self.val_loss_key = val_loss_key
        self.table_after_test = table_after_test
        self.path: Path | None = None
        self.summary: dict[str, Any] | None = None
        self._example: Tensor | None = None
        self._start = 0.0
        self._fitted: weakref.ref[pl.LightningModule] | None = None
        self._table_pending = False

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
        conn = connectivity(pl_module)
        dense_flops = effective_flops = None
        layer_flops: dict[str, int] = {}
        example = pl_module.example_input_array
        if not isinstance(example, Tensor):
            example = self._example
        if example is not None and conn.layers:
            try:
                counts = flop_counts(pl_module, example)
                dense_flops = counts.total
                effective_flops, _ = counts.effective(conn.densities())
                layer_flops = counts.layers
            except Exception as err:  # other people's modules may not trace
                rank_zero_warn(f"RunSummary: FLOPs tracing failed ({type(err).__name__}: {err})")
        seed = os.environ.get("PL_GLOBAL_SEED")
        acc_key = self.val_acc_key or _first_present(metrics, _VAL_ACC_KEYS)
        loss_key = self.val_loss_key or _first_present(metrics, _VAL_LOSS_KEYS)
        summary: dict[str, Any] = {
            "val_acc": _metric(metrics, acc_key) if acc_key else None,
            "val_loss": _metric(metrics, loss_key) if loss_key else None,
        }
        if "val/acc_top5" in metrics:
            summary["val_acc_top5"] = _metric(metrics, "val/acc_top5")
        summary.update(
            sparsity=conn.sparsity,
            active_connections=conn.active,
            total_connections=conn.total,
            sparsity_including_dense=conn.sparsity_including_dense,
            dense_flops=dense_flops,
            effective_flops=effective_flops,
            seed=int(seed) if seed is not None else None,
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            train_time_s=round(time.perf_counter() - self._start, 2) if self._start else None,
            metrics=_scalars(metrics, ("val", "test")),
            coverage=coverage(pl_module).as_dict() if conn.layers else None,
            layers=[
                {
                    "name": c.name,
                    "shape": list(c.shape),
                    "active": c.active,
                    "total": c.total,
                    "sparsity": c.sparsity,
                    "masked": c.masked,
                    "dense_flops": layer_flops.get(c.name),
                }
                for c in conn.layers
            ],
        )
        return summary

    def _test_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        """What a test of the fitted model adds to the summary."""
        metrics = dict(trainer.callback_metrics)
        acc_key = _first_present(metrics, _TEST_ACC_KEYS)
        loss_key = _first_present(metrics, _TEST_LOSS_KEYS)
        held_out = getattr(getattr(trainer, "datamodule", None), "held_out_test", None)
        results: dict[str, Any] = {
            "test_acc": _metric(metrics, acc_key) if acc_key else None,
            "test_loss": _metric(metrics, loss_key) if loss_key else None,
        }
        if "test/acc_top5" in metrics:
            results["test_acc_top5"] = _metric(metrics, "test/acc_top5")
        results["test_split"] = TEST_HELD_OUT if held_out is True else TEST_NOT_DECLARED
        return results

    def _write(self) -> None:
        assert self.path is not None
        with atomic_file(self.path, overwrite=True, who="RunSummary") as tmp:
            tmp.write_text(json.dumps(self.summary, indent=2) + "\n")

    def _print(self) -> None:
        print(f"\n{format_summary(self.summary or {})}\n\nsummary written to {self.path}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `trainer.log_dir` broadcasts from rank zero: every rank must read it (under DDP a rank
        # that returned first would leave rank zero waiting or failing).
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        self.summary = self.build(trainer, pl_module)
        self._fitted = weakref.ref(pl_module)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = next_free_path(directory / self.filename)
        self._write()
        # with table_after_test, the table waits for the end of the test (see teardown)
        self._table_pending = self.print_table and self.table_after_test
        if self.print_table and not self.table_after_test:
            self._print()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.summary is None or self.path is None:
            return
        fitted = self._fitted() if self._fitted is not None else None
        if (
            pl_module is not fitted
            or trainer.ckpt_path is not None
            or trainer.global_step != self.summary["global_step"]
        ):
            return  # another model's test, or a checkpoint's: not the fitted model's
        # the test's figures next to the validation's; its metrics join the others
        first = ("val_acc", "val_loss", "val_acc_top5")
        rest = {k: v for k, v in self.summary.items() if k not in first}
        rest["metrics"] = {**rest.get("metrics", {}), **_scalars(trainer.callback_metrics, "test")}
        self.summary = {
            **{k: v for k, v in self.summary.items() if k in first},
            **self._test_results(trainer),
            **rest,
        }
        self._write()
        if self.print_table and not self._table_pending:
            print(f"test results added to {self.path}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # at the end of the test even when it ran no batch (limit_test_batches=0) or was not the
        # fitted model's: the table is printed once, with whatever the summary holds
        if stage == "test" and self._table_pending and trainer.is_global_zero:
            self._table_pending = False
            self._print()
