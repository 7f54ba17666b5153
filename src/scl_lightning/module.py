"""SCLModule: any backbone + task loss + lambda * (number of active connections)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor
from scl_lightning.flops import maskable_connectivity
from scl_lightning.models import create_model
from scl_lightning.nn.sparsify import sparsify as _sparsify
from scl_lightning.nn.stats import connection_count
from scl_lightning.training import (
    MASK_GROUP_KEY,
    drop_mask_grads,
    mask_parameters,
    masks_trainable,
    validate_phases,
    validate_positive,
)

__all__ = ["SCLModule"]


class SCLModule(pl.LightningModule):
    """LightningModule for Sparse Connectivity Learning on classification tasks.

    The backbone's ``nn.Linear``/``nn.ConvNd`` layers are masked with
    :func:`~scl_lightning.sparsify` and trained on ``task_loss + lam * C``, where ``C`` is the
    number of active connections (or the active fraction with ``penalty="density"``). Weights and
    masks are separate optimizer parameter groups: masks get ``mask_lr`` and no weight decay.
    Pair it with :class:`~scl_lightning.callbacks.MaskGradientNormalization` (a warning says so
    when it is missing) and, for FLOPs, :class:`~scl_lightning.callbacks.SparsityMonitor`.

    Args:
        backbone: an ``nn.Module``, or a model registry name (see
            :func:`scl_lightning.models.list_models`) built with ``num_classes``,
            ``input_shape`` and ``backbone_kwargs``.
        num_classes: number of classes (for registry models and accuracy metrics).
        input_shape: shape of one input sample, e.g. ``(1, 8, 8)``; enables FLOPs tracing before
            the first batch and the input/output sizes in Lightning's model summary.
        backbone_kwargs: extra arguments of a registry model.
        lam: weight of the connection penalty, ``>= 0``.
        penalty: ``"count"`` (``C``, the paper's objective) or ``"density"`` (``C / N``).
        sparsify: mask the backbone; ``False`` gives the dense baseline with everything else
            identical.
        ste: straight-through estimator name: ``identity``, ``leaky_relu``, ``softplus``,
            ``hardtanh``.
        ste_kwargs: the estimator's hyper-parameters, e.g. ``{"alpha": 0.1}``.
        mask_init: initial value of every mask variable, ``> 0``.
        exclude: module-name patterns (relative to the backbone) to leave dense.
        task_loss: the task loss; cross-entropy when ``None``.
        optimizer: builds the optimizer from parameter groups; when ``None``,
            ``SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)``. The mask group overrides ``lr``
            and ``weight_decay``.
        lr_scheduler: builds a scheduler from the optimizer; ``None`` means cosine annealing to 0
            over the whole run, stepped every optimizer step (both groups).
        constant_lr: turn the default schedule off (ignored when ``lr_scheduler`` is given).
        mask_lr: learning rate of the masks, ``> 0``.
        warmup_epochs: dense warm-up: masks do not learn (and no penalty) before this epoch.
        freeze_masks_epoch: fine-tune phase: masks are frozen from this epoch on.

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
        lam: float = 2e-5,
        penalty: Literal["count", "density"] = "count",
        sparsify: bool = True,
        ste: str = "identity",
        ste_kwargs: dict[str, float] | None = None,
        mask_init: float = 1.0,
        exclude: Sequence[str] = (),
        task_loss: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        constant_lr: bool = False,
        mask_lr: float = 0.01,
        warmup_epochs: int = 0,
        freeze_masks_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        validate_positive("lam", lam, allow_zero=True)
        validate_positive("mask_lr", mask_lr)
        if penalty not in ("count", "density"):
            raise ValueError(f"penalty must be 'count' or 'density', got {penalty!r}")
        validate_phases(warmup_epochs, freeze_masks_epoch)
        self.save_hyperparameters(
            ignore=["task_loss", "optimizer", "lr_scheduler"]
            + ([] if isinstance(backbone, str) else ["backbone"])
        )
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
            _sparsify(
                backbone, exclude=exclude, mask_init=mask_init, ste=ste, ste_kwargs=ste_kwargs
            )
        self.model = backbone
        self._masks = mask_parameters(backbone)
        self.lam = float(lam)
        self.penalty = penalty
        self.mask_lr = float(mask_lr)
        self.warmup_epochs = warmup_epochs
        self.freeze_masks_epoch = freeze_masks_epoch
        self.constant_lr = constant_lr
        self.task_loss = task_loss if task_loss is not None else nn.CrossEntropyLoss()
        self._optimizer_factory = optimizer
        self._scheduler_factory = lr_scheduler
        if input_shape is not None:
            self.example_input_array = torch.zeros(1, *input_shape)
        self.total_connections = sum(t for _, t in maskable_connectivity(self.model).values())
        self._log_sparsity = True
        for stage in ("train", "val", "test"):
            # average="micro": the usual top-k accuracy (torchmetrics defaults to per-class macro)
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            if num_classes >= 5:
                setattr(
                    self,
                    f"{stage}_acc_top5",
                    MulticlassAccuracy(num_classes, top_k=5, average="micro"),
                )

    @property
    def masks(self) -> list[nn.Parameter]:
        """The backbone's mask variables (empty for a dense run)."""
        return self._masks

    @property
    def masks_learning(self) -> bool:
        """Whether masks are trained in the current epoch (phases and ``sparsify``)."""
        return bool(self.masks) and masks_trainable(
            self.current_epoch, self.warmup_epochs, self.freeze_masks_epoch
        )

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @override
    def on_fit_start(self) -> None:
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        self._log_sparsity = not any(isinstance(c, SparsityMonitor) for c in callbacks)
        if self.masks and not any(isinstance(c, MaskGradientNormalization) for c in callbacks):
            rank_zero_warn(
                "SCLModule: no MaskGradientNormalization callback; raw mask gradients are badly "
                "unbalanced across features and masks may barely move. Add "
                "`scl_lightning.callbacks.MaskGradientNormalization()` to the Trainer's callbacks."
            )

    def _shared_step(self, batch: Any, stage: str) -> tuple[Tensor, Tensor, int]:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.task_loss(logits, y)
        getattr(self, f"{stage}_acc")(logits, y)
        bs = y.shape[0]
        self.log(
            f"{stage}/acc",
            getattr(self, f"{stage}_acc"),
            prog_bar=stage != "train",
            on_step=False,
            on_epoch=True,
            batch_size=bs,
        )
        if hasattr(self, f"{stage}_acc_top5"):
            getattr(self, f"{stage}_acc_top5")(logits, y)
            self.log(
                f"{stage}/acc_top5",
                getattr(self, f"{stage}_acc_top5"),
                on_step=False,
                on_epoch=True,
                batch_size=bs,
            )
        return logits, loss, bs

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        _, task_loss, n = self._shared_step(batch, "train")
        loss = task_loss
        if not self.masks:
            active = torch.tensor(float(self.total_connections))
        elif self.masks_learning and self.lam > 0:
            density = self.penalty == "density"
            count = connection_count(self.model, density=density)
            loss = task_loss + self.lam * count
            active = count.detach() * (self.total_connections if density else 1)
        else:
            active = connection_count(self.model).detach()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/task_loss", task_loss, batch_size=n)
        self.log("train/connections", active, batch_size=n)
        if self._log_sparsity:
            self.log(
                "sparsity/global",
                1.0 - active / self.total_connections,
                prog_bar=True,
                batch_size=n,
            )
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        _, loss, bs = self._shared_step(batch, "val")
        self.log("val/loss", loss, prog_bar=True, batch_size=bs)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        _, loss, bs = self._shared_step(batch, "test")
        self.log("test/loss", loss, batch_size=bs)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the callbacks' hook of the same name. In the warm-up and fine-tune phases
        # the masks' gradients are discarded so the optimizer leaves them untouched.
        if self.masks and not self.masks_learning:
            drop_mask_grads(self.masks)

    @override
    def configure_optimizers(self) -> Any:
        masks = self.masks
        mask_ids = {id(m) for m in masks}
        weights = [p for p in self.parameters() if p.requires_grad and id(p) not in mask_ids]
        groups: list[dict[str, Any]] = [{"params": weights}]
        if masks:
            groups.append(
                {
                    "params": masks,
                    "lr": self.mask_lr,
                    "weight_decay": 0.0,
                    MASK_GROUP_KEY: True,
                }
            )
        if self._optimizer_factory is not None:
            optimizer = self._optimizer_factory(groups)
        else:
            optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=5e-4)
        if masks:  # an optimizer factory may not keep per-group keys it does not know
            optimizer.param_groups[-1].update(lr=self.mask_lr, weight_decay=0.0)
        if self._scheduler_factory is not None:
            scheduler = self._scheduler_factory(optimizer)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}
        if self.constant_lr:
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}
