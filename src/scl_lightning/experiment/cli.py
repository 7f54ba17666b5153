"""The ``scl`` command: a LightningCLI for SCLModule and the scl-lightning DataModules.

Examples::

    scl fit --config configs/digits_mlp.yaml
    scl fit --config configs/digits_mlp.yaml --model.lam 4e-5 --seed_everything 1
    scl validate --config configs/digits_mlp.yaml --ckpt_path runs/.../checkpoints/last.ckpt
    scl test --config configs/digits_mlp.yaml --ckpt_path last
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import yaml
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from scl_lightning._utils import next_free_path
from scl_lightning.callbacks._logging import active_wandb_loggers
from scl_lightning.experiment.checkpoint import CheckpointError, SafeCheckpointIO, load_checkpoint
from scl_lightning.experiment.exact_resume import ExactResume
from scl_lightning.experiment.non_finite import NonFiniteError, StopOnNonFinite
from scl_lightning.experiment.rank_agreement import RankDivergenceError
from scl_lightning.experiment.run_summary import RunSummary
from scl_lightning.experiment.terminal import (
    configured_callbacks,
    evaluation_run_line,
    quiet_evaluation_noise,
    quiet_known_noise,
    use_terminal_callbacks,
)
from scl_lightning.experiment.wandb_artifacts import WandbArtifacts
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
                resume_config = Path(log_dir) / "config.resume.yaml"
                self.config_filename = next_free_path(resume_config, numbered=True).name
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
#: subcommands that evaluate a trained model
_EVALUATE = ("validate", "test", "predict")


def _logger_configs(trainer_config: Any) -> list[Any]:
    loggers = trainer_config.get("logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    return list(loggers) if isinstance(loggers, list) else [loggers]


def _class_of(config: Any) -> type | None:
    """The class a ``class_path`` config names, or ``None`` if it names none."""
    class_path = config.get("class_path") if hasattr(config, "get") else None
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) else None


def _checkpoint_dirpaths(trainer_config: Any) -> tuple[list[Path], bool]:
    """The fixed ``dirpath`` of every ModelCheckpoint of the config, and whether some checkpoint
    callback writes into the logger's directory instead (one without a ``dirpath``, or
    Lightning's default ModelCheckpoint when the config has none)."""
    callbacks = trainer_config.get("callbacks") or []
    fixed: list[Path] = []
    in_log_dir = False
    found = False
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = _class_of(callback)
        if cls is None or not issubclass(cls, ModelCheckpoint):
            continue
        found = True
        init_args = callback.get("init_args")
        dirpath = init_args.get("dirpath") if init_args is not None else None
        if dirpath:
            fixed.append(Path(dirpath))
        else:
            in_log_dir = True
    return fixed, in_log_dir or not found


class _LogCheckpointDir(NamedTuple):
    """Where a ModelCheckpoint without ``dirpath`` writes: ``<root>/<version>/checkpoints``, as
    Lightning resolves it from the first logger (``<save_dir>/<name>/<version>``)."""

    root: Path
    #: the run directory under ``root``; ``None``: a new one for every run
    version: str | None
    #: runs are ``version_N`` directories (CSVLogger, TensorBoardLogger)
    numbered: bool


def _versioned_root(init_args: Any, default_root: Path) -> Path:
    """``<save_dir>/<name>`` of a CSVLogger or TensorBoardLogger (which take ``name=None`` as
    ``""``)."""
    save_dir = Path(init_args.get("save_dir") or default_root)
    return save_dir / (init_args.get("name", "lightning_logs") or "")


def _log_checkpoint_dir(trainer_config: Any) -> _LogCheckpointDir:
    default_root = Path(trainer_config.get("default_root_dir") or ".")
    logger = trainer_config.get("logger")
    if logger is False or logger == []:
        return _LogCheckpointDir(default_root, "", False)  # <default_root_dir>/checkpoints
    if logger is None or logger is True:  # Lightning's default TensorBoardLogger (or CSVLogger)
        return _LogCheckpointDir(default_root / "lightning_logs", None, True)
    first = _logger_configs(trainer_config)[0]
    class_path = str(first.get("class_path", ""))
    init_args = first.get("init_args") or {}
    save_dir = Path(init_args.get("save_dir") or default_root)
    version = init_args.get("version")
    if class_path.endswith(_VERSIONED_LOGGERS):
        if version is not None and not isinstance(version, str):
            version = f"version_{version}"
        return _LogCheckpointDir(_versioned_root(init_args, default_root), version, True)
    if class_path.endswith("WandbLogger"):  # <save_dir>/<project>/<run id>
        project = init_args.get("project") or os.environ.get("WANDB_PROJECT") or "lightning_logs"
        return _LogCheckpointDir(save_dir / project, version or init_args.get("id"), False)
    # another logger: its name and version as the config gives them (best effort)
    return _LogCheckpointDir(save_dir / str(init_args.get("name") or ""), version, False)


def _newest_numbered_run(root: Path) -> tuple[int, Path] | None:
    """The highest ``version_N`` under ``root`` with a ``checkpoints/last*.ckpt``, and that
    checkpoint (the newest, if several)."""
    runs = []
    for path in root.glob("version_*/checkpoints/last*.ckpt"):
        match = _VERSION_DIR.match(path.parent.parent.name)
        if match and path.is_file():
            runs.append((int(match.group(1)), path.stat().st_mtime, path))
    if not runs:
        return None
    version, _, path = max(runs)
    return version, path


def _last_checkpoints(directory: Path) -> list[Path]:
    return [path for path in directory.glob("last*.ckpt") if path.is_file()]


def _find_last_checkpoint(trainer_config: Any) -> tuple[Path | None, list[str]]:
    """What ``--ckpt_path last`` means for ``validate``/``test``/``predict``: the newest
    ``last*.ckpt`` where this configuration's checkpoints are written, and the places searched.

    Each fixed ModelCheckpoint ``dirpath`` is searched as Lightning would; the logger's
    directory as well, but where every run gets a new one (``version_N`` of a logger with no
    fixed version, a new W&B run id) the newest run with a last checkpoint is taken instead of
    the new, empty directory that Lightning would look in."""
    fixed, in_log_dir = _checkpoint_dirpaths(trainer_config)
    candidates: list[Path] = []
    searched: list[str] = []
    for directory in fixed:
        searched.append(str(directory))
        candidates += _last_checkpoints(directory)
    if in_log_dir:
        where = _log_checkpoint_dir(trainer_config)
        if where.version is not None:
            directory = where.root / where.version / "checkpoints"
            searched.append(str(directory))
            candidates += _last_checkpoints(directory)
        elif where.numbered:
            searched.append(str(where.root / "version_*" / "checkpoints"))
            newest = _newest_numbered_run(where.root)
            if newest is not None:
                candidates.append(newest[1])
        else:
            searched.append(str(where.root / "*" / "checkpoints"))
            candidates += [p for p in where.root.glob("*/checkpoints/last*.ckpt") if p.is_file()]
    if not candidates:
        return None, searched
    return max(candidates, key=lambda path: path.stat().st_mtime), searched


def _fit_command(config: Any) -> str:
    configs = [str(path) for path in config.get("config") or []]
    return " ".join(["scl fit", *(f"--config {path}" for path in configs)])


def _resolve_checkpoint_to_evaluate(config: Any, subcommand: str) -> None:
    """``validate``/``test``/``predict`` evaluate a trained model, never a freshly initialized
    one: without ``--ckpt_path``, or with ``--ckpt_path last`` and no last checkpoint, they stop
    with one line before anything is built or written. ``last`` is resolved to a file
    (:func:`_find_last_checkpoint`); ``best``, ``hpc``, ``registry`` and URLs are left to
    Lightning.

    Unlike ``fit --ckpt_path last``, the logger is not pointed at the run the checkpoint comes
    from: the evaluation logs into a new run directory of its own, so the training run's
    ``config.yaml`` and ``metrics.csv`` stay as the training left them (Lightning's
    SaveConfigCallback would refuse to start next to the existing ``config.yaml``, and Lightning's
    CSVLogger would delete the existing ``metrics.csv``)."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None or not str(ckpt_path).strip():
        raise CheckpointError(
            f"scl {subcommand} needs a trained model: pass --ckpt_path PATH (a checkpoint file) "
            "or --ckpt_path last (the latest checkpoint of this recipe's runs)"
        )
    if ckpt_path != "last":
        return
    path, searched = _find_last_checkpoint(config.trainer)
    if path is None:
        raise CheckpointError(
            f"scl {subcommand} --ckpt_path last: no checkpoint (last*.ckpt) under "
            f"{' or '.join(searched)}; train first with `{_fit_command(config)}`, or pass "
            "--ckpt_path PATH (a checkpoint file)"
        )
    load_checkpoint(path)  # a damaged file: one line now, before anything is built
    config.ckpt_path = str(path)
    rank_zero_info(f"scl: {subcommand} with {path}")


def _config_paths(argv: list[str]) -> list[str]:
    """The files given with ``--config PATH`` / ``--config=PATH``."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _check_config_files(argv: list[str]) -> None:
    """One line naming the file for a config that does not parse, is empty, or is not a mapping
    (several ``--config`` are common; jsonargparse names none of them). A missing file is left
    to jsonargparse, which says so."""
    for name in _config_paths(argv):
        _read_config_file(Path(name))


def _read_config_file(path: Path) -> dict[str, Any] | None:
    """A ``--config`` file's settings (``None``: no such file, left to jsonargparse), or one
    line naming the file (:func:`_check_config_files`)."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(
            f"config file {path} is not valid YAML{where}: {problem}; fix it or drop that --config"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text file") from None
    if data is None:
        raise ValueError(
            f"config file {path} is empty: put settings in it (trainer:, model:, data: ...) "
            "or drop that --config"
        )
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} holds a {type(data).__name__}, not a mapping of settings "
            "(trainer:, model:, data: ...)"
        )
    return data


def _check_epochs(trainer_config: Any) -> None:
    """``max_epochs`` must train something: ``-1`` (no limit, with ``max_steps`` or a time) or
    a positive count. Lightning takes 0 and ends at once, and fails deep in its loop on -2."""
    epochs = trainer_config.get("max_epochs")
    if epochs is None or isinstance(epochs, bool) or not isinstance(epochs, int):
        return
    if epochs == 0:
        raise ValueError(
            "--trainer.max_epochs 0 would train nothing (no summary, no checkpoint worth "
            "keeping); give a positive number of epochs, or use `scl validate`/`scl test` to "
            "evaluate a checkpoint"
        )
    if epochs < -1:
        raise ValueError(
            f"--trainer.max_epochs must be a positive number of epochs, or -1 for no limit "
            f"(with --trainer.max_steps), got {epochs}"
        )


#: accelerator names that need CUDA (Lightning's "gpu" also means Apple's MPS)
_CUDA_ACCELERATORS = ("gpu", "cuda")


def _setting_source(argv: list[str], key: str) -> str:
    """Where ``key`` (a dotted trainer setting) was set: ``--key`` on the command line, else the
    last ``--config`` file that sets it, for the error message."""
    flag = f"--{key}"
    if any(arg == flag or arg.startswith(f"{flag}=") for arg in argv):
        return flag
    section, _, name = key.partition(".")
    source = ""
    for path in _config_paths(argv):  # read already by _check_config_files: they parse
        data = _read_config_file(Path(path)) or {}
        if isinstance(data.get(section), dict) and name in data[section]:
            source = path
    return f"{flag} (set in {source})" if source else flag


def _check_accelerator(trainer_config: Any, argv: list[str]) -> None:
    """A GPU trainer (``accelerator: gpu``, as in ``configs/trainer/gpu.yaml``) on a machine
    where torch sees no GPU is one line, before anything is built (Lightning's own error is a
    traceback saying "No supported gpu backend found!")."""
    import torch

    accelerator = trainer_config.get("accelerator")
    if not isinstance(accelerator, str) or accelerator.lower() not in _CUDA_ACCELERATORS:
        return
    if torch.cuda.is_available():
        return
    if accelerator.lower() == "gpu" and torch.backends.mps.is_available():
        return
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
    raise ValueError(
        f"{_setting_source(argv, 'trainer.accelerator')} asks for a GPU ({accelerator!r}), but "
        f"this machine has none that torch can use ({build}); drop the GPU preset, or pass "
        "--trainer.accelerator cpu (or auto) to train on the CPU"
    )


def _output_directories(trainer_config: Any, writes_checkpoints: bool = True) -> list[Path]:
    """The directories a run writes into, as configured and made absolute: every logger's
    ``save_dir`` (W&B's ``dir`` too), each fixed checkpoint ``dirpath``, and
    ``default_root_dir`` when it is set or nothing else is (Lightning's default logger and
    checkpoints then write there; for an evaluation, which saves no checkpoint, only when it
    logs)."""
    found: list[Path] = []
    for logger in _logger_configs(trainer_config):
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is None:
            continue
        for key in ("save_dir", "dir"):
            value = init_args.get(key)
            if value:
                found.append(Path(str(value)))
    found += _checkpoint_dirpaths(trainer_config)[0]
    logger = trainer_config.get("logger")
    writes_logs = logger is None or logger is True or bool(_logger_configs(trainer_config))
    if (writes_checkpoints or writes_logs) and (
        trainer_config.get("default_root_dir") or not found
    ):
        found.append(Path(trainer_config.get("default_root_dir") or "."))
    # remote storage (s3://..., which Path turns into s3:/...) is not checked
    local = [path for path in found if not (path.parts and path.parts[0].endswith(":"))]
    return list(dict.fromkeys(path.absolute() for path in local))


def _check_writable(trainer_config: Any, writes_checkpoints: bool = True) -> None:
    """Each output directory (or, where it does not exist yet, the nearest existing directory
    above it, where it will be created) must be writable, checked before any logger creates
    or writes a file. Reads only; a directory given as an existing file is refused too."""
    for directory in _output_directories(trainer_config, writes_checkpoints):
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise ValueError(
                f"cannot write the run's files under {directory}: {existing} is a file, not a "
                "directory; choose another directory (the loggers' save_dir, "
                "--trainer.default_root_dir or the checkpoint dirpath)"
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            where = "" if existing == directory else f" (its nearest existing parent {existing})"
            raise ValueError(
                f"cannot write the run's files under {directory}: the directory{where} is "
                "read-only for this user; run scl from a writable directory, or point the "
                "loggers' save_dir (and --trainer.default_root_dir) at one"
            )


#: settings that say where and how the run is recorded, not what it learns: never compared
_NOT_COMPARED_ON_RESUME = ("ckpt_path", "trainer.logger", "config", "test_after_fit")


def _run_config_file(checkpoint: Path) -> Path | None:
    """The config the run of ``checkpoint`` ran with when it saved it: the newest of
    ``config.yaml`` and ``config.resume-N.yaml`` no newer than the checkpoint, in its run
    directory (``<run>/checkpoints/x.ckpt`` or ``<run>/x.ckpt``; a run directory holds
    ``hparams.yaml`` or ``metrics.csv``)."""
    checkpoint = checkpoint.absolute()
    saved = checkpoint.stat().st_mtime
    for directory in (checkpoint.parent.parent, checkpoint.parent):
        if not any((directory / marker).exists() for marker in ("hparams.yaml", "metrics.csv")):
            continue  # not a run directory (a recipe named config.yaml, say)
        found = [
            path
            for path in directory.glob("config*.yaml")
            if path.name == "config.yaml" or path.name.startswith("config.resume")
        ]
        # the config of an attempt that saved no checkpoint after it was never trained
        trained = [path for path in found if path.stat().st_mtime <= saved]
        if trained:
            return max(trained, key=lambda path: path.stat().st_mtime)
    return None


def _checkpoint_settings(checkpoint: Path) -> dict[str, Any]:
    """The model and data module settings stored in a Lightning checkpoint (its
    ``hyper_parameters`` and ``datamodule_hyper_parameters``), under the config's dotted keys."""
    stored = load_checkpoint(checkpoint)
    flat: dict[str, Any] = {}
    for key, value in (stored.get("hyper_parameters") or {}).items():
        if not key.startswith("_"):
            flat[f"model.{key}"] = value
    data = stored.get("datamodule_hyper_parameters") or {}
    if "_class_path" in data:
        flat["data.class_path"] = data["_class_path"]
    for key, value in data.items():
        if not key.startswith("_"):
            flat[f"data.init_args.{key}"] = value
    return yaml.safe_load(yaml.safe_dump(flat))  # tuples as lists, as in the config


#: how a setting the run's config does not have is shown
ABSENT = "(absent)"


def settings_changed_on_resume(
    before: Mapping[str, Any], now: Mapping[str, Any], *, complete: bool = False
) -> list[tuple[str, Any, Any]]:
    """``(key, value in the run, value now)`` for every dotted key both flat configs hold and
    whose values differ, but for the keys that only say where the run is recorded or what is
    done after training (``test_after_fit``).

    With ``complete`` (``before`` is the run's whole config), a setting only one side has is a
    change too, shown as :data:`ABSENT` on the other: a newer scl-lightning's new argument
    (its default may change what the resumed run does), or one the run had and this config
    lacks. Otherwise (``before`` is what a checkpoint stores: model and data settings only)
    only common keys are compared."""
    keys = (before.keys() | now.keys()) if complete else (before.keys() & now.keys())
    changes = []
    for key in sorted(keys):
        if any(key == skip or key.startswith(f"{skip}.") for skip in _NOT_COMPARED_ON_RESUME):
            continue
        old, new = before.get(key, ABSENT), now.get(key, ABSENT)
        if key not in before or key not in now or old != new:
            changes.append((key, old, new))
    return changes


def _describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    def show(value: Any) -> str:
        return value if value is ABSENT else repr(value)

    shown = [f"{key} {show(old)} -> {show(new)}" for key, old, new in changes[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(shown) + more


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
    if _checkpoint_dirpaths(config.trainer)[0]:
        return  # a fixed checkpoint directory: Lightning finds `last` there itself
    loggers = _logger_configs(config.trainer)
    if not loggers or not str(loggers[0].get("class_path", "")).endswith(_VERSIONED_LOGGERS):
        return
    where = _log_checkpoint_dir(config.trainer)
    if where.version is not None:
        return
    root = where.root
    newest = _newest_numbered_run(root)
    if newest is None:
        rank_zero_info(
            f"scl: --ckpt_path last: no checkpoint under {root}/version_*/checkpoints yet; "
            "starting a new run"
        )
        config.ckpt_path = None
        return
    version, path = newest
    default_root = Path(config.trainer.get("default_root_dir") or ".")
    for logger in loggers:
        init_args = logger.init_args
        if (
            str(logger.get("class_path", "")).endswith(_VERSIONED_LOGGERS)
            and _versioned_root(init_args, default_root) == root
        ):
            init_args.version = version
    config.ckpt_path = str(path)
    rank_zero_info(f"scl: resuming from {path}")


class SCLCLI(LightningCLI):
    """LightningCLI for SCL runs that last days on preemptible clusters.

    - The data module's ``num_classes``/``input_shape`` are linked into the model.
    - Every subcommand saves and loads checkpoints through
      :class:`~scl_lightning.experiment.checkpoint.SafeCheckpointIO` (atomic saves, ``weights_only``
      loads); ``--ckpt_path`` is checked first, and the model is built from the configuration,
      not from the checkpoint's stored hyper-parameters.
    - ``fit`` then tests the final model once on the data module's held-out test split
      (``--test_after_fit false``: not), for ``summary.json``.
    - ``fit`` adds :class:`~scl_lightning.experiment.RunSummary`,
      :class:`~scl_lightning.experiment.ExactResume` and
      :class:`~scl_lightning.experiment.StopOnNonFinite`; ``--ckpt_path last`` resumes the latest
      versioned run in its own directory; a new run never starts in a directory that holds
      another run.
    - ``validate``, ``test`` and ``predict`` need ``--ckpt_path`` (they never evaluate a freshly
      initialized model); ``--ckpt_path last`` is the newest last checkpoint of the recipe's
      runs, and when there is none they stop with one line before anything is written.
    - With a W&B logger, the config is saved with the run (:class:`SaveConfigToWandb`) and
      :class:`~scl_lightning.experiment.WandbArtifacts` is added on ``fit``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        #: the command line, for error messages that name where a setting came from
        self.argv: list[str] = (
            [str(arg) for arg in given] if isinstance(given, list) else sys.argv[1:]
        )
        self._test_after_fit = False
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        # every subcommand takes it, so a fit's saved config.yaml works for validate/test too
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="scl fit: test the final model once on the data module's held-out test split "
            "(one that declares held_out_test, e.g. DigitsDataModule, Fashion-MNIST) and add "
            "test_acc/test_loss to summary.json; false: do not. Ignored by validate, test and "
            "predict.",
        )

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
        if self.subcommand is not None:
            trainer_config = self.config[self.subcommand].trainer
            _check_accelerator(trainer_config, self.argv)
            _check_writable(trainer_config, writes_checkpoints=self.subcommand == "fit")
        if self.subcommand in _EVALUATE:
            _resolve_checkpoint_to_evaluate(self.config[self.subcommand], self.subcommand)
        if self.subcommand == "fit":
            config = self.config["fit"]
            _check_epochs(config.trainer)
            _resolve_last_checkpoint(config)
            # Lightning's CSVLogger deletes the metrics.csv of a directory it starts in (a resumed
            # run's, or one given by a fixed version), before anything can check the directory
            for logger in _logger_configs(config.trainer):
                if logger.get("class_path") == _LIGHTNING_CSV_LOGGER:
                    logger.class_path = "scl_lightning.experiment.loggers.CSVLogger"

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
        self._warn_if_resumed_with_other_settings()

    def _warn_if_resumed_with_other_settings(self) -> None:
        """Resuming with settings other than the run's (another ``lam``, more epochs, another
        learning rate) is allowed, as it is the way to extend a run or to recover from a NaN, and
        the new values are used; one warning names every setting that differs, with both values.
        The run's own settings are the config it saved that checkpoint with
        (:func:`_run_config_file`); a checkpoint found outside a run directory is compared by
        the model and data settings it stores."""
        config = self.config["fit"]
        resume = config.get("ckpt_path")
        if not resume or "://" in str(resume) or str(resume) in _SPECIAL_CKPT_PATHS[1:]:
            return
        checkpoint = Path(resume) if resume != "last" else _find_last_checkpoint(config.trainer)[0]
        if checkpoint is None or not checkpoint.is_file():
            return
        now = flatten_config(yaml.safe_load(self._parser("fit").dump(config, skip_none=False)))
        reference = _run_config_file(checkpoint)
        if reference is not None:
            before = flatten_config(yaml.safe_load(reference.read_text(encoding="utf-8")) or {})
            source, saved = str(reference), " (saved as config.resume-N.yaml next to it)"
        else:
            before = _checkpoint_settings(checkpoint)
            source, saved = f"the settings stored in {checkpoint}", ""
        changes = settings_changed_on_resume(before, now, complete=reference is not None)
        if changes:
            rank_zero_warn(
                f"scl: resuming {checkpoint} with {len(changes)} setting(s) other than the run's "
                f"({source}): {_describe_changes(changes)}; the new values are used from here "
                f"on{saved}. To continue the run as it was, drop these overrides; to compare "
                "settings, start a new run instead (without --ckpt_path)",
                category=UserWarning,
            )

    def _before_evaluation(self) -> None:
        """Say where the evaluation is logged (a run of its own: see
        :func:`_resolve_checkpoint_to_evaluate`), and keep Lightning's warning about that new
        directory out of the output."""
        quiet_evaluation_noise()
        line = evaluation_run_line(self.trainer, str(self.subcommand))  # every rank: collective
        if line:
            rank_zero_info(line)

    def before_validate(self) -> None:
        self._before_evaluation()

    def before_test(self) -> None:
        self._before_evaluation()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # a copy: the Trainer gets that very list and appends its defaults to it
        configured = configured_callbacks(self._get(self.config_init, "trainer", default={}))
        trainer = super().instantiate_trainer(**kwargs)
        # SCL's model summary, and plain progress lines when the output is not a terminal
        use_terminal_callbacks(trainer, configured)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # atomic saves and weights_only loads; a user's own CheckpointIO plugin is kept
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        #: whether fit ends with a test on the held-out split (see after_fit)
        self._test_after_fit = self.subcommand == "fit" and self._tests_after_fit(trainer)
        if self.subcommand == "fit" and not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary(table_after_test=self._test_after_fit))
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

    def _tests_after_fit(self, trainer: pl.Trainer) -> bool:
        """Whether ``fit`` ends with a test on the held-out split. Not where the Trainer starts
        its processes itself (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``): a test would run
        in new processes, apart from the fit's ``RunSummary`` and run directory (use the
        ``ddp`` strategy, or ``scl test`` on the last checkpoint)."""
        if not self.config["fit"].get("test_after_fit"):
            return False
        if getattr(self.datamodule, "held_out_test", False) is not True:
            return False
        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            rank_zero_info(
                "scl: no test after fit with a strategy that starts its own processes "
                f"({type(trainer.strategy).__name__}); use the ddp strategy, or run scl test on "
                "the last checkpoint"
            )
            return False
        return True

    def after_fit(self) -> None:
        """``--test_after_fit`` (default): test the final model once on the held-out test split,
        with the fit's Trainer, so the results go to the run's loggers and directory and
        :class:`RunSummary` adds them to ``summary.json``. Runs on every process (under DDP too,
        as Lightning expects); saves no checkpoint. Not after an interrupted fit."""
        trainer = self.trainer
        if not self._test_after_fit or trainer.interrupted or trainer.received_sigterm:
            return
        # the weights in memory (ckpt_path=None), not the best or last checkpoint
        trainer.test(self.model, datamodule=self.datamodule, ckpt_path=None, verbose=False)


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
        kinds = re.findall(r"- Expected a <class '(\w+)'>", text)
        if kinds and set(kinds) <= {"float", "int", "str", "bool", "NoneType"}:
            names = [("null" if k == "NoneType" else f"a {k}") for k in kinds]
            return f"{where}expected {' or '.join(names)}, got {value!r}"
        return f"{where}{value!r} is not a valid value"
    if key and key.group(2):  # the reason on the key's own line
        return f"{where}{key.group(2)}"
    rest = lines[1:] if key else lines
    detail = "; ".join(line.lstrip("- ") for line in rest[:3])
    return f"{where}{detail}" if detail else where.rstrip(": ") or "invalid arguments"


#: errors a user can act on, reported as one line; anything else is a bug and keeps its traceback.
#: Lightning raises ``MisconfigurationException`` for Trainer settings this machine cannot run
#: (more devices than it has, a strategy it lacks).
_USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    CheckpointError,
    MisconfigurationException,
)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``scl`` command.

    Errors a user can act on (a bad argument value, a missing file, a checkpoint that does not
    fit the model, a run stopped by a NaN) end in one line, ``scl: error: ...``, and a non-zero
    exit status: 2 for bad input, 1 for a run stopped during training. Set ``SCL_DEBUG=1`` for
    the traceback. ``scl report RUN_DIR`` is handed to
    :func:`scl_lightning.experiment.report.main`.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from scl_lightning.experiment.report import main as report_main

        raise SystemExit(report_main(argv[1:]))
    if argv[:1] == ["export"]:
        from scl_lightning.experiment.export_cli import main as export_main

        raise SystemExit(export_main(argv[1:]))
    try:
        quiet_known_noise()
        _check_config_files(argv)
        SCLCLI(
            SCLModule,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigToWandb,
            parser_kwargs={
                "description": "Sparse Connectivity Learning with Lightning. Also: "
                "`scl report RUN_DIR` writes plots and a Markdown summary of a finished run; "
                "`scl export RUN_DIR --format compact` a smaller, faster model.",
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


#: jsonargparse's wrapper around an error a class raised while it was built from the config
_UNION_WRAPPER = "Does not validate against any of the Union subtypes"
_TOP_BULLET = re.compile(r"^  - (.+)$")  # the reasons; deeper bullets explain a reason
_GIVEN_CLASS = re.compile(r"^Given value: Namespace\(class_path='([\w.]+)'")


def _unwrap_union_error(text: str) -> str | None:
    """The reason inside jsonargparse's "Does not validate against any of the Union subtypes"
    (raised when a data module's or model's ``__init__`` refuses its arguments), named after
    the class: ``DigitsDataModule: batch_size must be a positive integer, got 0``. ``None``
    when the text is not that wrapper or holds no reason of its own (then it is kept whole)."""
    if not text.startswith(_UNION_WRAPPER) or "Errors:" not in text:
        return None
    lines = text.split("Errors:", 1)[1].splitlines()
    reasons = [m.group(1).strip() for m in map(_TOP_BULLET.match, lines) if m]
    reasons = [r for r in reasons if not r.startswith(("Expected a <class", "Not a valid"))]
    if not reasons:
        return None
    given = next((m for m in map(_GIVEN_CLASS.match, lines) if m), None)
    owner = f"{given.group(1).rpartition('.')[2]}: " if given else ""
    return owner + reasons[0]


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    unwrapped = _unwrap_union_error(text)
    if unwrapped is not None:
        text = unwrapped
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(err).__name__


if __name__ == "__main__":
    main()
