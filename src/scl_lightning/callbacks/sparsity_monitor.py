"""SparsityMonitor: layerwise sparsity and dense/effective FLOPs, to any logger."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from scl_lightning.callbacks._logging import active_wandb_loggers, logs_this_step
from scl_lightning.nn.flops import FlopCounts, example_for, flop_counts
from scl_lightning.nn.stats import connectivity

__all__ = ["SparsityMonitor"]

#: columns of :meth:`SparsityMonitor.layer_table` and of the W&B table ``sparsity/layers``
LAYER_COLUMNS = (
    "layer",
    "shape",
    "connections",
    "active",
    "sparsity",
    "dense_flops",
    "effective_flops",
)


def _epoch_end_step(trainer: pl.Trainer) -> int:
    """The step Lightning logs a training epoch's end metrics at (one less than the optimizer
    steps taken so far: see ``FitLoop.on_advance_end``), so W&B media line up with them."""
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    return max(int(stepped) - 1, 0)


class SparsityMonitor(Callback):
    """Log global and layerwise sparsity, and dense and effective FLOPs, during training.

    Logged at the Trainer's logging steps (every ``Trainer(log_every_n_steps=...)`` optimizer
    steps, or every ``log_every_n_steps`` of this callback when that is larger), straight to
    every logger of the Trainer (as Lightning's ``LearningRateMonitor`` does; the progress bar
    shows ``sparsity/global``), and at each training epoch end through ``pl_module.log``, so the
    epoch values are also in ``trainer.callback_metrics`` for checkpointing and early stopping:

    * ``sparsity/global`` (also in the progress bar): the fraction of the masked layers'
      connections that are pruned (:class:`~scl_lightning.nn.Connectivity`), and, when some
      maskable layers are left dense, ``sparsity/global_including_dense`` over all of them;
    * ``sparsity/<layer>`` for each maskable layer;
    * ``flops/dense`` and ``flops/effective`` (one sample's forward pass; one multiply-add counts
      as one FLOP, as fvcore counts), ``flops/ratio`` (effective / dense), and
      ``flops/effective/<layer>`` with ``log_layers``.

    Dense FLOPs are traced with fvcore once, on the first training batch (or ``example_input``,
    or the module's ``example_input_array``), never per step; effective FLOPs scale each masked
    layer's dense count by its active fraction. Layers that are not masked count as fully active,
    so the monitor also works on dense baselines. Works with any LightningModule.

    With a W&B logger (Lightning's ``WandbLogger`` or
    :class:`scl_lightning.experiment.loggers.WandbLogger`) among the Trainer's loggers, each
    training epoch end also logs, on rank zero, at the
    ``trainer/global_step`` of that epoch's end metrics:

    * ``sparsity/layers``: a ``wandb.Table`` with one row per layer and the columns of
      :meth:`layer_table` (``dense_flops``/``effective_flops`` are empty without FLOPs);
    * ``sparsity/layers_bar``: a bar chart of each layer's sparsity (its data is logged by
      W&B as the table ``sparsity/layers_bar_table``).

    Other loggers get the scalars only, and ``wandb`` is then never imported.

    Args:
        log_every_n_steps: logging interval in optimizer steps, ``>= 1``; ``None`` follows the
            Trainer's ``log_every_n_steps``. Lightning writes step metrics to the loggers only
            at its own logging steps, so an interval that is not a multiple of the Trainer's is
            rounded up to the next multiple (with a warning) rather than logged stale.
        log_layers: also log one scalar per layer.
        flops: trace and log FLOPs.
        example_input: an input batch for tracing (its first sample is traced).
        wandb_table: log the W&B per-layer table and bar chart when a W&B logger is present.

    Raises:
        ValueError: for a non-positive ``log_every_n_steps``.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[SparsityMonitor(log_every_n_steps=10)], logger=False)
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        log_layers: bool = True,
        flops: bool = True,
        example_input: Tensor | None = None,
        wandb_table: bool = True,
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be an integer >= 1, got {log_every_n_steps!r}"
            )
        self.log_every_n_steps = log_every_n_steps
        self._interval = 1  # optimizer steps between logs, resolved against the Trainer
        self.log_layers = log_layers
        self.flops = flops
        self.example_input = example_input
        self.wandb_table = wandb_table
        self.flop_counts: FlopCounts | None = None
        self._flops_failed = False
        self._last_logged_step = -1

    # -- statistics ------------------------------------------------------------------------

    def compute(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """The metrics this callback logs, for the module's current masks."""
        conn = connectivity(pl_module)
        if not conn.layers:
            return {}
        metrics: dict[str, float] = {"sparsity/global": conn.sparsity}
        if conn.total != conn.total_including_dense:
            # some layers are left dense: the whole network's figure, under its own name
            metrics["sparsity/global_including_dense"] = conn.sparsity_including_dense
        if self.log_layers:
            metrics.update({f"sparsity/{c.name}": c.sparsity for c in conn.layers})
        if self.flop_counts is not None:
            eff_total, eff_layers = self.flop_counts.effective(conn.densities())
            metrics["flops/dense"] = float(self.flop_counts.total)
            metrics["flops/effective"] = float(eff_total)
            metrics["flops/ratio"] = eff_total / max(self.flop_counts.total, 1)
            if self.log_layers:
                metrics.update({f"flops/effective/{n}": f for n, f in eff_layers.items()})
        return metrics

    def layer_table(self, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        """One row per maskable layer, with the keys of ``LAYER_COLUMNS``: qualified ``layer``
        name, weight ``shape`` (e.g. ``"300x64"``), ``connections`` (weights), ``active``
        (unmasked weights), ``sparsity``, and one sample's ``dense_flops`` and
        ``effective_flops`` (``None`` until FLOPs are traced, or with ``flops=False``)."""
        conn = connectivity(pl_module)
        counts = self.flop_counts
        effective: dict[str, float] = {}
        if counts is not None:
            _, effective = counts.effective(conn.densities())
        return [
            {
                "layer": c.name,
                "shape": "x".join(str(s) for s in c.shape),
                "connections": c.total,
                "active": c.active,
                "sparsity": c.sparsity,
                "dense_flops": counts.layers.get(c.name) if counts is not None else None,
                "effective_flops": effective.get(c.name),
            }
            for c in conn.layers
        ]

    def _log_wandb(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.wandb_table or not trainer.is_global_zero:
            return
        loggers = active_wandb_loggers(trainer.loggers)
        if not loggers:
            return
        rows = self.layer_table(pl_module)
        if not rows:
            return
        import wandb  # only here: other loggers must work without it

        data = [[row[c] for c in LAYER_COLUMNS] for row in rows]
        bar_data = [[row["layer"], row["sparsity"]] for row in rows]
        for logger in loggers:
            # through the logger, so its prefix and the `trainer/global_step` axis apply
            table = wandb.Table(columns=list(LAYER_COLUMNS), data=data)
            bar = wandb.plot.bar(
                wandb.Table(columns=["layer", "sparsity"], data=bar_data),
                "layer",
                "sparsity",
                title="Layerwise sparsity",
            )
            media: dict[str, Any] = {"sparsity/layers": table, "sparsity/layers_bar": bar}
            logger.log_metrics(media, step=_epoch_end_step(trainer))

    def _trace(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self.flops or self.flop_counts is not None or self._flops_failed:
            return
        example = example_for(pl_module, batch, self.example_input)
        if example is None:
            self._flops_failed = True
            rank_zero_warn(
                "SparsityMonitor: cannot find an input tensor in the batch to trace "
                "FLOPs; pass `example_input`. Logging sparsity only."
            )
            return
        try:
            # one sample's FLOPs, even when example_input_array is a batch; traced once per
            # model and input shape, and shared with the run summary
            self.flop_counts = flop_counts(pl_module, example)
        except Exception as err:  # tracing other people's modules can fail in many ways
            self._flops_failed = True
            rank_zero_warn(
                f"SparsityMonitor: FLOPs tracing failed ({type(err).__name__}: {err}); "
                "logging sparsity only. Pass `example_input` or set `flops=False`."
            )

    def _log(self, pl_module: pl.LightningModule, **kwargs: Any) -> None:
        metrics = self.compute(pl_module)
        glob = metrics.pop("sparsity/global", None)
        if glob is not None:
            pl_module.log("sparsity/global", glob, prog_bar=True, **kwargs)
        if metrics:
            pl_module.log_dict(metrics, **kwargs)

    def _log_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The step-level log: straight to the loggers, as Lightning's ``LearningRateMonitor``
        does, at the step Lightning writes this batch's own metrics at.

        Not through ``pl_module.log``: a key logged there stays in Lightning's result collection
        for the rest of the epoch and is gathered again after every batch, logging or not, which
        for one value per layer costs more than the monitor's own work. Only ``sparsity/global``
        goes there, for the progress bar. Rank zero only: other ranks' loggers write nothing and
        their masks are the same.
        """
        if not trainer.is_global_zero:
            return
        metrics = self.compute(pl_module)
        if not metrics:
            return
        pl_module.log(
            "sparsity/global",
            metrics["sparsity/global"],
            prog_bar=True,
            logger=False,
            on_step=True,
            on_epoch=False,
        )
        if trainer.loggers:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            row = {**metrics, "epoch": trainer.current_epoch}
            for logger in trainer.loggers:
                logger.log_metrics(row, step=step)

    # -- hooks -----------------------------------------------------------------------------

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._trace(pl_module, batch)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer_every = max(int(trainer.log_every_n_steps), 1)  # type: ignore[attr-defined]
        wanted = self.log_every_n_steps or trainer_every
        self._interval = -(-wanted // trainer_every) * trainer_every  # round up to a multiple
        if self._interval != wanted:
            rank_zero_warn(
                f"SparsityMonitor: log_every_n_steps={wanted} is not a multiple of the Trainer's "
                f"log_every_n_steps={trainer_every}, whose steps are the only ones Lightning "
                f"writes to the loggers; logging every {self._interval} steps instead"
            )

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not logs_this_step(trainer):
            return
        step = trainer.global_step
        # once per multiple of the interval, and at the first logging step
        if self._last_logged_step >= 0 and (
            step // self._interval == self._last_logged_step // self._interval
        ):
            return
        self._last_logged_step = step
        self._log_step(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Identical on every rank (DDP keeps the masks in agreement); sync_dist reduces them
        # once per epoch, cheaply, and keeps Lightning from warning about epoch-level logs.
        self._log(pl_module, on_step=False, on_epoch=True, sync_dist=True)
        self._log_wandb(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self._last_logged_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))
