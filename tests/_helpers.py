"""Helpers shared by the test files (not a test module: pytest collects only ``test_*.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def launch_ddp(script: Path, *args: str, timeout: float = 180) -> tuple[int, str]:
    """Run a 2-process CPU DDP worker script (it launches its second rank itself, through
    Lightning) with ``src`` importable and W&B off; returns the exit status and the output. The
    script gets a session of its own, so a hang (a rank waiting in a collective) is killed whole
    at ``timeout`` and fails the test instead of blocking it."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("PL_GLOBAL_SEED", None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(
            f"{script.name} {' '.join(args)} hung for {timeout}s:\n{output[-3000:]}"
        ) from None
    return proc.returncode, output
