"""The optimizer parameter group of the masks (plain torch; used by the SCL engine).

The masks train in a group of their own (``mask_lr``, no weight decay) that is carved out of an
optimizer the user or the module already built, and scheduled like the group the masks came
from. The group carries its own ``name`` when the optimizer's groups are named, so Lightning's
``LearningRateMonitor`` shows the masks' learning rate instead of refusing a duplicate name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from scl_lightning.nn.sparsify import masked_modules

__all__ = [
    "MASK_GROUP_KEY",
    "attach_mask_group",
    "drop_mask_grads",
    "mask_groups",
    "mask_parameters",
]

#: Marks the optimizer parameter group that holds the mask variables.
MASK_GROUP_KEY = "scl_masks"


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mask variables of every masked layer of ``model``, in module order."""
    return [layer.mask for _, layer in masked_modules(model)]


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
    When the source group has a ``name``, the mask group is named ``<name>/masks``.

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
    if isinstance(source.get("name"), str):
        # a copied name would be a duplicate, which LearningRateMonitor refuses
        group["name"] = f"{source['name']}/masks"
    if "initial_lr" in source:
        group["initial_lr"] = mask_lr
    optimizer.add_param_group(group)
    for scheduler in schedulers:
        _extend_scheduler(scheduler, n_groups, src, ratio)
    return optimizer.param_groups[-1]


def mask_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's SCL mask groups (one at most when built by :func:`attach_mask_group`)."""
    return [g for g in optimizer.param_groups if g.get(MASK_GROUP_KEY)]
