"""SCLModule: any backbone + task loss + lambda * (number of active connections)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from scl_lightning._compat import CheckpointError, check_compatible
from scl_lightning._utils import is_int
from scl_lightning.callbacks._logging import logs_this_step
from scl_lightning.callbacks.sparse_connectivity_learning import SparseConnectivityLearning
from scl_lightning.models import create_model
from scl_lightning.nn.coverage import DenseLayersWarning
from scl_lightning.nn.sparsify import sparsify as _sparsify
from scl_lightning.nn.stats import connectivity

__all__ = ["SCLModule"]

_MODULE_MARK = "<module>:"


def _fusable(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused optimizer kernels take every parameter (float32 or float64, on one
    of the devices they support): one pass per tensor for the whole update (weight decay,
    momentum, step) instead of four; the same update, rounded differently in the last bit.

    Not for 16-bit parameters (``bf16-true``): measured on the digits MLP (bench/precision.py),
    torch's fused SGD on bfloat16 weights ends at 0.79 validation accuracy where the foreach SGD
    reaches the fp32 run's 0.94."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: fall back to the two devices every release has
        devices = {"cpu", "cuda"}
    return bool(params) and all(
        p.device.type in devices and p.dtype in (torch.float32, torch.float64) for p in params
    )


class SCLModule(pl.LightningModule):
    """LightningModule for Sparse Connectivity Learning on classification tasks.

    The backbone's ``nn.Linear``/``nn.ConvNd`` layers are masked with
    :func:`~scl_lightning.sparsify` and trained on ``task_loss + lam * C``, where ``C`` is the
    number of active connections (or the active fraction with ``penalty="density"``), counted
    over the masked layers (:func:`~scl_lightning.nn.connectivity`).

    The method itself is not written here: the module brings the SCL engine,
    :class:`~scl_lightning.callbacks.SparseConnectivityLearning`, through
    ``configure_callbacks`` (available as :attr:`engine`). It moves the masks into an optimizer
    group of their own (``mask_lr``, no weight decay), adds the penalty's gradient and
    normalizes the mask gradients per feature before each optimizer step, runs the phases,
    keeps masks out of gradient clipping, guards against collapse and logs sparsity and FLOPs,
    exactly as it does for anyone's LightningModule: SCLModule and the drop-in callback train
    identically by construction. This module adds a classifier around it: backbone, task loss,
    accuracy metrics, default optimizer and schedule, and the objective's logs
    ``train/loss`` (``task + lam * C``, the value returned by ``training_step``; its gradient
    is the task loss's, the penalty's is the engine's), ``train/task_loss`` (both in the
    progress bar), ``train/penalty`` and ``train/connections``.

    Args:
        backbone: an ``nn.Module``, or a model registry name (see
            :func:`scl_lightning.models.list_models`) built with ``num_classes``,
            ``input_shape`` and ``backbone_kwargs``.
        num_classes: number of classes (for registry models and accuracy metrics).
        input_shape: shape of one input sample, e.g. ``(1, 8, 8)``; enables FLOPs tracing before
            the first batch and the input/output sizes in Lightning's model summary.
        backbone_kwargs: extra arguments of a registry model.
        lam: weight of the connection penalty, ``>= 0``; ``None``: 2e-5 without a target, set
            by the controller with one (giving both is an error).
        penalty: ``"count"`` (``C``, the paper's objective), ``"density"`` (``C / N``) or
            ``"flops"`` (each connection weighted by its multiply-adds per sample); ``None``:
            ``"flops"`` with ``target_flops``, else ``"count"``.
        sparsify: mask the backbone; ``False`` gives the dense baseline with everything else
            identical.
        ste: straight-through estimator name: ``identity``, ``leaky_relu``, ``softplus``,
            ``hardtanh``.
        ste_kwargs: the estimator's hyper-parameters, e.g. ``{"alpha": 0.1}``.
        mask_grad_norm: per-feature normalization of the mask gradients (the engine's
            ``normalize``): ``"rms"``, ``"l2"``, ``"max"`` or ``"none"``. A
            :class:`~scl_lightning.callbacks.MaskGradientNormalization` callback in the Trainer
            overrides it with its own ``mode``.
        mask_init: initial value of every mask variable, ``> 0``.
        exclude: module-name patterns (relative to the backbone) to leave dense.
        task_loss: the task loss; cross-entropy when ``None``.
        optimizer: builds the optimizer from the parameters; when ``None``,
            ``SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)``, fused where torch has fused
            kernels for the parameters' device (CPU, CUDA, ...). The engine then moves the masks
            to a group of their own with ``lr=mask_lr`` and no weight decay.
        lr_scheduler: builds a scheduler from the optimizer; ``None`` means cosine annealing to 0
            over the whole run, stepped every optimizer step. The mask group follows the same
            schedule relative to ``mask_lr`` (``mask_lr`` is to the masks what the optimizer's
            base ``lr`` is to the weights).
        lr_scheduler_config: Lightning's scheduler settings for ``lr_scheduler``, e.g.
            ``{"interval": "step"}`` or ``{"monitor": "val/loss"}`` (ReduceLROnPlateau).
        constant_lr: turn the default schedule off (ignored when ``lr_scheduler`` is given).
        lr_reference_batch_size: scale every learning rate (masks too) by
            ``global batch / lr_reference_batch_size`` (the linear scaling rule), where the
            global batch is the data module's per-device ``batch_size`` x devices x nodes x
            ``accumulate_grad_batches``; ``None`` uses the rates as given.
        mask_lr: learning rate of the masks, ``> 0``.
        warmup_epochs: dense warm-up: masks do not learn (and no penalty) before this epoch.
        freeze_masks_epoch: fine-tune phase: masks are frozen from this epoch on.
        min_connections_per_layer: no masked layer is left with fewer active connections (its
            strongest masks are raised back above zero); ``0`` only warns, once per layer, when
            a layer loses every connection and cuts the network in two. See
            :class:`~scl_lightning.nn.LayerCollapseGuard`.
        target_sparsity: ask for this global sparsity (masked layers), in ``[0, 1)``, instead
            of a ``lam``: the engine adapts lambda to reach it (``docs/guide.md``, "Budgets").
        target_flops: ask for these effective FLOPs per sample, as a fraction of dense.
        target_epoch, target_step: when the target must be reached (default: 20% of the way
            through the mask-learning phase).
        freeze_at_target: freeze the masks once the target is held within
            ``target_tolerance``; the rest of the run fine-tunes.
        control_gain: the controller's integral gain.
        granularity: ``"weight"`` (one mask variable per connection, the paper's method) or
            ``"channel"`` (one per output unit or channel: whole units are pruned, which a dense
            device can turn into speed once the network is compacted; coarser, so usually less
            accurate at the same sparsity). Counts, penalty, targets and logs stay in
            connections. See ``docs/guide.md``, "Channel granularity".

    Raises:
        ValueError: for an invalid argument (the message names it and the bad value).

    Example::

        >>> module = SCLModule("lenet_300_100", num_classes=10, input_shape=(1, 8, 8))
        >>> logits = module(torch.randn(2, 1, 8, 8))
        >>> tuple(logits.shape), module.total_connections
        ((2, 10), 50200)
    """

    def __init__(
        self,
        backbone: nn.Module | str = "lenet_300_100",
        num_classes: int = 10,
        input_shape: Sequence[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lam: float | None = None,
        penalty: Literal["count", "density", "flops"] | None = None,
        sparsify: bool = True,
        ste: str = "identity",
        ste_kwargs: dict[str, float] | None = None,
        mask_grad_norm: str = "rms",
        mask_init: float = 1.0,
        exclude: Sequence[str] = (),
        task_loss: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_config: dict[str, Any] | None = None,
        constant_lr: bool = False,
        lr_reference_batch_size: int | None = None,
        mask_lr: float = 0.01,
        warmup_epochs: int = 0,
        freeze_masks_epoch: int | None = None,
        min_connections_per_layer: int = 0,
        target_sparsity: float | None = None,
        target_flops: float | None = None,
        target_epoch: int | None = None,
        target_step: int | None = None,
        freeze_at_target: bool = False,
        target_tolerance: float = 0.005,
        control_gain: float = 1.0,
        granularity: str = "weight",
    ) -> None:
        super().__init__()
        if not is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if lr_reference_batch_size is not None and (
            not is_int(lr_reference_batch_size) or lr_reference_batch_size < 1
        ):
            raise ValueError(
                "lr_reference_batch_size must be a positive integer or None, "
                f"got {lr_reference_batch_size!r}"
            )
        # Every SCL argument is checked by the engine, even for a dense run, so a recipe's typo
        # never waits for its SCL variant.
        self._engine = SparseConnectivityLearning(
            lam=lam,
            penalty=penalty,
            ste=ste,
            ste_kwargs=ste_kwargs,
            mask_init=mask_init,
            exclude=exclude,
            mask_lr=mask_lr,
            normalize=mask_grad_norm,
            warmup_epochs=warmup_epochs,
            freeze_masks_epoch=freeze_masks_epoch,
            target="model",
            min_connections_per_layer=min_connections_per_layer,
            sparsify=False,  # masked here, below, so that checkpoints load without a Trainer
            target_sparsity=target_sparsity,
            target_flops=target_flops,
            target_epoch=target_epoch,
            target_step=target_step,
            freeze_at_target=freeze_at_target,
            target_tolerance=target_tolerance,
            control_gain=control_gain,
            granularity=granularity,
        )
        if isinstance(backbone, str) and backbone.startswith(_MODULE_MARK):
            raise ValueError(
                f"this checkpoint was trained with a backbone module "
                f"({backbone[len(_MODULE_MARK) :]}), not a registry name: pass it again, e.g. "
                "SCLModule.load_from_checkpoint(path, backbone=MyNet(...))"
            )
        self.save_hyperparameters(
            ignore=["task_loss", "optimizer", "lr_scheduler"]
            + ([] if isinstance(backbone, str) else ["backbone"])
        )
        if not isinstance(backbone, str):
            # a module cannot be rebuilt from hparams: record what it was, so that
            # `load_from_checkpoint` without `backbone=` fails with a clear message
            self.hparams["backbone"] = _MODULE_MARK + type(backbone).__qualname__
        if isinstance(backbone, str):
            backbone = create_model(
                backbone,
                num_classes=num_classes,
                input_shape=tuple(input_shape) if input_shape is not None else None,
                **(backbone_kwargs or {}),
            )
        elif backbone_kwargs:
            raise ValueError("backbone_kwargs only applies when backbone is a registry name")
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"backbone must be an nn.Module or a model name, got {backbone!r}")
        if sparsify:
            with warnings.catch_warnings():
                # the engine says it at fit start, one line (`SparseConnectivityLearning`)
                warnings.simplefilter("ignore", DenseLayersWarning)
                _sparsify(
                    backbone,
                    exclude=exclude,
                    mask_init=mask_init,
                    ste=ste,
                    ste_kwargs=ste_kwargs,
                    granularity=granularity,
                )
        self.model = backbone
        self._engine.collect_layers(backbone)
        self.constant_lr = constant_lr
        self.lr_scheduler_config = lr_scheduler_config
        self.lr_reference_batch_size = lr_reference_batch_size
        self.task_loss = task_loss if task_loss is not None else nn.CrossEntropyLoss()
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        if input_shape is not None:
            self.example_input_array = torch.zeros(1, *input_shape)
        #: connections of the masked layers (every maskable layer's for a dense run)
        self.total_connections = connectivity(self.model).total
        self._metrics_registered: set[str] = set()
        for stage in ("train", "val", "test"):
            # average="micro": the usual top-k accuracy (torchmetrics defaults to per-class macro)
            metrics = {f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")}
            if num_classes >= 5:
                metrics[f"{stage}_acc_top5"] = MulticlassAccuracy(
                    num_classes, top_k=5, average="micro"
                )
            for name, metric in metrics.items():
                if stage == "train":
                    # in checkpoints, so a run resumed mid-epoch reports the epoch's accuracy
                    # over all of its batches, not just those after the resume
                    metric.persistent(True)
                setattr(self, name, metric)

    @property
    def engine(self) -> SparseConnectivityLearning:
        """The SCL engine this module brings to the Trainer (``configure_callbacks``)."""
        return self._engine

    @property
    def lam(self) -> float:
        """The weight of the connection penalty (the engine's)."""
        return self._engine.lam

    @property
    def penalty(self) -> str:
        return self._engine.penalty

    @property
    def mask_lr(self) -> float:
        return self._engine.mask_lr

    @property
    def warmup_epochs(self) -> int:
        return self._engine.warmup_epochs

    @property
    def freeze_masks_epoch(self) -> int | None:
        return self._engine.freeze_masks_epoch

    @property
    def masks(self) -> list[nn.Parameter]:
        """The backbone's mask variables, in module order (empty for a dense run)."""
        return [layer.mask for layer in self._engine._layers.values()]

    @property
    def masks_learning(self) -> bool:
        """Whether masks are trained in the current epoch (phases and ``sparsify``)."""
        return self._engine.has_masks and self._engine.masks_learning(self.current_epoch)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @override
    def configure_callbacks(self) -> list[Callback]:
        # Lightning adds it to the Trainer's callbacks (replacing one of the same type)
        return [self._engine]

    def _shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, int]:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.task_loss(logits, y)
        # update(), not forward: the per-batch value forward computes is never logged
        # (on_step=False), and computing it doubles the metrics' cost per step
        acc = getattr(self, f"{stage}_acc")
        acc.update(logits, y)
        top5 = getattr(self, f"{stage}_acc_top5", None)
        if top5 is not None:
            top5.update(logits, y)
        bs = y.shape[0]
        if stage not in self._metrics_registered:
            # A metric object is registered with Lightning once per epoch: its state lives in
            # the object, Lightning computes and resets it at the epoch's end, and one more
            # `log` per batch would cost more than the update itself.
            self._metrics_registered.add(stage)
            self.log(
                f"{stage}/acc",
                acc,
                prog_bar=stage != "train",
                on_step=False,
                on_epoch=True,
                batch_size=bs,
            )
            if top5 is not None:
                self.log(f"{stage}/acc_top5", top5, on_step=False, on_epoch=True, batch_size=bs)
        return logits, loss, bs

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        _, task_loss, n = self._shared_step(batch, "train")
        loss = task_loss
        logs = self._trainer is None or logs_this_step(self._trainer)
        penalized = self.masks_learning and self.lam > 0
        active: Tensor | float = float(self.total_connections)
        penalty: Tensor | float = 0.0
        if self._engine.has_masks and (penalized or logs):
            # The objective's value, task + lam * C, for the connections this forward pass
            # used. Its gradient is not taken from here: the engine adds lam * proxy(m) to the
            # mask gradients before the optimizer step, for this module and the drop-in alike.
            active, term = self._engine.penalty_value()
            if penalized:
                penalty = term
                loss = task_loss + term.to(task_loss.device, task_loss.dtype)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        # Lightning's `log` costs about as much as a small network's whole step, so values that
        # only the loggers see are logged on the steps Lightning writes to them, no others.
        # The task loss is also in the progress bar, next to the total (which alone hides how
        # much of it is the penalty), as of the last logging step like `sparsity/global` (any
        # other step would make a resumed run end with other callback_metrics).
        if logs:
            self.log("train/task_loss", task_loss, prog_bar=True, batch_size=n)
            self.log("train/penalty", penalty, batch_size=n)
            self.log("train/connections", active, batch_size=n)
        return loss

    @override
    def on_train_epoch_start(self) -> None:
        self._metrics_registered.discard("train")

    @override
    def on_validation_epoch_start(self) -> None:
        self._metrics_registered.discard("val")

    @override
    def on_test_epoch_start(self) -> None:
        self._metrics_registered.discard("test")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # before Lightning loads the state dict: a checkpoint of another model gets one clear
        # line instead of load_state_dict's list of every missing and unexpected key
        trainer = self._trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        source = f"checkpoint {path}" if path else "the checkpoint"
        trained = checkpoint.get("hyper_parameters", {}).get("backbone")
        here = self.hparams.get("backbone")
        if isinstance(trained, str) and isinstance(here, str) and trained != here:
            raise CheckpointError(
                f"{source} was trained with backbone {trained!r} and this run builds {here!r}; "
                f"pass --model.backbone {trained} (or the checkpoint of a {here} run)"
            )
        # metric states (the running train accuracy) are not part of the architecture, and
        # checkpoints saved before they were persistent lack them
        metrics = tuple(f"{n}." for n, m in self.named_modules() if isinstance(m, Metric))

        def weights(state: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in state.items() if not k.startswith(metrics)}

        check_compatible(
            weights(self.state_dict()), weights(checkpoint.get("state_dict", {})), source
        )

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        _, loss, bs = self._shared_step(batch, "val")
        # each DDP rank validates its own shard: average the loss over all of them
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        # the data modules' batches are (inputs, labels): predict from the inputs
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        _, loss, bs = self._shared_step(batch, "test")
        self.log("test/loss", loss, batch_size=bs, sync_dist=True)

    def _global_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if not isinstance(per_device, int):
            raise ValueError(
                "lr_reference_batch_size needs the data module's per-device `batch_size`; "
                "set it on the data module or leave lr_reference_batch_size unset"
            )
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self._optimizer_factory is not None:
            try:
                optimizer = self._optimizer_factory(params)
            except ValueError as err:  # torch's own checks ("Invalid learning rate: -1.0")
                raise ValueError(f"model.optimizer: {err}") from None
        else:
            optimizer = torch.optim.SGD(
                params, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=_fusable(params) or None
            )
        self._engine.lr_scale = 1.0
        if self.lr_reference_batch_size is not None:
            factor = self._global_batch_size() / self.lr_reference_batch_size
            for group in optimizer.param_groups:
                group["lr"] *= factor
            self._engine.lr_scale = factor  # the engine's mask group gets mask_lr * factor
        scheduler: Any = None
        config: dict[str, Any] = {}
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory(optimizer)
            config = dict(self.lr_scheduler_config or {})
        elif not self.constant_lr:
            total_steps = float(self.trainer.estimated_stepping_batches)
            if math.isfinite(total_steps):
                scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                    optimizer, T_max=max(1, int(total_steps))
                )
                config = {"interval": "step"}
            else:
                rank_zero_warn(
                    "SCLModule: the run length is unknown (no max_steps/max_epochs), so the "
                    "default cosine schedule is off; pass lr_scheduler or set a limit"
                )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **config}}
