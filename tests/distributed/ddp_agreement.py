"""Worker script for test_rank_agreement_ddp.py: a 2-process CPU DDP fit with RankAgreementCheck.

Run as ``python ddp_agreement.py OUT_DIR MODE``. MODE ``agree`` is a normal SCL run; MODE
``diverge`` moves one mask element by one ulp on rank 1 only, after optimizer step
``PERTURB_STEP``. Each rank writes ``rank{r}.json`` (checks run, last step, the error message if
any) and re-raises the error, so the launch exits non-zero when the check fires.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from scl_lightning import SCLModule
from scl_lightning.callbacks import MaskGradientNormalization
from scl_lightning.data import DigitsDataModule
from scl_lightning.experiment.rank_agreement import RankAgreementCheck, RankDivergenceError

PERTURB_STEP = 2


def first_mask(module: torch.nn.Module) -> tuple[str, torch.nn.Parameter]:
    return next((n, p) for n, p in module.named_parameters() if n.endswith(".mask"))


class PerturbOneMaskOnRankOne(pl.Callback):
    """What a buggy callback does: change a parameter on one rank only."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == PERTURB_STEP:
            _, mask = first_mask(pl_module)
            with torch.no_grad():
                flat = mask.view(-1)
                flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    pl.seed_everything(0)
    module = SCLModule(
        "lenet_300_100", num_classes=10, input_shape=(1, 8, 8), lam=1e-4, mask_lr=0.05
    )
    check = RankAgreementCheck()
    # the perturbation runs first in the same hook, as a user's callback listed earlier would
    callbacks = [PerturbOneMaskOnRankOne()] if mode == "diverge" else []
    callbacks += [MaskGradientNormalization(), check]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    record: dict[str, Any] = {"mask": first_mask(module)[0], "error": None}
    try:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    except RankDivergenceError as err:
        record["error"] = str(err)
        raise
    finally:
        record.update(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            num_checks=check.num_checks,
            global_step=trainer.global_step,
        )
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
