"""PlainProgressBar: progress as one line per epoch, for output that is not a terminal."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

__all__ = ["PlainProgressBar"]


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgressBar(ProgressBar):
    """Training progress as plain lines: one per epoch, nothing per batch.

    Lightning's ``TQDMProgressBar`` redraws its bar after every batch with a carriage return.
    On a terminal that is one line that moves; written to a pipe or a file (``scl fit ... |
    tee log``, a cluster job's output) every redraw stays, about 9 KB per digits epoch. This
    progress bar writes a line when a training epoch ends, with the epoch, the global step, the
    time, and the metrics logged with ``prog_bar=True`` (the values the bar would show,
    validation's included, sorted by name), and, in an epoch longer than ``every_n_seconds``, a
    line at most that often.
    The sanity check and the validation inside ``fit`` write nothing of their own (their
    metrics are on the epoch's line); a ``validate``, ``test`` or ``predict`` run writes one
    line when it ends. Lines go to ``sys.stdout``, flushed, and only on rank zero.

    ``scl fit`` uses it instead of Lightning's bar when its standard output is not a terminal,
    unless the configuration has a progress bar of its own (``--trainer.callbacks+=
    lightning.pytorch.callbacks.TQDMProgressBar`` keeps the bar) or turns it off
    (``--trainer.enable_progress_bar false``).

    Args:
        every_n_seconds: in an epoch that lasts longer, also write a line at most this often
            (``0``: at the end of epochs only).

    Raises:
        ValueError: if ``every_n_seconds`` is negative or not a number.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[PlainProgressBar()], logger=False)

    A line, on the digits recipe::

        Epoch 39/39 | step 920 | 0.2 s (6.7 s total) | lam=2e-05, sparsity/global=0.9353,
        train/loss=0.07803, train/task_loss=0.01311, val/acc=0.975, val/loss=0.09643
    """

    def __init__(self, every_n_seconds: float = 60.0) -> None:
        super().__init__()
        if (
            isinstance(every_n_seconds, bool)
            or not isinstance(every_n_seconds, (int, float))
            or not math.isfinite(every_n_seconds)
            or every_n_seconds < 0
        ):
            raise ValueError(
                f"every_n_seconds must be a finite number >= 0, got {every_n_seconds!r}"
            )
        self.every_n_seconds = float(every_n_seconds)
        self._enabled = True
        self._fit_start = 0.0
        self._epoch_start = 0.0
        self._epoch_total: int | float | None = None
        self._last_line = 0.0
        self._loop_start = 0.0
        self._batches = 0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, file=sys.stdout, flush=True)

    @override
    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        """The progress bar's metrics, without the logger's version (``v_num``): a plain
        line is read in the run's own log, where the version is known."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _epoch(self, trainer: pl.Trainer) -> str:
        epoch = f"Epoch {trainer.current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            epoch += f"/{trainer.max_epochs - 1}"  # Lightning counts epochs from 0
        return epoch

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        # sorted: every line of a log lists its values in the same order (the bar's follows
        # when each key was first logged), and a namespace's keys stand together
        metrics = self.get_metrics(trainer, pl_module)
        return ", ".join(f"{key}={_value(metrics[key])}" for key in sorted(metrics))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.monotonic()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()
        # read now: with max_steps, Lightning's count shrinks to the steps left as the run goes
        self._epoch_total = self.total_train_batches

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._enabled or not self.every_n_seconds:
            return
        now = time.monotonic()
        if now - self._last_line < self.every_n_seconds:
            return
        self._last_line = now
        total = self._epoch_total
        of = f"/{total}" if isinstance(total, int) and total > 0 else ""
        self.print(
            f"{self._epoch(trainer)} | step {trainer.global_step} | batch {batch_idx + 1}{of} | "
            f"{_seconds(now - self._epoch_start)} | {self._metrics(trainer, pl_module)}"
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        self.print(
            f"{self._epoch(trainer)} | step {trainer.global_step} | "
            f"{_seconds(now - self._epoch_start)} ({_seconds(now - self._fit_start)} total) | "
            f"{self._metrics(trainer, pl_module)}"
        )

    def _start_loop(self) -> None:
        self._loop_start = time.monotonic()
        self._batches = 0

    def _end_loop(self, description: str) -> None:
        if self._enabled:
            seconds = _seconds(time.monotonic() - self._loop_start)
            self.print(f"{description}: {self._batches} batches, {seconds}")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_loop()

    @override
    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._batches += 1

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not inside fit: its epoch line has it
            self._end_loop(self.validation_description)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_loop()

    @override
    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._batches += 1

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_loop(self.test_description)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_loop()

    @override
    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._batches += 1

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_loop(self.predict_description)
