"""Worker script for test_ddp.py: a 2-process CPU DDP fit of SCLModule with the callbacks.

Run as ``python ddp_fit.py OUT_DIR``; Lightning's ``ddp`` strategy re-launches this script for
rank 1, exactly as it does for a user's training script. Each rank writes ``rank{r}.pt`` with its
final masks, weights, logged sparsity and a fingerprint of every training batch it saw; the
final model is then tested on the held-out split, as ``scl fit`` does.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization, SparsityMonitor
from scl_lightning.data import DigitsDataModule
from scl_lightning.experiment import RunSummary


class Recorder(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.batches: list[str] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self.batches.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest())

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        logged = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sparsity/")
        }
        torch.save(
            {
                "state": state,
                "sparsity": logged,
                "batches": self.batches,
                "world_size": trainer.world_size,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main() -> None:
    out = Path(sys.argv[1])
    pl.seed_everything(0)
    module = SCLModule(
        "lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=1e-4, mask_lr=0.05
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_train_batches=6,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        log_every_n_steps=2,
        callbacks=[MaskGradientNormalization(), SparsityMonitor(), RunSummary(), Recorder(out)],
    )
    datamodule = DigitsDataModule(batch_size=32)
    trainer.fit(module, datamodule=datamodule)
    # what `scl fit` does next (SCLCLI.after_fit), on every rank: test the final model
    trainer.test(module, datamodule=datamodule, ckpt_path=None, verbose=False)


if __name__ == "__main__":
    main()
