"""Gradients as they really are, under every precision plugin Lightning offers."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unscale_gradients"]


def unscale_gradients(trainer: Any, optimizer: torch.optim.Optimizer) -> None:
    """Make the gradients of ``optimizer``'s parameters true (unscaled) gradients, in place.

    Under ``16-mixed`` the loss is multiplied by a ``GradScaler``'s scale before backward.
    Lightning unscales before ``on_before_optimizer_step`` only for optimizers that do not
    unscale inside ``step()``; fused ones (``SGD(fused=True)``, the project's default, fused
    Adam) get the scaled gradients there and divide by the scale in their kernel. A per-feature
    normalization (scale-free: RMS 1) followed by that division would leave the masks still,
    and a penalty gradient added to scaled gradients would be divided by the scale too.

    So, before touching any gradient, this unscales the optimizer once through the scaler
    itself: the scaler records that (it then passes no scale to the fused step, and still skips
    steps whose gradients overflowed, which it detects here, before anything is modified).
    A no-op without a scaler, or when the optimizer was already unscaled this step.
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        from torch.amp.grad_scaler import OptState

        if states[id(optimizer)]["stage"] is not OptState.READY:
            return  # unscaled by Lightning (or by us) already
        scaler.unscale_(optimizer)
        return
    try:  # pragma: no cover - a scaler without torch's private bookkeeping
        scaler.unscale_(optimizer)
    except RuntimeError as err:  # pragma: no cover
        if "already been called" not in str(err):
            raise
