"""Worker script for test_resume_ddp.py: a 2-process CPU DDP SCL fit that can be stopped at a
step and resumed from its last checkpoint.

Run as ``python ddp_resume.py OUT_DIR MODE``: MODE ``full`` trains to the end, ``stop`` raises on
both ranks after optimizer step ``STOP_STEP`` (a preemption), ``resume`` continues from
``OUT_DIR/ckpt/last.ckpt``. Each rank saves ``{MODE}_rank{r}.pt`` (its final state dict, or
nothing for ``stop``). Dropout makes the training step draw from every rank's generator.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization
from scl_lightning.data import DigitsDataModule
from scl_lightning.experiment import ExactResume, SafeCheckpointIO

STOP_STEP = 7


class Stop(pl.Callback):
    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == STOP_STEP:
            raise KeyboardInterrupt  # Lightning stops every rank and exits cleanly


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    backbone = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 10)
    )
    module = SCLModule(backbone, num_classes=10, input_shape=(1, 8, 8), lam=1e-3)
    callbacks: list[pl.Callback] = [
        MaskGradientNormalization(),
        ExactResume(),
        ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=5, save_top_k=0),
    ]
    if mode == "stop":
        callbacks.append(Stop())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
    )
    trainer.fit(
        module,
        datamodule=DigitsDataModule(batch_size=32),
        ckpt_path="last" if mode == "resume" else None,
    )
    if mode != "stop":
        state = {k: v.clone() for k, v in module.state_dict().items()}
        torch.save(
            {"state": state, "step": trainer.global_step, "rng": torch.get_rng_state()},
            out / f"{mode}_rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    main()
