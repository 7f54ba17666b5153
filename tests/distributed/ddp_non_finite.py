"""Worker script for test_non_finite_ddp.py: a 2-process CPU DDP fit with StopOnNonFinite.

Run as ``python ddp_non_finite.py OUT_DIR CHECK_GRADIENTS``. The training loss turns nan on rank 1
only, at optimizer step ``NAN_STEP``. Each rank writes ``rank{r}.json`` (its error message and
last step) and re-raises the error, so the launch exits non-zero when the check fires.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scl_lightning.experiment.non_finite import NonFiniteError, StopOnNonFinite

NAN_STEP = 2


class NanOnRankOne(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.global_rank == 1 and self.global_step == NAN_STEP:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,)))
        return DataLoader(data, batch_size=8)


def main() -> None:
    out, check_gradients = Path(sys.argv[1]), sys.argv[2] == "True"
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[StopOnNonFinite(check_gradients=check_gradients)],
    )
    record: dict[str, Any] = {"error": None}
    try:
        trainer.fit(NanOnRankOne())
    except NonFiniteError as err:
        record["error"] = str(err)
        raise
    finally:
        record.update(rank=trainer.global_rank, global_step=trainer.global_step)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
