"""Masked layers: ``nn.Linear`` and ``nn.ConvNd`` whose weight is ``w * H(m)``.

Each masked layer *is* its dense parent class with one extra parameter, ``mask`` (the trainable
mask variable ``m``, same shape as ``weight``), and an estimator ``ste``. ``weight`` and ``bias``
keep their names, so pretrained state_dicts load, and the forward pass is the parent's own
computation with the effective weight swapped in.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scl_lightning.nn.ste import (
    STE,
    active_count,
    count_dtype,
    count_positive,
    get_ste,
    masked_weight,
    step,
)

__all__ = [
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLayer",
    "MaskedLinear",
    "validate_mask_init",
]


def validate_mask_init(mask_init: float) -> float:
    """Check that a mask initial value is a finite number > 0 (every connection starts on)."""
    if isinstance(mask_init, bool) or not isinstance(mask_init, (int, float)):
        raise ValueError(f"mask_init must be a positive number, got {mask_init!r}")
    if not (math.isfinite(mask_init) and mask_init > 0):
        raise ValueError(
            f"mask_init must be a finite number > 0 so that every connection starts on, "
            f"got {mask_init!r}"
        )
    return float(mask_init)


class MaskedLayer:
    """Mixin for a weight layer with a trainable connectivity mask.

    Subclasses combine it with a dense layer class (``class MaskedLinear(MaskedLayer,
    nn.Linear)``) and call :meth:`effective_weight` where the parent uses ``self.weight``.
    """

    weight: Tensor
    mask: nn.Parameter
    ste: STE
    dense_cls: type[nn.Module]

    def _init_mask(self, mask_init: float = 1.0, ste: str | STE = "identity") -> None:
        mask_init = validate_mask_init(mask_init)
        self.ste = get_ste(ste)
        # never below float32, whatever the weight's dtype (see `_apply`)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        mask = torch.full_like(self.weight, mask_init, dtype=dtype, requires_grad=False)
        self.register_parameter("mask", nn.Parameter(mask))  # type: ignore[attr-defined]

    def effective_weight(self) -> Tensor:
        """``weight * H(mask)``, differentiable in both through the layer's estimator."""
        h = step(self.mask, self.weight.dtype)
        if not torch.compiler.is_compiling():
            # Remembered, weakly (the backward pass holds it until it has run), for
            # `forward_count`: the count of the connections this forward pass used.
            self.__dict__["_fresh_h"] = weakref.ref(h)
        return masked_weight(self.weight, self.mask, self.ste, h=h)

    def active_count(self) -> Tensor:
        """The layer's number of active connections ``sum(H(mask))`` for the mask's current
        values, a scalar differentiable in ``mask`` through the layer's estimator (see
        :func:`scl_lightning.nn.ste.active_count`)."""
        return active_count(self.mask, self.ste)

    @torch.no_grad()
    def forward_count(self) -> Tensor:
        """The number of connections the latest forward pass used (no gradient), exactly.

        It sums that pass's ``H(mask)`` while its backward pass still holds it, so a figure
        logged next to the loss (SCL's ``lam * C``) costs no second pass over the mask and is
        the count that loss was computed with, whatever was written to the mask since. Once
        the backward pass has run, or before any forward pass, it counts the current mask.
        """
        ref = self.__dict__.pop("_fresh_h", None)
        h = ref() if ref is not None else None
        if h is None:
            return count_positive(self.mask)
        return h.sum(dtype=count_dtype(self.mask))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # Masks never drop below float32. `module.to(torch.bfloat16)` (and Lightning's
        # `bf16-true`/`16-true`, which convert the module) would otherwise store them in a
        # format whose steps near 1.0 are 2**-8 (bfloat16) apart: mask updates smaller than
        # that round away and the masks stall, silently. The device still follows `fn`.
        data = self.mask.data  # the parameter object is kept; its data is replaced
        before = data.dtype
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        after = self.mask.dtype
        if (
            before.is_floating_point
            and after.is_floating_point
            and torch.finfo(after).bits < 32 <= torch.finfo(before).bits
        ):
            self.mask.data = data.to(self.mask.device)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # the forward pass's H(mask) belongs to this object's mask, never to a copy's
        state = self.__dict__.copy()
        state.pop("_fresh_h", None)
        return state

    def hard_mask(self) -> Tensor:
        """The binary connectivity ``H(mask)`` as a detached tensor of the weight's dtype."""
        return step(self.mask.detach())

    @classmethod
    def from_dense(
        cls, module: nn.Module, *, mask_init: float = 1.0, ste: str | STE = "identity"
    ) -> Any:
        """Turn a dense layer into this masked class *in place* and return it.

        The module keeps its identity, parameters, hooks and device; only its class changes and
        a ``mask`` parameter is added (on the weight's device and dtype). This is the same
        technique ``torch.nn.utils.parametrize`` uses.
        """
        if type(module) is not cls.dense_cls:
            raise TypeError(
                f"{cls.__name__}.from_dense expects exactly {cls.dense_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        module.__class__ = cls  # type: ignore[assignment]
        cast(MaskedLayer, module)._init_mask(mask_init, ste)
        return module

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ste={self.ste!r}"  # type: ignore[misc]


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with weight ``w * H(m)``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        mask_init: initial value of every mask variable, > 0.
        ste: straight-through estimator, by name or instance.

    Raises:
        ValueError: for a non-positive ``mask_init`` or an unknown ``ste``.

    Example::

        >>> layer = MaskedLinear(4, 2)
        >>> with torch.no_grad():
        ...     layer.mask[0] = -1.0  # prune every input of output 0
        >>> out = layer(torch.ones(1, 4))
        >>> bool(out[0, 0] == layer.bias[0])
        True
    """

    dense_cls = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        mask_init: float = 1.0,
        ste: str | STE = "identity",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_mask(mask_init, ste)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.effective_weight(), self.bias)


class _MaskedConvNd(MaskedLayer):
    def __init__(
        self, *args: Any, mask_init: float = 1.0, ste: str | STE = "identity", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask(mask_init, ste)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.effective_weight(), self.bias)  # type: ignore[attr-defined]


class MaskedConv1d(_MaskedConvNd, nn.Conv1d):
    """``nn.Conv1d`` with weight ``w * H(m)``; arguments as for ``nn.Conv1d`` plus ``mask_init``
    and ``ste`` (see :class:`MaskedLinear`)."""

    dense_cls = nn.Conv1d


class MaskedConv2d(_MaskedConvNd, nn.Conv2d):
    """``nn.Conv2d`` with weight ``w * H(m)``; grouped and depthwise convolutions included.

    Example::

        >>> conv = MaskedConv2d(4, 4, 3, groups=4, padding=1)  # depthwise
        >>> conv.mask.shape
        torch.Size([4, 1, 3, 3])
        >>> conv(torch.randn(1, 4, 5, 5)).shape
        torch.Size([1, 4, 5, 5])
    """

    dense_cls = nn.Conv2d


class MaskedConv3d(_MaskedConvNd, nn.Conv3d):
    """``nn.Conv3d`` with weight ``w * H(m)``; arguments as for ``nn.Conv3d`` plus ``mask_init``
    and ``ste`` (see :class:`MaskedLinear`)."""

    dense_cls = nn.Conv3d
