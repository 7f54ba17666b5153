"""Magnitude pruning baselines on SCL's own masked layers.

They prune by writing the sign of each layer's ``mask`` variable (``H(m) = 1[m > 0]``), so a
baseline run is measured exactly as an SCL run is: the same layers, the same connection counts
(:func:`~scl_lightning.nn.stats.connectivity`), the same FLOPs and the same export. The masks are
not trained: each callback drops their gradients before every optimizer step and is the only
thing that changes them.

- :func:`prune_by_magnitude`: keep the largest ``|w|`` of the active connections, globally or per
  layer, so that exactly ``round(sparsity * total)`` connections are off.
- :class:`GradualMagnitudePruning`: Zhu & Gupta (2017), "To prune, or not to prune": the
  sparsity rises from ``initial_sparsity`` to ``final_sparsity`` along the cubic schedule
  ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3``, pruning every ``frequency``
  optimizer steps between ``t_0`` and ``t_1``, and exactly ``s_f`` from ``t_1`` on.
- :class:`OneShotMagnitudePruning`: prune once, at the start of a chosen epoch, then fine-tune.

Both are plain Lightning callbacks for any LightningModule whose network has masked layers
(:func:`scl_lightning.sparsify`, or :class:`~scl_lightning.SCLModule` with ``lam=0``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from scl_lightning._utils import is_int
from scl_lightning.callbacks.mask_group import drop_mask_grads, mask_parameters
from scl_lightning.nn.sparsify import masked_modules

__all__ = [
    "GradualMagnitudePruning",
    "OneShotMagnitudePruning",
    "cubic_sparsity",
    "prune_by_magnitude",
]

Scope = Literal["global", "layer"]


def _check_sparsity(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_scope(scope: Any) -> Scope:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return scope


def _keep_mask(scores: Tensor, num_off: int) -> Tensor:
    """Boolean tensor: all but the ``num_off`` lowest scores (ties broken by index order)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_off > 0:
        off = torch.topk(scores.flatten(), num_off, largest=False, sorted=False).indices
        keep[off] = False
    return keep.view_as(scores)


@torch.no_grad()
def prune_by_magnitude(model: nn.Module, sparsity: float, scope: Scope = "global") -> int:
    """Switch off the smallest-magnitude connections so exactly ``round(sparsity * total)`` are
    off (over the whole masked network with ``scope="global"``, in every layer with ``"layer"``).

    A connection already off scores below every active one, so it stays off while the sparsity
    rises; only a lower ``sparsity`` than the current one turns connections back on. Kept masks
    keep their value (or become 1 if they were off); pruned ones become ``-|m|`` (0 stays 0).

    Returns:
        The number of connections off afterwards.

    Raises:
        ValueError: If ``model`` has no masked layers, has a layer masked with
            ``granularity="channel"``, or ``sparsity`` is outside ``[0, 1)``.

    Example::

        >>> from scl_lightning import sparsify
        >>> net = sparsify(nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = net.raw_weight.copy_(torch.arange(8.0).view(2, 4))
        >>> prune_by_magnitude(net, 0.5)
        4
        >>> net.hard_mask().tolist()
        [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    """
    sparsity = _check_sparsity("sparsity", sparsity)
    scope = _check_scope(scope)
    layers = [layer for _, layer in masked_modules(model)]
    if not layers:
        raise ValueError(
            "the model has no masked layers: sparsify it first (scl_lightning.sparsify) or use "
            "SCLModule"
        )
    coarse = [name for name, layer in masked_modules(model) if layer.granularity != "weight"]
    if coarse:
        raise ValueError(
            f"magnitude pruning scores single connections, but layer {coarse[0]!r} is masked with "
            "granularity='channel' (one mask per unit); sparsify the model with "
            "granularity='weight' for this baseline"
        )
    # |w| of active connections; -1 for connections already off (below every active one)
    scores = [
        torch.where(layer.mask > 0, layer.raw_weight.detach().abs().float(), -1.0)
        for layer in layers
    ]
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores])
        keep = _keep_mask(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores])
        keeps = [k.view_as(s) for k, s in zip(keep, scores, strict=True)]
    else:
        keeps = [_keep_mask(s, round(sparsity * s.numel())) for s in scores]
    off = 0
    for layer, keep in zip(layers, keeps, strict=True):
        m = layer.mask
        m.copy_(torch.where(keep, torch.where(m > 0, m, torch.ones_like(m)), -m.abs()))
        off += int((~keep).sum())
    return off


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` before ``start``, ``final`` from ``end`` on.

    Example::

        >>> [round(cubic_sparsity(t, 0.0, 0.9, 0, 10), 4) for t in (0, 5, 10, 20)]
        [0.0, 0.7875, 0.9, 0.9]
    """
    if step < start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def _check_module(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    """Refuse an SCL engine that would also change the masks, and a module without masks."""
    from scl_lightning.callbacks.sparse_connectivity_learning import SparseConnectivityLearning

    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(cb, SparseConnectivityLearning):
            continue
        if cb.controller is not None:
            raise ValueError(
                f"{who} decides the masks itself, but SparseConnectivityLearning in the same "
                f"Trainer adapts lam to a target: drop the target (and use lam=0) or drop one "
                f"of the two"
            )
        if cb.lam > 0:
            raise ValueError(
                f"{who} decides the masks itself, but SparseConnectivityLearning in the same "
                f"Trainer trains them with lam={cb.lam}: use lam=0 (SCLModule(lam=0)) or drop "
                f"one of the two"
            )
        if cb.min_connections_per_layer > 0:
            raise ValueError(
                f"{who} decides the masks itself, but SparseConnectivityLearning's collapse "
                f"guard (min_connections_per_layer={cb.min_connections_per_layer}) would turn "
                f"pruned connections back on: set min_connections_per_layer=0"
            )
    if not any(True for _ in masked_modules(pl_module)):
        raise ValueError(
            f"{who} needs masked layers in the module: sparsify the network "
            f"(scl_lightning.sparsify) or use SCLModule"
        )


class _MagnitudeBaseline(Callback):
    """What both baselines share: the module check at fit start, and the masks kept out of the
    optimizer (their gradients dropped before every step, as the SCL engine freezes them)."""

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_module(trainer, pl_module, type(self).__name__)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        drop_mask_grads(mask_parameters(pl_module))


class GradualMagnitudePruning(_MagnitudeBaseline):
    """Gradual magnitude pruning (Zhu & Gupta 2017) on the module's masked layers.

    From optimizer step ``t_0`` to ``t_1``, every ``frequency`` steps, the smallest-magnitude
    active connections are switched off so the sparsity follows the cubic schedule
    (:func:`cubic_sparsity`); from ``t_1`` on it is exactly ``final_sparsity``, and training
    goes on (fine-tuning) with the masks fixed. ``t_0``/``t_1`` are ``start_step``/``end_step``
    when given, else ``start_fraction``/``end_fraction`` of the run's optimizer steps
    (``trainer.estimated_stepping_batches``).

    Args:
        final_sparsity: Fraction of the masked connections off at the end, in ``[0, 1)``.
        initial_sparsity: Sparsity of the first pruning step.
        start_fraction: ``t_0`` as a fraction of the run's optimizer steps.
        end_fraction: ``t_1`` as a fraction of the run's optimizer steps (Zhu & Gupta prune over
            roughly the first half to two thirds of training, then fine-tune).
        start_step: ``t_0`` in optimizer steps; overrides ``start_fraction``.
        end_step: ``t_1`` in optimizer steps; overrides ``end_fraction``.
        frequency: Optimizer steps between pruning steps (Zhu & Gupta: 100 to 1000).
        scope: ``"global"`` ranks all masked connections together; ``"layer"`` prunes every layer
            to the same sparsity.

    Raises:
        ValueError: If an argument is out of range, the module has no masked layers, or an SCL
            engine with ``lam > 0`` trains the same masks.

    Example::

        >>> from scl_lightning import SCLModule
        >>> gmp = GradualMagnitudePruning(final_sparsity=0.95, end_fraction=0.6)
        >>> # Trainer(callbacks=[gmp]).fit(SCLModule(lam=0), datamodule=...)
    """

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        start_fraction: float = 0.0,
        end_fraction: float = 0.6,
        start_step: int | None = None,
        end_step: int | None = None,
        frequency: int = 100,
        scope: Scope = "global",
    ) -> None:
        super().__init__()
        self.final_sparsity = _check_sparsity("final_sparsity", final_sparsity)
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity "
                f"({final_sparsity})"
            )
        for name, value in (("start_fraction", start_fraction), ("end_fraction", end_fraction)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        for name, step in (("start_step", start_step), ("end_step", end_step)):
            if step is not None and (not is_int(step) or step < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {step!r}")
        if not is_int(frequency) or frequency < 1:
            raise ValueError(f"frequency must be a positive integer, got {frequency!r}")
        self.start_fraction = float(start_fraction)
        self.end_fraction = float(end_fraction)
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = int(frequency)
        self.scope = _check_scope(scope)
        self._window: tuple[int, int] | None = None
        # the sparsity last applied (checkpointed, so a resumed run prunes on the same steps)
        self.applied = -1.0

    def window(self, trainer: pl.Trainer) -> tuple[int, int]:
        """``(t_0, t_1)`` in optimizer steps for this run. A fraction of the run ends at its last
        step at the latest, so ``end_fraction=1.0`` still reaches ``final_sparsity``."""
        total = trainer.estimated_stepping_batches
        fractions = self.start_step is None or self.end_step is None
        if fractions and not math.isfinite(total):
            raise ValueError(
                "GradualMagnitudePruning with start_fraction/end_fraction needs a run of known "
                "length (max_epochs or max_steps): set start_step and end_step instead"
            )
        last = max(int(total) - 1, 0) if math.isfinite(total) else 0
        start = round(self.start_fraction * last) if self.start_step is None else self.start_step
        end = round(self.end_fraction * last) if self.end_step is None else self.end_step
        if end < start:
            raise ValueError(
                f"GradualMagnitudePruning ends at step {end}, before it starts ({start}): set "
                f"end_step/end_fraction after start_step/start_fraction"
            )
        return start, end

    def target(self, step: int) -> float:
        """The schedule's sparsity at optimizer step ``step`` (call after fitting started)."""
        if self._window is None:
            raise RuntimeError("the pruning window is known once fitting starts")
        start, end = self._window
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, start, end)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._window = self.window(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._window is not None
        start, end = self._window
        step = trainer.global_step
        if step < start or self.applied >= self.final_sparsity:
            return
        # the schedule's value at the last pruning step reached: a step counter that jumps
        # (several optimizers, a resumed run) prunes at the first batch after each one
        due = step if step >= end else start + (step - start) // self.frequency * self.frequency
        sparsity = self.target(due)
        if sparsity > self.applied:
            prune_by_magnitude(pl_module, sparsity, self.scope)
            self.applied = sparsity
            pl_module.log("pruning/target_sparsity", sparsity, on_step=True, on_epoch=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied < self.final_sparsity and trainer.is_global_zero:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"GradualMagnitudePruning: training ended at step {trainer.global_step}, before "
                f"the schedule's end ({self._window[1] if self._window else '?'}): the sparsity "
                f"is {max(self.applied, 0):.4f}, not {self.final_sparsity}"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = float(state_dict["applied"])


class OneShotMagnitudePruning(_MagnitudeBaseline):
    """One-shot magnitude pruning: at the start of epoch ``epoch``, switch off the
    smallest-magnitude connections down to exactly ``sparsity``; the remaining epochs fine-tune
    with the masks fixed.

    Args:
        sparsity: Fraction of the masked connections switched off, in ``[0, 1)``.
        epoch: The epoch at whose start it prunes; ``None`` takes the middle of the run
            (``max_epochs // 2``). ``0`` prunes the initialization.
        scope: ``"global"`` ranks all masked connections together; ``"layer"`` prunes every layer
            to the same sparsity.

    Raises:
        ValueError: If an argument is out of range, the module has no masked layers, or an SCL
            engine with ``lam > 0`` trains the same masks.
    """

    def __init__(self, sparsity: float, epoch: int | None = None, scope: Scope = "global") -> None:
        super().__init__()
        self.sparsity = _check_sparsity("sparsity", sparsity)
        if epoch is not None and (not is_int(epoch) or epoch < 0):
            raise ValueError(f"epoch must be None or an integer >= 0, got {epoch!r}")
        self.epoch = epoch
        self.scope = _check_scope(scope)
        self.done = False

    def prune_epoch(self, trainer: pl.Trainer) -> int:
        """The epoch at whose start the network is pruned."""
        if self.epoch is not None:
            return self.epoch
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                "OneShotMagnitudePruning(epoch=None) needs Trainer(max_epochs=...) to find the "
                "middle of the run: set epoch"
            )
        return max_epochs // 2

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        epoch = self.prune_epoch(trainer)
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch:
            raise ValueError(
                f"OneShotMagnitudePruning prunes at epoch {epoch}, but the run has "
                f"max_epochs={trainer.max_epochs}: choose an earlier epoch"
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.done and trainer.current_epoch >= self.prune_epoch(trainer):
            prune_by_magnitude(pl_module, self.sparsity, self.scope)
            self.done = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict["done"])
