"""Optimizer and phase helpers shared by :class:`~scl_lightning.SCLModule` and the drop-in
:class:`~scl_lightning.callbacks.SparseConnectivityLearning` callback (no Lightning imports)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from scl_lightning.nn.sparsify import masked_modules
from scl_lightning.nn.ste import count_positive

__all__ = [
    "MASK_GROUP_KEY",
    "LayerCollapseGuard",
    "LayerCollapseWarning",
    "attach_mask_group",
    "drop_mask_grads",
    "mask_parameters",
    "masks_trainable",
    "validate_phases",
]

#: Marks the optimizer parameter group that holds the mask variables.
MASK_GROUP_KEY = "scl_masks"


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mask variables of every masked layer of ``model``, in module order."""
    return [layer.mask for _, layer in masked_modules(model)]


def validate_phases(warmup_epochs: int, freeze_masks_epoch: int | None) -> None:
    """Check the dense warm-up length and the epoch from which masks are frozen."""
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
    if freeze_masks_epoch is not None:
        if isinstance(freeze_masks_epoch, bool) or not isinstance(freeze_masks_epoch, int):
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


def drop_mask_grads(masks: Iterable[nn.Parameter]) -> None:
    """Discard mask gradients so optimizers skip the masks (no step, no momentum, no decay).

    Freezing this way, rather than with ``requires_grad_(False)``, keeps the set of parameters
    that receive gradients fixed, which DDP requires.
    """
    for mask in masks:
        mask.grad = None


def _scaled(value: Any, ratio: float, key: str) -> Any:
    if "lr" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * ratio
    return value


_NOT_PER_GROUP = frozenset({"_schedulers", "_milestones", "milestones"})


def _extend_scheduler(scheduler: Any, n_groups: int, src: int, ratio: float) -> None:
    """Give ``scheduler`` an entry for one more parameter group, copied from group ``src``.

    Torch schedulers keep per-group lists (``base_lrs``, ``_last_lr``, ``min_lrs``,
    ``lr_lambdas``, ``max_lrs`` ...) sized at construction; a group added later would be skipped
    by some and crash others. Learning-rate entries are scaled by ``ratio`` so the new group
    follows the same schedule relative to its own learning rate.
    """
    for sub in getattr(scheduler, "_schedulers", ()):  # SequentialLR, ChainedScheduler
        _extend_scheduler(sub, n_groups, src, ratio)
    for key, value in list(vars(scheduler).items()):
        # Lists that are not per-group may have n_groups entries by coincidence: extending
        # SequentialLR's milestones or a chain's schedulers would change the schedule.
        if key in _NOT_PER_GROUP:
            continue
        if isinstance(value, list) and len(value) == n_groups:
            value.append(_scaled(value[src], ratio, key))


def attach_mask_group(
    optimizer: torch.optim.Optimizer,
    masks: Sequence[nn.Parameter],
    mask_lr: float,
    schedulers: Iterable[Any] = (),
) -> dict[str, Any]:
    """Move ``masks`` out of the groups of an existing optimizer into a group of their own.

    The new group copies the hyper-parameters of the group the first mask came from (momentum,
    betas, ...), with base learning rate ``mask_lr`` and ``weight_decay=0``: every
    learning-rate-like key (``lr``, and ``initial_lr``, ``max_lr``, ``min_lr`` that schedulers
    add) is scaled by ``mask_lr / base_lr``, where ``base_lr`` is the source group's
    ``initial_lr`` when a scheduler set one and its ``lr`` otherwise, and each scheduler in
    ``schedulers`` is extended so it schedules the new group the same way. The masks' lr is then
    ``mask_lr * lr_t / base_lr`` at every step, as if the group had existed before the schedulers.

    Returns:
        The new parameter group.

    Raises:
        ValueError: if the optimizer already holds state (call this before the first step).
    """
    if any(group.get(MASK_GROUP_KEY) for group in optimizer.param_groups):
        raise ValueError("the optimizer already has an SCL mask group")
    if len(optimizer.state) > 0:
        raise ValueError("attach_mask_group must run before the optimizer's first step")
    mask_ids = {id(m) for m in masks}
    src = 0
    found = False
    for i, group in enumerate(optimizer.param_groups):
        kept = [p for p in group["params"] if id(p) not in mask_ids]
        if len(kept) != len(group["params"]) and not found:
            src, found = i, True
        group["params"] = kept  # an emptied group stays so schedulers keep their indexing
    source = optimizer.param_groups[src]
    # mask_lr plays the role of the optimizer's base lr (a scheduler's ``initial_lr``), as in a
    # mask group built before the scheduler: a warm-up that has lowered the current lr lowers
    # the masks' lr by the same factor.
    base = source.get("initial_lr", source.get("lr"))
    ratio = mask_lr / base if base else 1.0
    n_groups = len(optimizer.param_groups)
    group = {k: _scaled(v, ratio, k) for k, v in source.items() if k != "params"}
    lr = source["lr"] * ratio if base else mask_lr
    group.update(params=list(masks), lr=lr, weight_decay=0.0, **{MASK_GROUP_KEY: True})
    if "initial_lr" in source:
        group["initial_lr"] = mask_lr
    optimizer.add_param_group(group)
    for scheduler in schedulers:
        _extend_scheduler(scheduler, n_groups, src, ratio)
    return optimizer.param_groups[-1]


def validate_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A finite float > 0 (>= 0 with ``allow_zero``), or a ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


class LayerCollapseGuard:
    """Watches every masked layer for collapse: all of its masks at zero, which cuts the network
    in two (no signal crosses that layer any more).

    Each collapsed layer is warned about once, by name. With ``min_connections > 0`` a layer is
    never left with fewer active connections than that: when it falls below, the mask variables
    of its strongest connections (the largest ``m``) are raised to ``revive_value > 0``, so they
    are active again in the next forward pass; the penalty may push them down again, and they
    are raised again, so the layer stays at its floor.

    :meth:`check` costs one comparison and one sum per layer and a single device sync; call it
    after optimizer steps (every step when ``min_connections > 0``).

    Args:
        min_connections: the fewest active connections a layer may keep (0: only warn).
        revive_value: the mask value given to revived connections.

    Example::

        >>> from scl_lightning.nn import sparsify
        >>> net = sparsify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
        >>> with torch.no_grad():
        ...     _ = net[1].mask.fill_(-1.0)  # the second layer has collapsed
        >>> LayerCollapseGuard(min_connections=2).check(net, warn=False)
        ['1']
        >>> int((net[1].mask > 0).sum())
        2
    """

    def __init__(self, min_connections: int = 0, revive_value: float = 1e-2) -> None:
        if isinstance(min_connections, bool) or not isinstance(min_connections, int):
            raise ValueError(
                f"min_connections_per_layer must be an integer >= 0, got {min_connections!r}"
            )
        if min_connections < 0:
            raise ValueError(
                f"min_connections_per_layer must be an integer >= 0, got {min_connections!r}"
            )
        validate_positive("revive_value", revive_value)
        self.min_connections = min_connections
        self.revive_value = float(revive_value)
        self.warned: set[str] = set()

    @torch.no_grad()
    def check(self, model: nn.Module, warn: bool = True) -> list[str]:
        """Warn about newly collapsed layers and enforce the floor; returns the names of the
        layers found below it (collapsed ones when the floor is 0)."""
        layers = list(masked_modules(model))
        if not layers:
            return []
        counts = torch.stack(
            [count_positive(layer.mask).to(torch.float64) for _, layer in layers]
        ).tolist()
        low = []
        for (name, layer), count in zip(layers, counts, strict=True):
            floor = min(self.min_connections, layer.mask.numel())
            if count == 0 and name not in self.warned:
                self.warned.add(name)
                if warn:
                    advice = (
                        f"it is held at {floor} connections by min_connections_per_layer"
                        if floor
                        else "set min_connections_per_layer to keep some, or lower lam"
                    )
                    warnings.warn(
                        f"SCL: every connection of layer {name!r} is pruned, so the network is "
                        f"cut in two there; {advice}",
                        LayerCollapseWarning,
                        stacklevel=2,
                    )
            if count < floor or (count == 0 and not floor):
                low.append(name)
            if count < floor:
                flat = layer.mask.view(-1)
                top = torch.topk(flat, floor).indices
                flat[top] = torch.clamp(flat[top], min=self.revive_value)
        return low


class LayerCollapseWarning(UserWarning):
    """A masked layer has lost all of its connections."""
