"""MaskGradientNormalization: per-feature normalization of mask gradients."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from scl_lightning.callbacks._precision import unscale_gradients
from scl_lightning.nn.masked import MaskedLayer
from scl_lightning.nn.normalize import normalize_mask_gradient, validate_norm_mode
from scl_lightning.nn.sparsify import masked_modules

__all__ = ["MaskGradientNormalization"]


class MaskGradientNormalization(Callback):
    """Normalize each feature's mask gradient before every optimizer step.

    Raw mask gradients differ by orders of magnitude between features and layers; dividing each
    feature's gradient (a row of a Linear weight, an output channel of a convolution) by its scale
    makes one mask learning rate mean the same step size everywhere. A layer masked with
    ``granularity="channel"`` (one mask per feature) is normalized over the whole layer instead,
    so its units keep their relative gradients
    (:func:`~scl_lightning.nn.normalize.normalize_mask_gradient`). It runs in
    ``on_before_optimizer_step``, so it sees the gradient as it stands after backward (task and
    penalty together), accumulated over ``accumulate_grad_batches``, unscaled by AMP and reduced
    by DDP, and before gradient clipping and the optimizer step. Under ``16-mixed`` it first
    has the ``GradScaler`` unscale the optimizer when Lightning has not (fused optimizers unscale
    inside ``step()``; normalizing scaled gradients that the step then divides by the scale
    would leave the masks still). Works with any LightningModule whose network has masked
    layers (see :func:`scl_lightning.sparsify`), for a penalty written in the module's own loss.

    With the SCL engine (:class:`SparseConnectivityLearning`, which
    :class:`~scl_lightning.SCLModule` brings) in the same Trainer, this callback stands down for
    the fit and the engine normalizes with its ``mode`` and ``eps``, after adding the penalty's
    gradient: one normalization, in the right order, whatever the order of the callbacks.

    Args:
        mode: ``"rms"`` (default: sqrt of the mean square), ``"l2"``, ``"max"`` (max abs), or
            ``"none"`` (off; for ablations).
        eps: added to each feature's scale.

    Raises:
        ValueError: for an unknown ``mode`` or a negative ``eps``.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[MaskGradientNormalization("rms")], logger=False)
    """

    def __init__(self, mode: str = "rms", eps: float = 1e-12) -> None:
        self.mode = validate_norm_mode(mode)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.eps = float(eps)
        self._layers: list[MaskedLayer] | None = None
        self._owner: object | None = None  # the SCL engine that runs the normalization

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._layers = None  # collected lazily: other callbacks may sparsify in their setup

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = [layer for _, layer in masked_modules(pl_module)]
        if not self._layers:
            rank_zero_warn(
                f"MaskGradientNormalization: {type(pl_module).__name__} has no masked layer, so "
                "there is nothing to normalize; sparsify the network (scl_lightning.sparsify) or "
                "remove the callback"
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.mode == "none" or self._owner is not None:
            return
        unscale_gradients(trainer, optimizer)
        if self._layers is None:
            self._layers = [layer for _, layer in masked_modules(pl_module)]
        for layer in self._layers:
            grad = layer.mask.grad
            if grad is not None:
                normalize_mask_gradient(
                    grad,
                    self.mode,
                    self.eps,
                    granularity=layer.granularity,
                    inplace=True,
                    feature_dim=layer.out_dim,
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, eps={self.eps})"
