"""The ``scl`` command: a LightningCLI for SCLModule and the scl-lightning DataModules.

Examples::

    scl fit --config configs/digits_mlp.yaml
    scl fit --config configs/digits_mlp.yaml --model.lam 4e-5 --seed_everything 1
    scl validate --config configs/digits_mlp.yaml --ckpt_path runs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from scl_lightning.callbacks.exact_resume import ExactResume
from scl_lightning.callbacks.non_finite import NonFiniteError, StopOnNonFinite
from scl_lightning.callbacks.rank_agreement import RankDivergenceError
from scl_lightning.callbacks.run_summary import RunSummary
from scl_lightning.callbacks.wandb_artifacts import WandbArtifacts
from scl_lightning.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
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


class OutputDirectoryError(ValueError):
    """``scl fit`` would write into a directory that already holds another run."""


#: files whose presence means a directory holds a run
_RUN_MARKERS = ("config.yaml", "metrics.csv", "summary.json", "hparams.yaml")


def _free_name(directory: Path, stem: str, suffix: str) -> str:
    index = 1
    while (directory / f"{stem}-{index}{suffix}").exists():
        index += 1
    return f"{stem}-{index}{suffix}"


def _run_files(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    found = [name for name in _RUN_MARKERS if (directory / name).exists()]
    found += sorted(p.name for p in directory.glob("*.ckpt"))
    found += sorted(f"checkpoints/{p.name}" for p in directory.glob("checkpoints/*.ckpt"))
    return found


def _occupied_output_message(trainer: pl.Trainer, log_dir: str | None, resume: Any) -> str | None:
    """Why a new fit must not write where it is about to, or ``None``: the log directory or a
    checkpoint directory already holds a run and this fit does not resume from inside it."""
    directories: list[tuple[str, Path]] = []
    if log_dir is not None:
        directories.append(("log directory", Path(log_dir)))
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            directories.append(("checkpoint directory", Path(callback.dirpath)))
    resume_path = Path(resume).resolve() if resume and resume != "last" else None
    for kind, directory in directories:
        found = _run_files(directory)
        if not found:
            continue
        if resume_path is not None and directory.resolve() in resume_path.parents:
            continue  # resuming this run: it continues in its own directory
        if resume == "last" and any(
            directory.glob(pattern) for pattern in ("last*.ckpt", "checkpoints/last*.ckpt")
        ):
            continue  # a fixed directory: Lightning resumes from its own `last` checkpoint
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        return (
            f"the {kind} {directory} already holds a run ({shown}) and would be overwritten; "
            "resume it with --ckpt_path last, or write to a new directory (leave the logger's "
            "version unset, or change the checkpoint dirpath)"
        )
    return None


class SaveConfigToWandb(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` (``config.yaml`` in the log directory) that also
    stores the resolved config with every W&B run: flattened into the run's config
    (``model.lam``, ``trainer.max_epochs``, ...) and as the file ``lightning_config.yaml`` among
    the run's files (offline: ``<save_dir>/wandb/offline-run-*/files/``). Runs on rank zero, at
    the Trainer's ``setup``, before any training step."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.already_saved:
            resume = self.config.get("ckpt_path")
            log_dir = trainer.log_dir  # a collective (it broadcasts): called on every rank
            if resume and log_dir is not None and (Path(log_dir) / self.config_filename).exists():
                # the run directory's config.yaml is the original run's: keep it, and save this
                # invocation's config next to it
                self.config_filename = _free_name(Path(log_dir), "config.resume", ".yaml")
        super().setup(trainer, pl_module, stage)

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


#: values of ``ckpt_path`` that Lightning resolves itself
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
_VERSION_DIR = re.compile(r"version_(\d+)$")
_VERSIONED_LOGGERS = ("CSVLogger", "TensorBoardLogger")
_LIGHTNING_CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


def _logger_configs(trainer_config: Any) -> list[Any]:
    loggers = trainer_config.get("logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    return list(loggers) if isinstance(loggers, list) else [loggers]


def _resolve_last_checkpoint(config: Any) -> None:
    """``--ckpt_path last`` continues the latest run of the recipe, in its own directory.

    Lightning looks for ``last`` in the checkpoint directory of the run it is starting, which for
    a versioned logger (``runs/<name>/version_N``) is a new, empty directory, so it would start
    from scratch. Here the highest ``version_N`` with a ``checkpoints/last*.ckpt`` is picked, the
    logger is pointed at that version (logs continue in the same directory) and ``ckpt_path`` is
    set to the file. With no checkpoint yet (the first launch of a requeued job) the run starts
    fresh, and says so. A fixed logger version or checkpoint ``dirpath`` is left to Lightning.
    """
    if config.get("ckpt_path") != "last":
        return
    for callback in config.trainer.get("callbacks") or []:
        init_args = callback.get("init_args") if hasattr(callback, "get") else None
        if init_args is not None and init_args.get("dirpath"):
            return  # a fixed checkpoint directory: Lightning finds `last` there itself
    loggers = _logger_configs(config.trainer)
    if not loggers or not str(loggers[0].get("class_path", "")).endswith(_VERSIONED_LOGGERS):
        return
    first = loggers[0].init_args
    if first.get("version") is not None:
        return
    root = Path(first.get("save_dir") or ".") / str(first.get("name") or "lightning_logs")
    runs = []
    for path in root.glob("version_*/checkpoints/last*.ckpt"):
        match = _VERSION_DIR.match(path.parent.parent.name)
        if match:
            runs.append((int(match.group(1)), path.stat().st_mtime, path))
    if not runs:
        rank_zero_info(
            f"scl: --ckpt_path last: no checkpoint under {root}/version_*/checkpoints yet; "
            "starting a new run"
        )
        config.ckpt_path = None
        return
    version, _, path = max(runs)
    for logger in loggers:
        init_args = logger.init_args
        same_root = Path(init_args.get("save_dir") or ".") / str(
            init_args.get("name") or "lightning_logs"
        )
        if str(logger.get("class_path", "")).endswith(_VERSIONED_LOGGERS) and same_root == root:
            init_args.version = version
    config.ckpt_path = str(path)
    rank_zero_info(f"scl: resuming from {path}")


class SCLCLI(LightningCLI):
    """LightningCLI for SCL runs that last days on preemptible clusters.

    - The data module's ``num_classes``/``input_shape`` are linked into the model.
    - Every subcommand saves and loads checkpoints through
      :class:`~scl_lightning.checkpoint.SafeCheckpointIO` (atomic saves, ``weights_only``
      loads); ``--ckpt_path`` is checked first, and the model is built from the configuration,
      not from the checkpoint's stored hyper-parameters.
    - ``fit`` adds :class:`~scl_lightning.callbacks.RunSummary`,
      :class:`~scl_lightning.callbacks.ExactResume` and
      :class:`~scl_lightning.callbacks.StopOnNonFinite`; ``--ckpt_path last`` resumes the latest
      versioned run in its own directory; a new run never starts in a directory that holds
      another run.
    - With a W&B logger, the config is saved with the run (:class:`SaveConfigToWandb`) and
      :class:`~scl_lightning.callbacks.wandb_artifacts.WandbArtifacts` is added on ``fit``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (weights_only, one-line error for a missing or damaged file),
        but build the model from the given configuration.

        Lightning's LightningCLI replaces the model arguments by the hyper-parameters stored in
        the checkpoint, so ``--model.lam 4e-5 --ckpt_path ...`` would silently resume with the
        old ``lam`` and ``--model.backbone resnet20`` with the old network. Here what is on the
        command line and in the configs is what runs, and a checkpoint that does not fit it is
        refused with one line (``SCLModule.on_load_checkpoint``)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        path = self.config[subcommand].get("ckpt_path")
        if path and str(path) not in _SPECIAL_CKPT_PATHS and "://" not in str(path):
            load_checkpoint(path)

    @override
    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            config = self.config["fit"]
            _resolve_last_checkpoint(config)
            # Lightning's CSVLogger deletes the metrics.csv of a directory it starts in (a resumed
            # run's, or one given by a fixed version), before anything can check the directory
            for logger in _logger_configs(config.trainer):
                if logger.get("class_path") == _LIGHTNING_CSV_LOGGER:
                    logger.class_path = "scl_lightning.loggers.CSVLogger"

    def before_fit(self) -> None:
        """Refuse to start where another run's files would be overwritten. Runs before
        ``trainer.fit`` (so before any logger has created or touched its directory), on every
        process, reading only."""
        trainer = self.trainer
        message = _occupied_output_message(
            trainer, trainer.log_dir, self.config["fit"].get("ckpt_path")
        )
        if message:
            raise OutputDirectoryError(message)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # atomic saves and weights_only loads; a user's own CheckpointIO plugin is kept
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        if self.subcommand == "fit" and not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary())
        if self.subcommand == "fit" and not any(isinstance(c, ExactResume) for c in callbacks):
            callbacks.append(ExactResume())
        if self.subcommand == "fit" and not any(isinstance(c, StopOnNonFinite) for c in callbacks):
            callbacks.append(StopOnNonFinite())
        if (
            self.subcommand == "fit"
            and any(isinstance(lg, WandbLogger) for lg in trainer.loggers)
            and not any(isinstance(c, WandbArtifacts) for c in callbacks)
        ):
            callbacks.append(WandbArtifacts())
        return trainer


def _parse_error_line(err: ArgumentError) -> str:
    """jsonargparse's multi-line parse errors as one line."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)$', lines[0]) if lines else None
    where = f"--{key.group(1)}: " if key else ""
    class_path = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", text)
    if class_path:
        return f"{where}cannot import {class_path.group(1)!r} ({class_path.group(2).strip()})"
    expected = re.search(r"Expected a <class '(\w+)'>\.? Got value: (.+)", text)
    if expected:
        return f"{where}expected a {expected.group(1)}, got {expected.group(2).strip()!r}"
    given = re.search(r"Given value: (.+)", text)
    if "Union subtypes" in text and given:
        value = given.group(1).strip()
        if "class_path" in text or "Expected a path" in text:
            return (
                f"{where}{value!r} is not an importable class (give its full import path, "
                "e.g. scl_lightning.data.DigitsDataModule)"
            )
        return f"{where}{value!r} is not a valid value"
    if key and key.group(2):  # the reason on the key's own line
        return f"{where}{key.group(2)}"
    rest = lines[1:] if key else lines
    detail = "; ".join(line.lstrip("- ") for line in rest[:3])
    return f"{where}{detail}" if detail else where.rstrip(": ") or "invalid arguments"


#: errors a user can act on, reported as one line; anything else is a bug and keeps its traceback
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, CheckpointError)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``scl`` command.

    Errors a user can act on (a bad argument value, a missing file, a checkpoint that does not
    fit the model, a run stopped by a NaN) end in one line, ``scl: error: ...``, and a non-zero
    exit status: 2 for bad input, 1 for a run stopped during training. Set ``SCL_DEBUG=1`` for
    the traceback. ``scl report RUN_DIR`` is handed to :func:`scl_lightning.report.main`.
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
                "`scl report RUN_DIR` writes plots and a Markdown summary of a finished run.",
                "exit_on_error": False,
            },
            args=args,
        )
    except ArgumentError as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        command = f"scl {argv[0]}" if argv and not argv[0].startswith("-") else "scl"
        print(f"scl: error: {_parse_error_line(err)} (see {command} --help)", file=sys.stderr)
        raise SystemExit(2) from None
    except _USER_ERRORS as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        print(f"scl: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NonFiniteError, RankDivergenceError) as err:
        if os.environ.get("SCL_DEBUG"):
            raise
        print(f"scl: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


if __name__ == "__main__":
    main()
