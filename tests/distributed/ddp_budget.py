"""Worker script for test_budget_ddp.py: a 2-process CPU DDP fit of SCLModule with a sparsity
target. Each rank writes ``rank{r}.pt`` with lambda and the measured sparsity at every optimizer
step, and its final masks.

Run as ``python ddp_budget.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from scl_lightning import SCLModule
from scl_lightning.data import DigitsDataModule


class Recorder(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lams: list[float] = []
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        c = pl_module.engine.controller
        self.lams.append(c.lam)
        self.values.append(c.last_value)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        masks = {
            k: v.detach().cpu().clone()
            for k, v in pl_module.state_dict().items()
            if k.endswith(".mask")
        }
        torch.save(
            {
                "lams": self.lams,
                "values": self.values,
                "masks": masks,
                "world_size": trainer.world_size,
                "controller": pl_module.engine.controller.state_dict(),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = SCLModule(
        "lenet_300_100",
        num_classes=10,
        input_shape=(1, 8, 8),
        backbone_kwargs={"hidden": [64, 32]},
        target_sparsity=0.6,
        mask_lr=0.05,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=4,
        limit_train_batches=10,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[Recorder(out)],
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main()
