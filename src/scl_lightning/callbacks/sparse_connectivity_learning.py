"""SparseConnectivityLearning: SCL for someone else's LightningModule, with no edit to it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor
from scl_lightning.nn.masked import MaskedLayer, validate_mask_init
from scl_lightning.nn.sparsify import masked_modules, sparsify
from scl_lightning.nn.ste import get_ste
from scl_lightning.training import (
    MASK_GROUP_KEY,
    attach_mask_group,
    drop_mask_grads,
    mask_parameters,
    masks_trainable,
    validate_phases,
    validate_positive,
)

__all__ = ["SparseConnectivityLearning"]


class SparseConnectivityLearning(Callback):
    """Drop-in Sparse Connectivity Learning for any LightningModule.

    Added to the Trainer, it

    1. sparsifies the module's network in ``setup`` (before the optimizer is built, so a
       checkpoint with masks loads and resumes),
    2. moves the masks into their own optimizer parameter group (``mask_lr``, no weight decay;
       the module's schedulers schedule it like the group it came from) in ``on_fit_start``,
    3. before each optimizer step, adds the gradient of ``lam * C`` to the mask gradients
       (``C`` = number of active connections, differentiated through the estimator, or ``C / N``
       with ``penalty="density"``) and normalizes them per feature, and
    4. logs sparsity and FLOPs like :class:`SparsityMonitor`.

    The penalty is added to the gradient once per optimizer step, so it is the same with or
    without gradient accumulation; the module's own loss and logs are untouched.

    Args:
        lam: weight of the connection penalty, ``>= 0``.
        penalty: ``"count"`` or ``"density"``.
        ste: straight-through estimator name.
        ste_kwargs: its hyper-parameters.
        mask_init: initial mask value, ``> 0``.
        exclude: module-name patterns (relative to ``target``) to leave dense.
        mask_lr: learning rate of the mask group, ``> 0``.
        normalize: per-feature normalization, ``"rms"``, ``"l2"``, ``"max"`` or ``"none"``.
        warmup_epochs: masks learn from this epoch on.
        freeze_masks_epoch: masks are frozen from this epoch on.
        target: attribute name of the network inside the module (``"model"``, ``"net"``);
            ``None`` sparsifies every maskable layer of the whole module.
        log_every_n_steps: sparsity/FLOPs logging interval.
        flops: trace and log FLOPs.

    Raises:
        ValueError: for an invalid argument; in ``setup`` if ``target`` is not a submodule.

    Example::

        >>> import lightning.pytorch as pl
        >>> scl = SparseConnectivityLearning(lam=1e-4, mask_lr=0.01)
        >>> trainer = pl.Trainer(callbacks=[scl], logger=False)
    """

    def __init__(
        self,
        lam: float = 2e-5,
        penalty: Literal["count", "density"] = "count",
        ste: str = "identity",
        ste_kwargs: dict[str, float] | None = None,
        mask_init: float = 1.0,
        exclude: Sequence[str] = (),
        mask_lr: float = 0.01,
        normalize: str = "rms",
        warmup_epochs: int = 0,
        freeze_masks_epoch: int | None = None,
        target: str | None = None,
        log_every_n_steps: int = 50,
        flops: bool = True,
    ) -> None:
        self.lam = validate_positive("lam", lam, allow_zero=True)
        self.mask_lr = validate_positive("mask_lr", mask_lr)
        if penalty not in ("count", "density"):
            raise ValueError(f"penalty must be 'count' or 'density', got {penalty!r}")
        validate_phases(warmup_epochs, freeze_masks_epoch)
        self.penalty = penalty
        self.ste = get_ste(ste, **(ste_kwargs or {}))
        self.mask_init = validate_mask_init(mask_init)
        # one pattern may be given as a plain string (as to `sparsify`): not its characters
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        for pattern in self.exclude:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"exclude patterns must be non-empty strings, got {pattern!r}")
        if target is not None and (not isinstance(target, str) or not target):
            raise ValueError(f"target must be an attribute name or None, got {target!r}")
        self.warmup_epochs = warmup_epochs
        self.freeze_masks_epoch = freeze_masks_epoch
        self.target = target
        self.normalization = MaskGradientNormalization(normalize)
        self.monitor = SparsityMonitor(log_every_n_steps=log_every_n_steps, flops=flops)
        self._masks: list[nn.Parameter] = []
        self._layers: list[MaskedLayer] = []

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.target is None:
            return pl_module
        net = getattr(pl_module, self.target, None)
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"SparseConnectivityLearning: target={self.target!r} is not a submodule of "
                f"{type(pl_module).__name__}; pass the attribute that holds the network or None"
            )
        return net

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = self._network(pl_module)
        if not any(True for _ in masked_modules(net)):
            sparsify(net, exclude=self.exclude, mask_init=self.mask_init, ste=self.ste)
        self._layers = [layer for _, layer in masked_modules(net)]
        self._masks = mask_parameters(net)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mask_ids = {id(m) for m in self._masks}
        # Lightning stands in an optimizer with no parameter groups when
        # configure_optimizers returns None
        optimizers = [o for o in trainer.optimizers if o.param_groups]
        if not optimizers:
            raise ValueError(
                "SparseConnectivityLearning needs the module to configure an optimizer"
            )
        owner = next(
            (
                o
                for o in optimizers
                if any(id(p) in mask_ids for g in o.param_groups for p in g["params"])
            ),
            None,
        )
        if owner is None:
            owner = optimizers[0]
            rank_zero_info(
                "SparseConnectivityLearning: the module's optimizer does not hold the "
                "masks; adding them to its first optimizer."
            )
        if not any(g.get(MASK_GROUP_KEY) for g in owner.param_groups):
            schedulers = [
                c.scheduler
                for c in trainer.lr_scheduler_configs
                if getattr(c.scheduler, "optimizer", None) is owner
            ]
            attach_mask_group(owner, self._masks, self.mask_lr, schedulers)
        self.normalization.on_fit_start(trainer, pl_module)

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not any(g.get(MASK_GROUP_KEY) for g in optimizer.param_groups):
            return
        if not masks_trainable(trainer.current_epoch, self.warmup_epochs, self.freeze_masks_epoch):
            drop_mask_grads(self._masks)
            return
        if self.lam > 0:
            scale = self.lam
            if self.penalty == "density":
                scale /= sum(m.numel() for m in self._masks)
            for layer in self._layers:
                # the layer's own estimator, as in its forward pass: a network sparsified
                # before this callback keeps the estimator it was given
                layer_mask = layer.mask
                penalty = layer.ste.proxy(layer_mask).mul_(scale)
                if layer_mask.grad is None:
                    layer_mask.grad = penalty
                else:
                    layer_mask.grad.add_(penalty)
        self.normalization.on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.monitor.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.on_train_epoch_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict.get("monitor", {}))
