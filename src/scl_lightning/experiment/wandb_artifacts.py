"""WandbArtifacts: the final checkpoint and the pruned model as W&B artifacts at the end of fit."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from scl_lightning._utils import next_free_path
from scl_lightning.callbacks._logging import active_wandb_loggers
from scl_lightning.deploy.export import PRUNED_METADATA_KEYS, save_pruned
from scl_lightning.nn.sparsify import masked_modules
from scl_lightning.nn.stats import connectivity

__all__ = ["WandbArtifacts"]

_MAX_METADATA_KEYS = 100
# written by save_pruned itself (sparsity as global_sparsity): not repeated in the file header
_HEADER_SKIP = frozenset((*PRUNED_METADATA_KEYS, "sparsity"))


class WandbArtifacts(Callback):
    """At the end of ``fit``, log the final checkpoint and the pruned model as W&B artifacts.

    For every W&B logger among the Trainer's loggers (Lightning's ``WandbLogger`` or
    :class:`scl_lightning.experiment.loggers.WandbLogger`; runs with ``WANDB_MODE=disabled`` are
    skipped), on rank zero:

    * ``model-<run id>`` (type ``model``): the final checkpoint, the first ``ModelCheckpoint``'s
      ``last_model_path`` (or ``best_model_path`` without ``save_last``). Skipped when the logger
      was built with ``log_model``, which makes Lightning upload checkpoints itself under the
      same name.
    * ``pruned-model-<run id>`` (type ``model``): the state dict of
      :func:`scl_lightning.export_pruned` applied to the module's ``model`` attribute (the
      backbone of an :class:`~scl_lightning.SCLModule`) or, without one, to the module itself,
      written by :func:`scl_lightning.save_pruned` as a ``.safetensors`` file: plain tensors
      that load without unpickling anything (:func:`scl_lightning.load_pruned`, or any
      safetensors reader) and with ``strict=True`` into the never-masked architecture. Its
      header holds the metadata below as strings. It is written to the run directory
      (``trainer.log_dir``) as ``filename``, under a numbered name if that exists.
      Skipped, with a one-line message, when the network has no masked layer (a dense
      baseline).

    Both carry the epoch, global step, connection counts and the last logged scalar metrics as
    metadata. Online, W&B uploads them in the background before the run finishes. Offline,
    the files are copied into the offline run directory
    (``<save_dir>/wandb/offline-run-*/artifacts/<artifact name>/``) and the artifact points at
    those copies, so ``wandb sync`` of that directory uploads them. Without a W&B logger the
    callback does nothing and never imports ``wandb``. The ``scl`` command adds it to every
    ``fit`` that has a W&B logger.

    Args:
        checkpoint: log the final checkpoint.
        pruned_model: export and log the pruned model.
        filename: file name of the pruned weights in the run directory.

    Raises:
        ValueError: if ``filename`` does not end in ``.safetensors`` or contains a directory.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[WandbArtifacts()], logger=False)
    """

    def __init__(
        self,
        checkpoint: bool = True,
        pruned_model: bool = True,
        filename: str = "pruned_state_dict.safetensors",
    ) -> None:
        if (
            not isinstance(filename, str)
            or Path(filename).suffix != ".safetensors"
            or Path(filename).name != filename
        ):
            raise ValueError(
                f"filename must be a bare file name ending in .safetensors, got {filename!r}"
            )
        self.checkpoint = checkpoint
        self.pruned_model = pruned_model
        self.filename = filename
        self.pruned_path: Path | None = None
        self.logged: list[Any] = []  # the wandb.Artifact objects logged by the last fit

    @staticmethod
    def network(pl_module: pl.LightningModule) -> nn.Module:
        """The network to export: the module's ``model`` attribute, or the module itself."""
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, nn.Module) else pl_module

    @staticmethod
    def final_checkpoint(trainer: pl.Trainer) -> Path | None:
        """The first ``ModelCheckpoint``'s last checkpoint (or its best one), if it exists."""
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint):
            return None
        for path in (callback.last_model_path, callback.best_model_path):
            if path and Path(path).is_file():
                return Path(path)
        return None

    def export(
        self,
        pl_module: pl.LightningModule,
        directory: Path,
        metadata: Mapping[str, str | int | float | bool] | None = None,
    ) -> Path | None:
        """Write the pruned network's weights into ``directory`` with :func:`save_pruned`
        (``metadata`` in its header); ``None`` for a network without masked layers."""
        net = self.network(pl_module)
        if not any(True for _ in masked_modules(net)):
            rank_zero_info(
                f"WandbArtifacts: {type(net).__name__} has no masked layer (a dense baseline?); "
                "not exporting a pruned model"
            )
            return None
        directory.mkdir(parents=True, exist_ok=True)
        return save_pruned(net, next_free_path(directory / self.filename), metadata)

    def _metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        conn = connectivity(self.network(pl_module))
        metadata: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "active_connections": conn.active,
            "total_connections": conn.total,
            "sparsity": conn.sparsity,
        }
        for key, value in trainer.callback_metrics.items():
            # per-layer scalars are in the run's tables; W&B allows at most 100 metadata keys
            per_layer = key.startswith("flops/effective/") or (
                key.startswith("sparsity/")
                and key not in ("sparsity/global", "sparsity/global_including_dense")
            )
            if per_layer or len(metadata) >= _MAX_METADATA_KEYS:
                continue
            if isinstance(value, Tensor) and value.numel() == 1:
                metadata[key] = float(value.detach().cpu())
        return metadata

    @staticmethod
    def _log_artifact(
        run: Any, name: str, path: Path, metadata: dict[str, Any], description: str
    ) -> Any:
        import wandb

        artifact = wandb.Artifact(name, type="model", description=description, metadata=metadata)
        if run.offline:
            # W&B would stage a copy outside the run (under $WANDB_DATA_DIR); keep it inside, so
            # the offline run directory holds everything `wandb sync` needs
            staged = Path(run.dir).resolve().parent / "artifacts" / name / path.name
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staged)
            artifact.add_file(str(staged), name=path.name, policy="immutable")
        else:
            artifact.add_file(str(path), name=path.name)
        return run.log_artifact(artifact, aliases=["latest", "final"])

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `trainer.log_dir` broadcasts from rank zero: every rank reads it before returning
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        loggers = active_wandb_loggers(trainer.loggers)
        if not loggers:
            return
        checkpoint = self.final_checkpoint(trainer) if self.checkpoint else None
        if self.checkpoint and checkpoint is None:
            rank_zero_info("WandbArtifacts: no checkpoint file found; not logging a checkpoint")
        metadata = self._metadata(trainer, pl_module)
        if self.pruned_model:
            header = {k: v for k, v in metadata.items() if k not in _HEADER_SKIP}
            self.pruned_path = self.export(pl_module, directory, header)
        else:
            self.pruned_path = None
        self.logged = []
        for logger in loggers:
            run = logger.experiment
            if checkpoint is not None and not getattr(logger, "_log_model", False):
                self.logged.append(
                    self._log_artifact(
                        run,
                        f"model-{run.id}",
                        checkpoint,
                        metadata,
                        "final Lightning checkpoint (weights and masks)",
                    )
                )
            if self.pruned_path is not None:
                self.logged.append(
                    self._log_artifact(
                        run,
                        f"pruned-model-{run.id}",
                        self.pruned_path,
                        {**metadata, "network": type(self.network(pl_module)).__qualname__},
                        "state dict of scl_lightning.export_pruned(network) in safetensors "
                        "format (scl_lightning.load_pruned): plain tensors that load with "
                        "strict=True into the never-masked architecture",
                    )
                )
