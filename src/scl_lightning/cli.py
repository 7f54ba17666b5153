"""The ``scl`` command: a LightningCLI for SCLModule and the scl-lightning DataModules.

Examples::

    scl fit --config configs/digits_mlp.yaml
    scl fit --config configs/digits_mlp.yaml --model.lam 4e-5 --seed_everything 1
    scl validate --config configs/digits_mlp.yaml --ckpt_path runs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from scl_lightning.callbacks.run_summary import RunSummary
from scl_lightning.callbacks.wandb_artifacts import WandbArtifacts
from scl_lightning.loggers import active_wandb_loggers
from scl_lightning.module import SCLModule

__all__ = ["SCLCLI", "SaveConfigToWandb", "flatten_config", "main"]

#: name of the resolved config in a W&B run's files (W&B keeps its own ``config.yaml`` there)
WANDB_CONFIG_FILENAME = "lightning_config.yaml"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to dotted keys (``{"model": {"lam": 1}}`` -> ``{"model.lam":
    1}``); lists and scalars are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


class SaveConfigToWandb(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` (``config.yaml`` in the log directory) that also
    stores the resolved config with every W&B run: flattened into the run's config
    (``model.lam``, ``trainer.max_epochs``, ...) and as the file ``lightning_config.yaml`` among
    the run's files (offline: ``<save_dir>/wandb/offline-run-*/files/``). Runs on rank zero, at
    the Trainer's ``setup``, before any training step."""

    @override
    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        loggers = active_wandb_loggers(trainer.loggers)
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        flat = flatten_config(yaml.safe_load(text))
        for logger in loggers:
            run = logger.experiment
            run.config.update(flat, allow_val_change=True)
            path = Path(run.dir) / WANDB_CONFIG_FILENAME
            path.write_text(text)
            run.save(str(path), base_path=run.dir, policy="now")


class SCLCLI(LightningCLI):
    """LightningCLI with the data module's ``num_classes``/``input_shape`` linked into the model,
    a :class:`~scl_lightning.callbacks.RunSummary` on every ``fit``, and, with a W&B logger, the
    config saved with the run (:class:`SaveConfigToWandb`) and a
    :class:`~scl_lightning.callbacks.wandb_artifacts.WandbArtifacts` on ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        if self.subcommand == "fit" and not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary())
        if (
            self.subcommand == "fit"
            and any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
            and not any(isinstance(c, WandbArtifacts) for c in callbacks)
        ):
            callbacks.append(WandbArtifacts())
        return trainer


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``scl`` command.

    Errors a user can act on (a bad argument value, a missing file) end in one line,
    ``scl: error: ...``, and exit status 2; set ``SCL_DEBUG=1`` for the traceback.
    ``scl report RUN_DIR`` is handed to :func:`scl_lightning.report.main`.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from scl_lightning.report import main as report_main

        raise SystemExit(report_main(argv[1:]))
    try:
        SCLCLI(
            SCLModule,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigToWandb,
            parser_kwargs={
                "description": "Sparse Connectivity Learning with Lightning. Also: "
                "`scl report RUN_DIR` writes plots and a Markdown summary of a finished run."
            },
            args=args,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        print(f"scl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
