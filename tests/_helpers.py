"""Helpers shared by the test files (not a test module: pytest collects only ``test_*.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback


def quiet_trainer(tmp_path: Path, **overrides: Any) -> Trainer:
    """A small, silent CPU Trainer in the style of Lightning's own callback tests: one epoch of
    three batches, no logger, checkpoints, progress bar or model summary; ``overrides`` win."""
    settings: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 3,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
    }
    settings.update(overrides)
    return Trainer(**settings)


class SlowDown(Callback):
    """Sleeps after every training batch, so a test can kill a run while it trains. Changes no
    number: the run's results are those of a run without it."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)
