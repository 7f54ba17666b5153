"""Per-feature normalization of mask gradients (the functional core of the callback).

Raw mask gradients are badly unbalanced across features and layers: some output units receive
gradients orders of magnitude larger than others, so one mask learning rate either freezes most
masks or throws the rest around. Normalizing each feature's mask gradient gives every feature the
same step size. A *feature* is one output unit: a row of a Linear weight, an output channel of a
convolution weight (dimension 0 of the weight).

A layer masked with ``granularity="channel"`` has one mask variable per feature, so normalizing
per feature would divide each scalar gradient by its own magnitude and leave only its sign:
every unit would move by the same step, whatever the evidence for or against it, and the
relative differences between units that decide which ones to prune would be lost. Such a layer's
mask gradient is normalized **over the whole layer** instead
(:func:`normalize_mask_gradient`): its units form one vector, scaled as one feature's vector is
in the weight case (``rms``: RMS 1, so a typical unit moves by about ``mask_lr`` per step, as a
typical connection does with weight granularity), so layers stay balanced against each other
and units within a layer keep their ratios.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "NORMALIZERS",
    "NormMode",
    "normalize_mask_gradient",
    "normalize_per_feature",
    "validate_norm_mode",
]

NormMode = Literal["rms", "l2", "max", "none"]
NORMALIZERS: tuple[str, ...] = ("rms", "l2", "max", "none")


def validate_norm_mode(mode: str) -> str:
    if mode not in NORMALIZERS:
        raise ValueError(
            f"unknown normalization mode {mode!r}; choose one of: {', '.join(NORMALIZERS)}"
        )
    return mode


def normalize_per_feature(
    grad: Tensor, mode: str = "rms", eps: float = 1e-12, *, inplace: bool = False
) -> Tensor:
    """Divide each feature's slice of ``grad`` (``grad[f]``) by its scale plus ``eps``.

    Scales: ``rms`` = sqrt(mean(g_f ** 2)), ``l2`` = ||g_f||_2, ``max`` = max |g_f|; ``none``
    returns ``grad`` unchanged. A feature whose gradient is all zero stays zero.

    Args:
        grad: a mask gradient of shape ``(out_features, ...)``.
        mode: one of ``NORMALIZERS``.
        eps: added to the scale to avoid division by zero.
        inplace: overwrite ``grad`` instead of allocating a new tensor.

    Raises:
        ValueError: for an unknown ``mode``.

    Example::

        >>> import torch
        >>> normalize_per_feature(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), "l2")
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    validate_norm_mode(mode)
    if mode == "none":
        return grad
    g = grad.reshape(grad.shape[0], -1)
    # Scale and division in at least float32, cast once at the end: in half precision eps would
    # round to 0 (an all-zero feature would become 0/0 = NaN), and float64 must keep its precision.
    gw = g.to(torch.promote_types(g.dtype, torch.float32))
    if mode == "rms":
        # one reading pass, no squared temporary the size of the gradient
        scale = torch.linalg.vector_norm(gw, dim=1, keepdim=True).mul_(gw.shape[1] ** -0.5)
    elif mode == "l2":
        scale = torch.linalg.vector_norm(gw, dim=1, keepdim=True)
    else:
        scale = gw.abs().amax(dim=1, keepdim=True)
    scale = scale.add_(eps)
    if inplace:
        g.div_(scale)  # g is a view of grad for contiguous grads; computed in scale's dtype
        if g.data_ptr() != grad.data_ptr():
            grad.copy_(g.view_as(grad))
        return grad
    return (g / scale).to(grad.dtype).view_as(grad)


def normalize_mask_gradient(
    grad: Tensor,
    mode: str = "rms",
    eps: float = 1e-12,
    *,
    granularity: str = "weight",
    inplace: bool = False,
    feature_dim: int = 0,
) -> Tensor:
    """Normalize a masked layer's mask gradient as its granularity calls for.

    ``"weight"``: per feature (:func:`normalize_per_feature`). ``"channel"`` (one mask variable
    per feature, ``grad`` of shape ``(out, 1, ...)``): over the whole layer, as one feature, so
    that the ratios between units survive (per feature, each would become ``+-1``: sign SGD);
    see the module's docstring. ``feature_dim`` is the dimension of ``grad`` that holds the
    features (the layer's ``out_dim``: 1 for transformers' ``Conv1D``, whose weight is
    ``(in, out)``).

    Raises:
        ValueError: for an unknown ``mode``.

    Example::

        >>> import torch
        >>> normalize_mask_gradient(torch.tensor([[3.0], [-4.0]]), "l2", granularity="channel")
        tensor([[ 0.6000],
                [-0.8000]])
    """
    if granularity == "weight":
        if feature_dim == 0:
            return normalize_per_feature(grad, mode, eps, inplace=inplace)
        moved = normalize_per_feature(grad.movedim(feature_dim, 0), mode, eps)
        out = moved.movedim(0, feature_dim)
        return grad.copy_(out) if inplace else out
    flat = grad.reshape(1, -1)  # a view of a contiguous gradient, a copy otherwise
    out = normalize_per_feature(flat, mode, eps, inplace=inplace)
    if not inplace:
        return out.view_as(grad)
    if out.data_ptr() != grad.data_ptr() or not grad.is_contiguous():
        grad.copy_(out.view_as(grad))
    return grad
