"""The ``scl`` command: a LightningCLI for SCLModule and the scl-lightning DataModules.

Examples::

    scl fit --config configs/digits_mlp.yaml
    scl fit --config configs/digits_mlp.yaml --model.lam 4e-5 --seed_everything 1
    scl validate --config configs/digits_mlp.yaml --ckpt_path runs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from scl_lightning.callbacks.run_summary import RunSummary
from scl_lightning.module import SCLModule

__all__ = ["SCLCLI", "main"]


class SCLCLI(LightningCLI):
    """LightningCLI with the data module's ``num_classes``/``input_shape`` linked into the model
    and a :class:`~scl_lightning.callbacks.RunSummary` on every ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        if self.subcommand == "fit" and not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary())
        return trainer


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``scl`` command.

    Errors a user can act on (a bad argument value, a missing file) end in one line,
    ``scl: error: ...``, and exit status 2; set ``SCL_DEBUG=1`` for the traceback.
    """
    try:
        SCLCLI(
            SCLModule,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        print(f"scl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
