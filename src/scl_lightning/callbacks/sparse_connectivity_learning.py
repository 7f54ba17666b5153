"""SparseConnectivityLearning: THE SCL engine, for any LightningModule (``SCLModule`` included).

Everything the method does during training lives here, once: the mask parameter group, the
penalty ``lam * C`` and its gradient, per-feature normalization, the warm-up and freeze phases,
the exclusion of masks from gradient clipping, the collapse guard, lambda's display and the
sparsity/FLOPs logs. :class:`~scl_lightning.SCLModule` is a classifier that brings this same
callback through ``configure_callbacks``, so the two faces of SCL cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from scl_lightning._utils import is_int, validate_positive
from scl_lightning.callbacks._precision import unscale_gradients
from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.mask_group import (
    MASK_GROUP_KEY,
    attach_mask_group,
    drop_mask_grads,
)
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor
from scl_lightning.nn.collapse import LayerCollapseGuard
from scl_lightning.nn.masked import MaskedLayer, validate_mask_init
from scl_lightning.nn.normalize import normalize_per_feature, validate_norm_mode
from scl_lightning.nn.sparsify import maskable_modules, masked_modules, sparsify
from scl_lightning.nn.ste import get_ste

__all__ = ["SparseConnectivityLearning", "masks_trainable", "validate_phases"]


def validate_phases(warmup_epochs: int, freeze_masks_epoch: int | None) -> None:
    """Check the dense warm-up length and the epoch from which masks are frozen."""
    if not is_int(warmup_epochs) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
    if freeze_masks_epoch is not None:
        if not is_int(freeze_masks_epoch):
            raise ValueError(
                f"freeze_masks_epoch must be an integer or None, got {freeze_masks_epoch!r}"
            )
        if freeze_masks_epoch <= warmup_epochs:
            raise ValueError(
                f"freeze_masks_epoch ({freeze_masks_epoch}) must be greater than warmup_epochs "
                f"({warmup_epochs}), or masks would never be trained"
            )


def masks_trainable(
    epoch: int, warmup_epochs: int = 0, freeze_masks_epoch: int | None = None
) -> bool:
    """Whether masks learn in ``epoch``: after the dense warm-up, before the fine-tune phase."""
    return epoch >= warmup_epochs and (freeze_masks_epoch is None or epoch < freeze_masks_epoch)


class SparseConnectivityLearning(Callback):
    """Sparse Connectivity Learning for any LightningModule: the one SCL engine.

    Added to the Trainer (or brought by a module's ``configure_callbacks``, as
    :class:`~scl_lightning.SCLModule` does), it

    1. sparsifies the module's network in ``setup`` (before the optimizer is built, so a
       checkpoint with masks loads and resumes) unless it has masked layers already,
    2. moves the masks into their own optimizer parameter group (``mask_lr``, no weight decay,
       named ``<group name>/masks`` when the groups are named; the module's schedulers schedule
       it like the group it came from) in ``on_fit_start``,
    3. before each optimizer step, on true (unscaled) gradients whatever the precision plugin
       and optimizer (fused ones under ``16-mixed`` included), adds the gradient of
       ``lam * C`` to the mask gradients (``C`` = number of active connections, differentiated
       through each layer's estimator, or ``C / N`` with ``penalty="density"``) and normalizes
       them per feature, and
    4. logs sparsity and FLOPs with a :class:`SparsityMonitor` (unless the Trainer has one of
       its own), guards layers against collapse and shows ``lam`` in the progress bar.

    The penalty is added to the gradient once per optimizer step, so it is the same with or
    without gradient accumulation; the module's own loss and logs are untouched (SCLModule
    logs the objective's value, ``task + lam * C``, with :meth:`penalty_value`). With several
    optimizers (a GAN, say) each keeps its own masks in its own mask group. Gradient clipping
    (``Trainer(gradient_clip_val=...)``) applies to the weights only: normalized mask gradients
    would otherwise dominate the clipping norm. A :class:`MaskGradientNormalization` callback
    in the Trainer is taken over: its ``mode`` and ``eps`` replace ``normalize``, and it runs
    here, after the penalty is added, not on its own. Masks stay float32 under ``bf16-true`` and
    ``16-true`` (see :class:`~scl_lightning.nn.MaskedLinear`). Sharded strategies that flatten
    parameters (FSDP, DeepSpeed) are not supported.

    Args:
        lam: weight of the connection penalty, ``>= 0``.
        penalty: ``"count"`` or ``"density"``.
        ste: straight-through estimator name (for layers this callback masks).
        ste_kwargs: its hyper-parameters.
        mask_init: initial mask value, ``> 0``.
        exclude: module-name patterns (relative to ``target``) to leave dense.
        mask_lr: learning rate of the mask group, ``> 0``.
        normalize: per-feature normalization, ``"rms"``, ``"l2"``, ``"max"`` or ``"none"``.
        warmup_epochs: masks learn from this epoch on.
        freeze_masks_epoch: masks are frozen from this epoch on.
        target: attribute name of the network inside the module (``"model"``, ``"net"``);
            ``None`` sparsifies every maskable layer of the whole module.
        log_every_n_steps: sparsity/FLOPs logging interval (``None``: the Trainer's).
        flops: trace and log FLOPs.
        min_connections_per_layer: keep at least this many active connections in every layer;
            ``0`` only warns, once per layer, when a layer loses them all.
        sparsify: mask the network in ``setup`` when it has no masked layer; ``False`` trains
            the masked layers it has, and a network without any dense (a baseline with the same
            logs).

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
        log_every_n_steps: int | None = None,
        flops: bool = True,
        min_connections_per_layer: int = 0,
        sparsify: bool = True,
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
        self.normalize = validate_norm_mode(normalize)
        self.eps = 1e-12
        self.sparsify = bool(sparsify)
        #: multiplies ``mask_lr`` when the mask group is built (SCLModule's linear scaling rule)
        self.lr_scale = 1.0
        self.monitor = SparsityMonitor(log_every_n_steps=log_every_n_steps, flops=flops)
        self._collapse = LayerCollapseGuard(min_connections_per_layer)
        self._monitoring = True
        self._lam_shown = False
        self._layers: dict[int, MaskedLayer] = {}  # id(mask) -> layer, in module order
        self._total = 0
        self._wrapped: pl.LightningModule | None = None
        self._adopted: list[MaskGradientNormalization] = []

    # -- the method, as plain functions of the state ----------------------------------------

    @property
    def min_connections_per_layer(self) -> int:
        return self._collapse.min_connections

    def masks_learning(self, epoch: int) -> bool:
        """Whether masks learn in ``epoch`` (the warm-up and freeze phases)."""
        return masks_trainable(epoch, self.warmup_epochs, self.freeze_masks_epoch)

    @property
    def total_connections(self) -> int:
        """Connections of the masked layers (``N`` of ``penalty="density"``); 0 before setup."""
        return self._total

    @torch.no_grad()
    def penalty_value(self) -> tuple[Tensor, Tensor]:
        """``(C, lam * C)`` (or ``lam * C / N`` with ``penalty="density"``) for the latest
        forward pass, detached: ``C`` counts the connections that pass used
        (:meth:`~scl_lightning.nn.MaskedLayer.forward_count`), at no extra pass over the masks.
        The penalty's gradient is not taken from this value but added by the engine before the
        optimizer step."""
        if not self._layers:
            zero = torch.zeros(())
            return zero, zero
        counts = [layer.forward_count() for layer in self._layers.values()]
        dtype = torch.float64 if any(c.dtype == torch.float64 for c in counts) else torch.float32
        count = torch.stack([c.to(dtype) for c in counts]).sum()
        term = self.lam * (count / self._total if self.penalty == "density" else count)
        return count, term

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

    # -- set-up ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        candidate = pl_module if self.target is None else getattr(pl_module, self.target, None)
        built = isinstance(candidate, nn.Module) and any(True for _ in maskable_modules(candidate))
        if not built and is_overridden("configure_model", pl_module):
            # The module builds its layers in `configure_model`, which Lightning calls after
            # this hook; its contract is that the hook is idempotent, so build them now.
            pl_module.configure_model()
        net = self._network(pl_module)
        if self.sparsify and not any(True for _ in masked_modules(net)):
            sparsify(net, exclude=self.exclude, mask_init=self.mask_init, ste=self.ste)
        self.collect_layers(net)

    def collect_layers(self, network: nn.Module) -> None:
        """Train the masked layers of ``network`` (``setup`` calls it on the target)."""
        self._layers = {id(layer.mask): layer for _, layer in masked_modules(network)}
        self._total = sum(layer.mask.numel() for layer in self._layers.values())

    @property
    def has_masks(self) -> bool:
        """Whether the network has masked layers to train."""
        return bool(self._layers)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning stands in an optimizer with no parameter groups when
        # configure_optimizers returns None
        optimizers = [o for o in trainer.optimizers if o.param_groups]
        if self._layers and not optimizers:
            raise ValueError(
                "SparseConnectivityLearning needs the module to configure an optimizer"
            )
        if self._layers:
            self._attach_mask_groups(trainer, optimizers)
            self._wrap_gradient_clipping(pl_module)
        # one normalization, after the penalty: a MaskGradientNormalization callback in the
        # Trainer gives its settings and stands down for this fit
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, MaskGradientNormalization) and callback._owner is None:
                callback._owner = self
                self._adopted.append(callback)
        # a SparsityMonitor of the user's own logs instead of ours
        self._monitoring = not any(
            isinstance(c, SparsityMonitor) and c is not self.monitor
            for c in trainer.callbacks  # type: ignore[attr-defined]
        )
        if self._monitoring:
            self.monitor.on_fit_start(trainer, pl_module)

    def _attach_mask_groups(
        self, trainer: pl.Trainer, optimizers: list[torch.optim.Optimizer]
    ) -> None:
        # Each mask joins a mask group in the optimizer that already holds it (a GAN's
        # generator and discriminator keep their own masks); masks no optimizer holds go to the
        # first one.
        owner: dict[int, torch.optim.Optimizer] = {}
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in self._layers:
                        owner.setdefault(id(p), opt)
        if len(owner) < len(self._layers):
            rank_zero_info(
                "SparseConnectivityLearning: the module's optimizers do not hold every mask; "
                "adding the others to its first optimizer."
            )
        for opt in optimizers:
            if any(g.get(MASK_GROUP_KEY) for g in opt.param_groups):
                continue
            masks = [
                layer.mask
                for key, layer in self._layers.items()
                if owner.get(key, optimizers[0]) is opt
            ]
            if not masks:
                continue
            schedulers = [
                c.scheduler
                for c in trainer.lr_scheduler_configs
                if getattr(c.scheduler, "optimizer", None) is opt
            ]
            attach_mask_group(opt, masks, self.mask_lr * self.lr_scale, schedulers)

    def _wrap_gradient_clipping(self, pl_module: pl.LightningModule) -> None:
        """Leave the masks out of the module's gradient clipping.

        Lightning clips after ``on_before_optimizer_step``, through the module's
        ``configure_gradient_clipping`` hook and over the whole optimizer: normalized mask
        gradients (RMS 1 per feature) would dominate the norm and shrink the weights' gradients.
        For the length of the fit the hook is wrapped on this instance (the module's own
        override, if any, still runs) so that it sees no mask gradient.
        """
        if "configure_gradient_clipping" in vars(pl_module):
            return
        original = pl_module.configure_gradient_clipping

        def configure_gradient_clipping(
            optimizer: torch.optim.Optimizer,
            gradient_clip_val: float | None = None,
            gradient_clip_algorithm: str | None = None,
        ) -> None:
            masks = [
                p for g in optimizer.param_groups if g.get(MASK_GROUP_KEY) for p in g["params"]
            ]
            grads = [m.grad for m in masks]
            for mask in masks:
                mask.grad = None
            try:
                original(
                    optimizer,
                    gradient_clip_val=gradient_clip_val,
                    gradient_clip_algorithm=gradient_clip_algorithm,
                )
            finally:
                for mask, grad in zip(masks, grads, strict=True):
                    mask.grad = grad

        vars(pl_module)["configure_gradient_clipping"] = configure_gradient_clipping
        self._wrapped = pl_module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            vars(self._wrapped).pop("configure_gradient_clipping", None)
            self._wrapped = None
        for callback in self._adopted:
            callback._owner = None
        self._adopted = []

    # -- every step --------------------------------------------------------------------------

    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        masks = [p for g in optimizer.param_groups if g.get(MASK_GROUP_KEY) for p in g["params"]]
        if not masks:
            return
        if not self.masks_learning(trainer.current_epoch):
            drop_mask_grads(masks)
            return
        unscale_gradients(trainer, optimizer)
        scale = self.lam / self._total if self.penalty == "density" else self.lam
        if self._adopted:
            mode, eps = self._adopted[0].mode, self._adopted[0].eps
        else:
            mode, eps = self.normalize, self.eps
        for mask in masks:
            if scale > 0:
                if mask.grad is None:
                    mask.grad = torch.zeros_like(mask)
                # the layer's own estimator, as in its forward pass: a network sparsified
                # before this callback keeps the estimator it was given
                self._layers[id(mask)].ste.add_proxy_(mask.grad, mask, scale)
            if mask.grad is not None and mode != "none":
                normalize_per_feature(mask.grad, mode, eps, inplace=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._monitoring:
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
        if self._monitoring:
            self.monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._layers:
            return
        # the floor is enforced after every step; collapse alone is looked for at log steps
        every = max(1, int(trainer.log_every_n_steps))  # type: ignore[attr-defined]
        if self.masks_learning(trainer.current_epoch) and (
            self._collapse.min_connections or trainer.global_step % every == 0
        ):
            self._collapse.check(self._network(pl_module), warn=trainer.is_global_zero)
        if not self._lam_shown:
            # the penalty weight, shown next to the sparsity it drives (progress bar only; it
            # stays there for the epoch, and Lightning's `log` is not free)
            pl_module.log(
                "lam", self.lam, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )
            self._lam_shown = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lam_shown = False

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._monitoring:
            self.monitor.on_train_epoch_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict.get("monitor", {}))
