"""SparseConnectivityLearning: THE SCL engine, for any LightningModule (``SCLModule`` included).

Everything the method does during training lives here, once: the mask parameter group, the
penalty ``lam * C`` and its gradient, per-feature normalization, the warm-up and freeze phases,
the exclusion of masks from gradient clipping, the collapse guard, lambda's display and the
sparsity/FLOPs logs. :class:`~scl_lightning.SCLModule` is a classifier that brings this same
callback through ``configure_callbacks``, so the two faces of SCL cannot drift apart.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from scl_lightning._utils import is_int, validate_positive
from scl_lightning.callbacks._logging import logs_this_step
from scl_lightning.callbacks._precision import unscale_gradients
from scl_lightning.callbacks.lambda_control import LambdaController, validate_targets
from scl_lightning.callbacks.mask_grad_norm import MaskGradientNormalization
from scl_lightning.callbacks.mask_group import (
    MASK_GROUP_KEY,
    attach_mask_group,
    drop_mask_grads,
)
from scl_lightning.callbacks.sparsity_monitor import SparsityMonitor
from scl_lightning.nn.collapse import LayerCollapseGuard
from scl_lightning.nn.coverage import Coverage, DenseLayersWarning, coverage, mark_unread
from scl_lightning.nn.flops import FlopCounts, example_for, flop_counts
from scl_lightning.nn.masked import MaskedLayer, validate_granularity, validate_mask_init
from scl_lightning.nn.normalize import normalize_mask_gradient, validate_norm_mode
from scl_lightning.nn.sparsify import (
    mask_spec,
    maskable_modules,
    masked_modules,
    refuse_tied,
    sparsify,
)
from scl_lightning.nn.ste import get_ste

__all__ = ["MASK_SPEC_KEY", "SparseConnectivityLearning", "masks_trainable", "validate_phases"]

#: lambda when neither ``lam`` nor a target is given
DEFAULT_LAM = 2e-5
#: the share of the mask-learning phase by which a target is reached, unless told otherwise
DEFAULT_TARGET_FRACTION = 0.2
#: a final gap to the target beyond this (sparsity, or FLOPs fraction) is warned about
TARGET_WARN_GAP = 0.01
#: the checkpoint entry where the engine records how the module's layers are masked
#: (:func:`~scl_lightning.nn.mask_spec`), for :func:`scl_lightning.load_sparse` to rebuild them
MASK_SPEC_KEY = "scl_mask_spec"
Penalty = Literal["count", "density", "flops"]


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
       through each layer's estimator; ``C / N`` with ``penalty="density"``; with
       ``penalty="flops"`` each connection weighted by its multiply-adds per sample, so ``C``
       is the effective FLOPs of the masked layers) and normalizes them per feature (over the
       whole layer for a ``granularity="channel"`` layer, whose features have one mask each),
    4. with ``target_sparsity`` or ``target_flops``, adapts ``lam`` every step so that the
       budget is reached by ``target_epoch``/``target_step`` and held
       (:mod:`~scl_lightning.callbacks.lambda_control`), and
    5. logs sparsity and FLOPs with a :class:`SparsityMonitor` (unless the Trainer has one of
       its own), guards layers against collapse and shows ``lam`` in the progress bar; with a
       target, ``budget/lam``, ``budget/gap`` (measured minus target, in the target's unit) and
       ``budget/reference`` (the schedule) go to the loggers at every logging step.

    The penalty is added to the gradient once per optimizer step, so it is the same with or
    without gradient accumulation; the module's own loss and logs are untouched (SCLModule
    logs the objective's value, ``task + lam * C``, with :meth:`penalty_value`). With several
    optimizers (a GAN, say) each keeps its own masks in its own mask group. Gradient clipping
    (``Trainer(gradient_clip_val=...)``) applies to the weights only: normalized mask gradients
    would otherwise dominate the clipping norm. A :class:`MaskGradientNormalization` callback
    in the Trainer is taken over: its ``mode`` and ``eps`` replace ``normalize``, and it runs
    here, after the penalty is added, not on its own. Masks stay float32 under ``bf16-true`` and
    ``16-true`` (see :class:`~scl_lightning.nn.MaskedLinear`). Sharded strategies that flatten
    parameters (FSDP, DeepSpeed) are not supported. Every checkpoint records how the module's
    layers are masked (under :data:`MASK_SPEC_KEY`), so that :func:`scl_lightning.load_sparse`
    rebuilds the module with its masks outside a Trainer.

    Args:
        lam: weight of the connection penalty, ``>= 0``; ``None`` means 2e-5 without a target
            and is required with one (the engine then sets it).
        penalty: ``"count"``, ``"density"`` or ``"flops"``; ``None`` means ``"flops"`` with
            ``target_flops`` and ``"count"`` otherwise.
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
        target_sparsity: the global sparsity of the masked layers to reach, in ``[0, 1)``.
        target_flops: the effective FLOPs per sample to reach, as a fraction of dense, in
            ``(0, 1)``; it must be above what the layers that are not masked need.
        target_epoch: the epoch by whose start the target is reached; ``target_step`` the
            optimizer step. Default: 20% of the way through the mask-learning phase; the rest
            holds the target while the weights settle.
        freeze_at_target: freeze the masks (the fine-tune phase starts) once the target is
            reached and held within ``target_tolerance``.
        target_tolerance: how close counts as holding the target (``freeze_at_target``).
        control_gain: the controller's integral gain (``log lam`` per step per unit of error).
        granularity: what one mask variable switches in the layers this callback masks:
            ``"weight"`` (one connection) or ``"channel"`` (every connection of one output unit
            or channel; see :func:`~scl_lightning.nn.sparsify`). Layers masked before keep
            their own. The penalty, the targets and the logs count connections either way.

    Raises:
        ValueError: for an invalid argument; in ``setup`` if ``target`` is not a submodule.

    Example::

        >>> import lightning.pytorch as pl
        >>> scl = SparseConnectivityLearning(lam=1e-4, mask_lr=0.01)
        >>> trainer = pl.Trainer(callbacks=[scl], logger=False)
    """

    def __init__(
        self,
        lam: float | None = None,
        penalty: Penalty | None = None,
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
        target_sparsity: float | None = None,
        target_flops: float | None = None,
        target_epoch: int | None = None,
        target_step: int | None = None,
        freeze_at_target: bool = False,
        target_tolerance: float = 0.005,
        control_gain: float = 1.0,
        granularity: str = "weight",
    ) -> None:
        validate_targets(
            lam, target_sparsity, target_flops, target_epoch, target_step, target_tolerance
        )
        self._lam = validate_positive("lam", DEFAULT_LAM if lam is None else lam, allow_zero=True)
        self.mask_lr = validate_positive("mask_lr", mask_lr)
        if penalty is None:
            penalty = "flops" if target_flops is not None else "count"
        if penalty not in ("count", "density", "flops"):
            raise ValueError(f"penalty must be 'count', 'density' or 'flops', got {penalty!r}")
        validate_phases(warmup_epochs, freeze_masks_epoch)
        if target_epoch is not None and freeze_masks_epoch is not None:
            if target_epoch > freeze_masks_epoch:
                raise ValueError(
                    f"target_epoch ({target_epoch}) is after freeze_masks_epoch "
                    f"({freeze_masks_epoch}): masks could not move to reach it"
                )
        if target_epoch is not None and target_epoch <= warmup_epochs:
            raise ValueError(
                f"target_epoch ({target_epoch}) must be after warmup_epochs ({warmup_epochs})"
            )
        self.penalty: Penalty = penalty
        self.target_epoch = target_epoch
        self.target_step = target_step
        self.freeze_at_target = bool(freeze_at_target)
        self.controller: LambdaController | None = None
        if target_sparsity is not None or target_flops is not None:
            self.controller = LambdaController(
                kind="sparsity" if target_sparsity is not None else "flops",
                target=float(target_sparsity if target_sparsity is not None else target_flops),  # type: ignore[arg-type]
                gain=validate_positive("control_gain", control_gain),
                tolerance=float(target_tolerance),
            )
        self.ste = get_ste(ste, **(ste_kwargs or {}))
        self.mask_init = validate_mask_init(mask_init)
        self.granularity = validate_granularity(granularity)
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
        #: masks the first training batch of a fit never read: None until it starts (read counts
        #: reset, so a sanity check's reads do not count), False while it runs, True once checked
        self._reads_checked: bool | None = None
        #: id(mask) of the layers that step left dense: masks on, no gradient, no penalty
        self._frozen: set[int] = set()
        self._lam_shown = False
        self._layers: dict[int, MaskedLayer] = {}  # id(mask) -> layer, in module order
        self._names: dict[int, str] = {}  # id(mask) -> the layer's name in the network
        self._total = 0
        #: per-connection price of each layer (id(mask) -> 1, 1 / N or multiply-adds)
        self._cost: dict[int, float] = {}
        self._flop_counts: FlopCounts | None = None
        #: the "flops" prices as a tensor, for penalty_value: ((dtype, device), tensor)
        self._prices: tuple[Any, Tensor] | None = None
        self._wrapped: pl.LightningModule | None = None
        self._adopted: list[MaskGradientNormalization] = []

    # -- the method, as plain functions of the state ----------------------------------------

    @property
    def min_connections_per_layer(self) -> int:
        return self._collapse.min_connections

    @property
    def lam(self) -> float:
        """The weight of the penalty now: the given ``lam``, or the controller's with a target
        (0 until masks start learning)."""
        return self.controller.lam if self.controller is not None else self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        if self.controller is not None:
            raise ValueError("lam is set by the controller when a target is given")
        self._lam = validate_positive("lam", value, allow_zero=True)

    @property
    def frozen_at_target(self) -> bool:
        """Whether ``freeze_at_target`` has frozen the masks."""
        return self.controller is not None and self.controller.frozen_step is not None

    def masks_learning(self, epoch: int) -> bool:
        """Whether masks learn in ``epoch`` (the warm-up and freeze phases, and a freeze once the
        target is held)."""
        return (
            masks_trainable(epoch, self.warmup_epochs, self.freeze_masks_epoch)
            and not self.frozen_at_target
        )

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
        stacked = torch.stack([c.to(dtype) for c in counts])
        count = stacked.sum()
        if self.penalty == "count":
            return count, self.lam * count
        if self.penalty == "density":
            return count, self.lam * count / max(self._total, 1)
        key = (dtype, stacked.device)
        if self._prices is None or self._prices[0] != key:
            prices = [self._price(k) for k in self._layers]
            self._prices = (key, torch.tensor(prices, dtype=dtype, device=stacked.device))
        return count, self.lam * (stacked * self._prices[1]).sum()

    def _price(self, key: int) -> float:
        """What one active connection of the layer with mask ``key`` costs in ``C`` (a channel
        mask's entry costs this times the connections it switches)."""
        if self.penalty == "count":
            return 1.0
        if self.penalty == "density":
            return 1.0 / max(self._total, 1)
        return self._cost.get(key, 0.0)  # "flops": known from the first training batch on

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
            with warnings.catch_warnings():
                # the same line comes at fit start (`coverage`), with the exclusions known
                warnings.simplefilter("ignore", DenseLayersWarning)
                sparsify(
                    net,
                    exclude=self.exclude,
                    mask_init=self.mask_init,
                    ste=self.ste,
                    granularity=self.granularity,
                )
        self.collect_layers(net)

    def collect_layers(self, network: nn.Module) -> None:
        """Train the masked layers of ``network`` (``setup`` calls it on the target).

        Raises:
            ValueError: if a masked layer's weight is tied to another module, which reads it
                without the mask (``sparsify`` leaves such layers dense; one masked by hand,
                or by an older version, is refused).
        """
        refuse_tied(network, "SparseConnectivityLearning")
        self._frozen = set()
        self._network_ref = network
        named = list(masked_modules(network))
        for _, layer in named:
            mark_unread(layer, False)  # checked again at the first training step
        self._layers = {id(layer.mask): layer for _, layer in named}
        self._names = {id(layer.mask): name for name, layer in named}
        self._total = sum(layer.connections for layer in self._layers.values())

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
            self._announce_coverage()
            self._attach_mask_groups(trainer, optimizers)
            self._wrap_gradient_clipping(pl_module)
            self._warn_if_too_short(trainer, optimizers)
        self._reads_checked = None
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

    def coverage(self) -> Coverage | None:
        """What SCL covers in the trained network (:func:`~scl_lightning.nn.coverage`): the
        masked layers, each weight layer left dense and why (``exclude``, an unsupported type,
        a tied weight, a weight read outside the mask), and the share of the parameters no
        mask governs; ``None`` before ``setup``."""
        network = getattr(self, "_network_ref", None)
        return None if network is None else coverage(network, self.exclude)

    def _announce_coverage(self) -> None:
        """One line at fit start: a warning when a Linear or convolution layer is dense for
        another reason than ``exclude``, an info line otherwise."""
        cover = self.coverage()
        if cover is None:
            return
        line = cover.line("SparseConnectivityLearning")
        if any(d.reason not in ("excluded", "other") for d in cover.dense):
            rank_zero_warn(line, category=DenseLayersWarning)
        else:
            rank_zero_info(line)

    def _warn_if_too_short(
        self, trainer: pl.Trainer, optimizers: list[torch.optim.Optimizer]
    ) -> None:
        """Warn once when the planned mask-learning steps cannot move a mask from ``mask_init``
        to zero, so nothing can be pruned whatever lambda is.

        A normalized mask gradient has RMS 1, so a typical mask moves about ``mask_lr`` per
        step; SGD momentum ``beta`` multiplies that by up to ``1 / (1 - beta)`` (10 at 0.9).
        Learning-rate schedules only lower it, so this is an upper bound on how far masks go.
        """
        if trainer.global_step > 0:  # a resumed run: its plan was checked when it started
            return
        end = self._mask_phase_end(trainer)
        if not math.isfinite(end):
            return
        steps = max(end - self.warmup_epochs * (self._steps_per_epoch(trainer) or 0), 0)
        momentum = 0.0
        for opt in optimizers:
            for group in opt.param_groups:
                if group.get(MASK_GROUP_KEY) and isinstance(group.get("momentum"), float | int):
                    momentum = max(momentum, float(group["momentum"]))
        per_step = self.mask_lr * self.lr_scale / (1.0 - min(momentum, 0.99))
        reach = steps * per_step
        if reach >= self.mask_init:
            return
        needed = math.ceil(self.mask_init / per_step)
        rank_zero_warn(
            f"SparseConnectivityLearning: masks cannot be pruned in this run: {int(steps)} "
            f"mask-learning steps x about {per_step:.3g} per step (mask_lr {self.mask_lr:g}"
            + (f" x lr scale {self.lr_scale:g}" if self.lr_scale != 1 else "")
            + (f", momentum {momentum:g}" if momentum else "")
            + f") = {reach:.3g} < mask_init {self.mask_init:g}, so no mask reaches zero "
            f"whatever lam is. Train at least {needed} mask-learning steps, raise mask_lr to "
            f"{self.mask_init / max(steps, 1) * (1.0 - min(momentum, 0.99)) / self.lr_scale:.3g},"
            " or lower mask_init"
        )

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
        if self.controller is not None:
            self._control(trainer)
        lam = self.lam
        if self._adopted:
            mode, eps = self._adopted[0].mode, self._adopted[0].eps
        else:
            mode, eps = self.normalize, self.eps
        for mask in masks:
            if id(mask) in self._frozen:  # left dense after the first step (_check_mask_reads)
                mask.grad = None
                continue
            layer = self._layers[id(mask)]
            scale = lam * self._price(id(mask))
            if layer.per_mask != 1:
                scale *= layer.per_mask  # a unit's mask switches fan-in connections at once
            if scale > 0:
                if mask.grad is None:
                    mask.grad = torch.zeros_like(mask)
                # the layer's own estimator, as in its forward pass: a network sparsified
                # before this callback keeps the estimator it was given
                layer.ste.add_proxy_(mask.grad, mask, scale)
            if mask.grad is not None and mode != "none":
                normalize_mask_gradient(
                    mask.grad,
                    mode,
                    eps,
                    granularity=layer.granularity,
                    inplace=True,
                    feature_dim=layer.out_dim,
                )

    # -- lambda control ---------------------------------------------------------------------

    @property
    def needs_flops(self) -> bool:
        """Whether the engine needs each layer's FLOPs itself (``penalty="flops"`` or a FLOPs
        target), whatever the monitor logs."""
        return self.penalty == "flops" or (
            self.controller is not None and self.controller.kind == "flops"
        )

    def _trace(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Each masked layer's multiply-adds per connection, from the one fvcore trace."""
        example = example_for(pl_module, batch)
        what = "penalty='flops'" if self.penalty == "flops" else "target_flops"
        if example is None:
            raise ValueError(
                f"SparseConnectivityLearning: {what} needs each layer's FLOPs, but no input "
                "tensor was found in the batch to trace them: set the module's "
                "example_input_array"
            )
        network = self._network(pl_module)
        try:
            counts = flop_counts(network, example)
        except Exception as err:  # tracing other people's modules can fail in many ways
            raise ValueError(
                f"SparseConnectivityLearning: {what} needs each layer's FLOPs, but tracing them "
                f"failed ({type(err).__name__}: {err}); set the module's example_input_array "
                "to an input its forward accepts"
            ) from err
        masked = 0
        for key, layer in self._layers.items():
            flops = counts.layers.get(self._names[key], 0)
            masked += flops
            self._cost[key] = flops / layer.connections  # per connection, whatever the mask
        self._flop_counts = counts
        self._prices = None
        c = self.controller
        if c is not None and c.kind == "flops":
            floor = (counts.total - masked) / max(counts.total, 1)
            if c.target <= floor:
                raise ValueError(
                    f"target_flops={c.target:g} is out of reach: the layers that are not masked "
                    f"need {floor:.4f} of the dense FLOPs ({counts.total - masked:,} of "
                    f"{counts.total:,} per sample); choose target_flops above {floor:.4f}"
                )

    def _scale(self) -> float:
        """``C`` with every connection on: what lambda's starting value is relative to."""
        return sum(self._price(key) * layer.connections for key, layer in self._layers.items())

    @torch.no_grad()
    def reduction(self) -> float:
        """What a target is measured on, now: the sparsity of the masked layers, or for a FLOPs
        target ``1 - effective / dense`` FLOPs of one sample."""
        if not self._layers:
            return 0.0
        # connections: a channel mask that is on keeps the unit's fan-in connections
        active = torch.stack(
            [(layer.mask > 0).sum() * layer.per_mask for layer in self._layers.values()]
        ).tolist()
        if self.controller is None or self.controller.kind == "sparsity":
            return 1.0 - sum(active) / self._total
        if self._flop_counts is None:
            return 0.0
        removed = sum(
            self._cost[key] * (layer.connections - on)
            for (key, layer), on in zip(self._layers.items(), active, strict=True)
        )
        return removed / max(self._flop_counts.total, 1)

    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
        """Optimizer steps per epoch, or None when the dataloader has no length."""
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        return math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1))

    def _mask_phase_end(self, trainer: pl.Trainer) -> float:
        """The optimizer step at which masks stop learning: the run's last, or the start of
        ``freeze_masks_epoch`` (``inf`` for a run without an end)."""
        total = float(trainer.estimated_stepping_batches)  # loads the train dataloader
        per_epoch = self._steps_per_epoch(trainer)
        if self.freeze_masks_epoch is not None and per_epoch:
            total = min(total, self.freeze_masks_epoch * per_epoch)
        return total

    def _target_end(self, trainer: pl.Trainer, step: int) -> int:
        """The optimizer step by which the schedule reaches the target."""
        if self.target_step is not None:
            return self.target_step
        if self.target_epoch is not None:
            per_epoch = self._steps_per_epoch(trainer)
            if not per_epoch:
                raise ValueError(
                    "target_epoch needs epochs of known length (a sized dataloader): give "
                    "target_step instead"
                )
            return self.target_epoch * per_epoch
        total = self._mask_phase_end(trainer)
        if not math.isfinite(total):
            raise ValueError(
                "a target needs to know when to reach it, and this run has no end (no "
                "max_epochs or max_steps): give target_step or target_epoch"
            )
        return step + round(DEFAULT_TARGET_FRACTION * (total - step))

    def _control(self, trainer: pl.Trainer) -> None:
        c = self.controller
        assert c is not None
        step = trainer.global_step
        if step == c.last_step:
            return
        value = self.reduction()
        if not c.started:
            crossing = self.mask_init / (self.mask_lr * self.lr_scale)
            c.start(step, self._target_end(trainer, step), value, self._scale(), crossing)
        c.update(step, value)

    def _after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze once the target is held (if asked); log lambda and the gap."""
        c = self.controller
        assert c is not None
        if not c.started or c.last_value is None:
            return
        if (
            self.freeze_at_target
            and c.frozen_step is None
            and c.held(trainer.global_step, c.last_value)
        ):
            c.frozen_step = trainer.global_step
            rank_zero_info(
                f"SparseConnectivityLearning: target held at step {trainer.global_step} "
                f"(lam {c.lam:.3g}); masks are frozen from here on"
            )
        if not logs_this_step(trainer):
            return
        pl_module.log("lam", c.lam, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if not trainer.is_global_zero or not trainer.loggers:
            return
        reference = c.reference(c.last_step)
        row = {
            "budget/lam": c.lam,
            "budget/gap": c.gap(c.last_value),
            "budget/reference": reference if c.kind == "sparsity" else 1.0 - reference,
            "budget/frozen": float(c.frozen_step is not None),
        }
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(row, step=step)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._monitoring:
            self.monitor.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.needs_flops and self._flop_counts is None and self._layers:
            self._trace(pl_module, batch)
        if self._reads_checked is None:  # the reads of the first step alone (no sanity check)
            self._reads_checked = False
            for layer in self._layers.values():
                layer.reset_mask_reads()

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
        if self._reads_checked is False:
            # at the end of the first batch: every optimizer's forward pass has run (a GAN's
            # discriminator reads its masks after the generator's step)
            self._reads_checked = True
            self._check_mask_reads()
        # the floor is enforced after every step; collapse alone is looked for at log steps
        every = max(1, int(trainer.log_every_n_steps))  # type: ignore[attr-defined]
        if self.masks_learning(trainer.current_epoch) and (
            self._collapse.min_connections or trainer.global_step % every == 0
        ):
            self._collapse.check(self._network(pl_module), warn=trainer.is_global_zero)
        if self.controller is not None:
            self._after_step(trainer, pl_module)
        elif not self._lam_shown:
            # the penalty weight, shown next to the sparsity it drives (progress bar only; it
            # stays there for the epoch, and Lightning's `log` is not free)
            pl_module.log(
                "lam", self.lam, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )
            self._lam_shown = True

    def _check_mask_reads(self) -> None:
        """Leave dense, and name in one line, the masked layers whose mask the first training
        batch never applied: the network either does not use them or reads their stored weight
        where the mask cannot act (a parameter list, a state dict), so their masks would learn
        from the penalty alone and count as pruned connections the network may still use.
        Their masks are set on and frozen, and leave the penalty. Under ``torch.compile`` reads
        are not counted (none is seen), and nothing is done."""
        unread = [key for key, layer in self._layers.items() if not layer.mask_reads]
        if not unread or len(unread) == len(self._layers):
            return
        names = [self._names[key] for key in unread]
        with torch.no_grad():
            for key in unread:
                # frozen as `drop_mask_grads` freezes (requires_grad stays: DDP needs the same
                # parameters to receive gradients on every step); the optimizer skips them
                layer = self._layers.pop(key)
                layer.mask.fill_(self.mask_init)
                mark_unread(layer)  # dense in `coverage` and the run summary
                self._names.pop(key)
                self._frozen.add(key)
        self._total = sum(layer.connections for layer in self._layers.values())
        self._prices = None
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        rank_zero_warn(
            f"SparseConnectivityLearning: {len(names)} of {len(names) + len(self._layers)} "
            f"masked layers were not computed through their mask in the first training step: "
            f"{shown}. The forward pass does not use them, or reads their stored weight where "
            "the mask cannot act (a parameter list, a state dict); they are left dense from "
            "here on (masks on and frozen, out of the penalty). Exclude them (exclude=[...]) "
            "to silence this"
        )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lam_shown = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        c = self.controller
        if c is None or not c.started or c.start_step is None:
            return
        # a run stopped early (max_steps, a kill) before the schedule's end is not a miss
        if trainer.global_step < (c.end_step or 0):
            return
        gap = c.gap(self.reduction())
        if abs(gap) > TARGET_WARN_GAP:
            what = "target_sparsity" if c.kind == "sparsity" else "target_flops"
            rank_zero_warn(
                f"SparseConnectivityLearning: {what}={c.target:g} missed by {gap:+.4f} at the "
                f"end of training ({trainer.global_step - c.start_step} mask-learning steps, "
                f"lam {c.lam:.3g}). "
                + (
                    "Too short a run cannot prune that far: train longer or raise mask_lr."
                    if (gap < 0) == (c.kind == "sparsity")
                    else "Pruned connections rarely come back: reach the target later "
                    "(target_epoch) or lower control_gain."
                )
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._monitoring:
            self.monitor.on_train_epoch_end(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # which layers are masked, with which estimator and granularity, keyed like the state
        # dict: what `scl_lightning.load_sparse` needs to rebuild the module outside a Trainer
        # (Lightning skips this hook for weights-only checkpoints; the masks' shapes then say
        # all but the estimator)
        spec = mask_spec(pl_module)
        if spec:
            checkpoint[MASK_SPEC_KEY] = spec

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"monitor": self.monitor.state_dict()}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict.get("monitor", {}))
        if self.controller is not None and "controller" in state_dict:
            self.controller.load_state_dict(state_dict["controller"])
