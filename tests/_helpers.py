"""Helpers shared by the test files (not a test module: pytest collects only ``test_*.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


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


class TinyClassifier(LightningModule):
    """A classifier written with no SCL in mind: a 64-16-10 MLP on 1x8x8 inputs, cross-entropy,
    plain SGD over every parameter (``lr=0`` keeps hand-set masks where they are), and
    ``samples`` fixed random training examples in batches of 8. ``sparse=True`` masks it."""

    def __init__(self, lr: float = 0.1, samples: int = 64, sparse: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        if sparse:
            from scl_lightning import sparsify

            sparsify(self.net)
        self.lr = lr
        self.samples = samples

    def forward(self, x: Any) -> Any:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def _loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.samples, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (self.samples,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def train_dataloader(self) -> DataLoader:
        return self._loader()


# -- the `scl` command -------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = str(CONFIGS / "digits_mlp.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
#: a few batches of one epoch: the cheapest `scl fit` that checkpoints and validates
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
]


def prune_randomly(
    model: nn.Module, keep: float = 0.1, dead_rows: float = 0.3, seed: int = 0
) -> None:
    """Random masks: about ``keep`` of the connections, and whole units cut off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "mask"):
                on = torch.rand(module.mask.shape, generator=g) < keep
                module.mask.copy_(torch.where(on, 1.0, -1.0))
                module.mask[torch.rand(module.mask.shape[0], generator=g) < dead_rows] = -1.0
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                # trained-looking statistics: a dead channel's constant is then nonzero
                module.running_mean.uniform_(-1, 1, generator=g)
                module.running_var.uniform_(0.5, 2, generator=g)
                module.bias.data.uniform_(-1, 1, generator=g)


def pruned_net(name: str, shape: tuple[int, ...], **kwargs) -> nn.Module:
    """A registry network, masked, with random masks (``prune_randomly``), in eval mode."""
    from scl_lightning import sparsify
    from scl_lightning.models import create_model

    torch.manual_seed(0)
    model = sparsify(create_model(name, input_shape=shape))
    prune_randomly(model, **kwargs)
    return model.eval()
