"""Masked layers: ``nn.Linear`` and ``nn.ConvNd`` whose weight is ``w * H(m)``.

Each masked layer *is* its dense parent class with one extra parameter, ``mask`` (the trainable
mask variable ``m``), and an estimator ``ste``. The stored weight keeps its name and place
(``layer._parameters["weight"]``), so state dicts, checkpoints and optimizers see the same
parameters as in the dense layer, and pretrained state dicts load.

Reading ``layer.weight`` gives the *effective* weight ``w * H(m)``, computed on each read (a
class-level property, the mechanism of ``torch.nn.utils.parametrize`` without its renaming of
the parameter). So the mask acts wherever the weight is read: in the parent's own ``forward``
(which the masked classes do not override) and in any functional use of ``module.weight``
elsewhere in the network (attention blocks read their projection weights directly, e.g.
``F.linear(x, self.qkv.weight)``). The stored, unmasked weight is :attr:`MaskedLayer.raw_weight`:
write to that one. ``layer.weight`` is a new tensor on every read: a write into it changes the
copy. Read without autograd (under ``torch.no_grad()``) it is an inference tensor, so a direct
in-place write raises; ``nn.init.*_(layer.weight)`` with autograd on and writes through
``layer.weight.data`` are not caught. ``docs/mask_mechanism.md`` compares this mechanism
with the alternatives, measured.

The mask's *granularity* says what one mask variable switches:

* ``"weight"`` (default): one per connection, ``mask`` has the weight's shape.
* ``"channel"``: one per output unit (a row of a Linear weight, an output channel of a
  convolution), ``mask`` has shape ``(out, 1, ...)`` and broadcasts against the weight. A unit
  whose mask is on keeps all of its ``fan_in`` connections (:attr:`MaskedLayer.per_mask`).

Whatever the granularity, every count is in *connections* (weights):
:meth:`~MaskedLayer.active_count`, :meth:`~MaskedLayer.forward_count`,
:meth:`~MaskedLayer.active_connections` and :attr:`~MaskedLayer.connections`;
:meth:`~MaskedLayer.hard_mask` has the weight's shape.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, cast

import torch
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
    "GRANULARITIES",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLayer",
    "MaskedLinear",
    "mask_shape",
    "masked_class",
    "validate_granularity",
    "validate_mask_init",
]

#: What one mask variable switches: one connection, or every connection of one output unit.
GRANULARITIES: tuple[str, ...] = ("weight", "channel")


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


def validate_granularity(granularity: str) -> str:
    """Check a mask granularity: ``"weight"`` or ``"channel"``."""
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {', '.join(repr(g) for g in GRANULARITIES)}, "
            f"got {granularity!r}"
        )
    return granularity


def mask_shape(
    weight_shape: tuple[int, ...] | torch.Size, granularity: str, out_dim: int = 0
) -> tuple[int, ...]:
    """The shape of the mask of a weight of ``weight_shape``: the same (``"weight"``), or 1
    everywhere but along the output dimension ``out_dim`` (``"channel"``: one mask per output
    unit, broadcast over its fan-in).

    Example::

        >>> mask_shape((16, 3, 5, 5), "channel")
        (16, 1, 1, 1)
        >>> mask_shape((768, 2304), "channel", out_dim=1)  # transformers' Conv1D: (in, out)
        (1, 2304)
    """
    shape = tuple(weight_shape)
    if validate_granularity(granularity) == "weight":
        return shape
    return tuple(size if d == out_dim else 1 for d, size in enumerate(shape))


class MaskedLayer:
    """Mixin for a weight layer with a trainable connectivity mask.

    Subclasses combine it with a dense layer class (``class MaskedLinear(MaskedLayer,
    nn.Linear)``) and keep the parent's ``forward``: the parent reads ``self.weight``, which is
    :meth:`effective_weight` here.
    """

    mask: nn.Parameter
    ste: STE
    dense_cls: type[nn.Module]
    #: the name of the masked parameter (``"weight"``; ``"in_proj_weight"`` for
    #: ``nn.MultiheadAttention``) and the dimension of the weight that holds the output units
    #: (``0``; ``1`` for transformers' ``Conv1D``, whose weight is ``(in, out)``)
    weight_name: str = "weight"
    out_dim: int = 0
    #: ``"weight"`` or ``"channel"`` (see the module's docstring); a class default so layers
    #: pickled before the option existed load as what they were
    granularity: str = "weight"

    def _init_mask(
        self, mask_init: float = 1.0, ste: str | STE = "identity", granularity: str = "weight"
    ) -> None:
        mask_init = validate_mask_init(mask_init)
        self.granularity = validate_granularity(granularity)
        self.ste = get_ste(ste)
        weight = self.raw_weight
        # never below float32, whatever the weight's dtype (see `_apply`)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        if granularity == "weight":
            mask = torch.full_like(weight, mask_init, dtype=dtype, requires_grad=False)
        else:
            shape = mask_shape(weight.shape, granularity, self.out_dim)
            mask = torch.full(shape, mask_init, dtype=dtype, device=weight.device)
        self.register_parameter("mask", nn.Parameter(mask))  # type: ignore[attr-defined]

    @property
    def raw_weight(self) -> nn.Parameter:
        """The stored weight ``w``, unmasked: the parameter that state dicts, checkpoints and
        optimizers hold under the name ``weight``. Initialize or edit the weight through it."""
        weight = self._parameters.get(self.weight_name)  # type: ignore[attr-defined]
        if weight is None:  # the parent's __init__ asks `hasattr` before registering it
            raise AttributeError(f"{type(self).__name__} has no {self.weight_name} yet")
        return cast(nn.Parameter, weight)

    @property
    def weight(self) -> Tensor:
        """The effective weight ``w * H(mask)`` (:meth:`effective_weight`), computed anew on
        each read, wherever it is read: by the layer's own ``forward`` and by any code that
        reads ``module.weight``. The stored weight is :attr:`raw_weight`. (A layer type whose
        masked parameter has another name, ``nn.MultiheadAttention``'s ``in_proj_weight``,
        reads it under that name; see :func:`~scl_lightning.nn.register_maskable`.)"""
        return self._masked_read()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        self._refuse_write(value)

    def _masked_read(self) -> Tensor:
        if "mask" not in self._parameters or self.__dict__.get("_unmasked"):  # type: ignore[attr-defined]
            # being built (the parent's __init__ and reset_parameters initialize the stored
            # weight in place through this name), or reset_parameters now
            return self.raw_weight
        try:
            if torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                return self.effective_weight()
            if torch.compiler.is_compiling():
                return self.effective_weight()
            # A read without autograd: evaluation, or code about to write into the weight
            # (`layer.weight.copy_(w)` or `layer.weight[i] = 0` under no_grad). As an
            # inference tensor the result refuses in-place writes, loudly, instead of letting
            # them change a temporary copy while the stored weight stays as it was.
            with torch.inference_mode():
                return self.effective_weight()
        except AttributeError as err:
            # Python would otherwise fall back to nn.Module.__getattr__, which returns the
            # stored weight: the mask would silently stop acting
            raise RuntimeError(f"{type(self).__name__}.{self.weight_name}: {err}") from err

    def _refuse_write(self, value: Tensor) -> None:
        # nn.Module.__setattr__ registers an nn.Parameter (or None) under the name itself and
        # never calls this; only a plain tensor for a layer without a weight gets here
        raise TypeError(
            f"{type(self).__name__}.{self.weight_name}: assign an nn.Parameter, or write into "
            f"layer.raw_weight, not a {type(value).__name__}"
        )

    def reset_parameters(self) -> None:
        """The parent's initialization, applied to the stored weight (and bias); the mask is
        left as it is."""
        self.__dict__["_unmasked"] = True
        try:
            super().reset_parameters()  # type: ignore[misc]
        finally:
            self.__dict__.pop("_unmasked", None)

    @property
    def per_mask(self) -> int:
        """Connections one mask variable switches: 1, or the fan-in of an output unit
        (``granularity="channel"``)."""
        return self.raw_weight.numel() // max(self.mask.numel(), 1)

    @property
    def connections(self) -> int:
        """The layer's number of connections (weights), whatever the mask's granularity."""
        return self.raw_weight.numel()

    def effective_weight(self) -> Tensor:
        """``weight * H(mask)``, differentiable in both through the layer's estimator."""
        weight = self.raw_weight
        h = step(self.mask, weight.dtype)
        if not torch.compiler.is_compiling():
            # Remembered, weakly (the backward pass holds it until it has run), for
            # `forward_count`: the count of the connections this forward pass used.
            self.__dict__["_fresh_h"] = weakref.ref(h)
            # How often the mask was applied: the engine checks after its first training
            # step that every masked layer's weight was read through its mask.
            self.__dict__["_reads"] = self.__dict__.get("_reads", 0) + 1
        return masked_weight(weight, self.mask, self.ste, h=h)

    @property
    def mask_reads(self) -> int:
        """How many times the effective weight was computed (each forward pass that used the
        layer, each functional read of ``weight``) since the last :meth:`reset_mask_reads`;
        not counted under ``torch.compile``."""
        return int(self.__dict__.get("_reads", 0))

    def reset_mask_reads(self) -> None:
        """Start :attr:`mask_reads` again from 0."""
        self.__dict__["_reads"] = 0

    def active_count(self) -> Tensor:
        """The layer's number of active connections ``sum(H(mask))`` for the mask's current
        values, a scalar differentiable in ``mask`` through the layer's estimator (see
        :func:`scl_lightning.nn.ste.active_count`). With ``granularity="channel"`` it is
        ``fan_in * sum(H(mask))`` and its gradient ``fan_in * proxy(mask)``: a penalty on it
        prices a unit's mask by the connections it switches."""
        per = self.per_mask
        if per == 1:
            return active_count(self.mask, self.ste)
        return active_count(self.mask, self.ste, per_entry=per)

    @torch.no_grad()
    def active_connections(self) -> Tensor:
        """The number of connections active now, exactly, as a float scalar tensor (no
        gradient; ``H(mask)`` counted, times the fan-in with ``granularity="channel"``)."""
        per = self.per_mask
        if per == 1:
            return count_positive(self.mask)
        return step(self.mask, count_dtype(self.mask, per)).sum().mul_(per)

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
            return self.active_connections()
        per = self.per_mask
        if per == 1:
            return h.sum(dtype=count_dtype(self.mask))
        return h.sum(dtype=count_dtype(self.mask, per)).mul_(per)

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
        state.pop("_reads", None)
        return state

    def hard_mask(self) -> Tensor:
        """The binary connectivity ``H(mask)`` of every connection, detached, in the mask's
        dtype and the weight's shape (a channel mask is expanded over each unit's fan-in)."""
        h = step(self.mask.detach())
        weight = self.raw_weight
        if h.shape != weight.shape:
            h = h.expand_as(weight).contiguous()
        return h

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        *,
        mask_init: float = 1.0,
        ste: str | STE = "identity",
        granularity: str = "weight",
    ) -> Any:
        """Turn a dense layer into this masked class *in place* and return it.

        The module keeps its identity, parameters, hooks and device; only its class changes and
        a ``mask`` parameter is added (on the weight's device, of the weight's shape, or
        ``(out, 1, ...)`` with ``granularity="channel"``). This is the same technique
        ``torch.nn.utils.parametrize`` uses.
        """
        validate_granularity(granularity)
        if type(module) is not cls.dense_cls:
            raise TypeError(
                f"{cls.__name__}.from_dense expects exactly {cls.dense_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        if not isinstance(module._parameters.get(cls.weight_name), nn.Parameter):
            raise TypeError(
                f"{cls.__name__}.from_dense needs a layer whose {cls.weight_name} is an "
                f"nn.Parameter of its own; this {type(module).__name__}'s is absent or computed "
                "by a hook (spectral_norm or weight_norm), and a mask on it would not act"
            )
        get_ste(ste)  # a bad estimator fails before the class changes
        module.__class__ = cls  # type: ignore[assignment]
        cast(MaskedLayer, module)._init_mask(mask_init, ste, granularity)
        return module

    def extra_repr(self) -> str:
        parent = super().extra_repr()  # type: ignore[misc]
        extra = (f"{parent}, " if parent else "") + f"ste={self.ste!r}"
        if self.granularity != "weight":
            extra += f", granularity={self.granularity!r}"
        return extra

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A class made by `masked_class` for another layer type exists only once something
        # asked for it: pickled (torch.save of a whole model, deepcopy), it is named by what
        # makes it again, the dense class (pickled by reference) and the weight's layout.
        cls = type(self)
        if not cls.__dict__.get("_generated"):
            return super().__reduce_ex__(protocol)
        return (_new_masked, (cls.dense_cls, cls.weight_name, cls.out_dim), self.__getstate__())


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with weight ``w * H(m)``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        mask_init: initial value of every mask variable, > 0.
        ste: straight-through estimator, by name or instance.
        granularity: ``"weight"`` (one mask per connection) or ``"channel"`` (one per output
            unit, shape ``(out_features, 1)``).

    Raises:
        ValueError: for a non-positive ``mask_init``, an unknown ``ste`` or ``granularity``.

    Example::

        >>> layer = MaskedLinear(4, 2)
        >>> with torch.no_grad():
        ...     layer.mask[0] = -1.0  # prune every input of output 0
        >>> out = layer(torch.ones(1, 4))
        >>> bool(out[0, 0] == layer.bias[0])
        True
        >>> MaskedLinear(4, 2, granularity="channel").mask.shape
        torch.Size([2, 1])
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
        granularity: str = "weight",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_mask(mask_init, ste, granularity)


class _MaskedConvNd(MaskedLayer):
    def __init__(
        self,
        *args: Any,
        mask_init: float = 1.0,
        ste: str | STE = "identity",
        granularity: str = "weight",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask(mask_init, ste, granularity)


class MaskedConv1d(_MaskedConvNd, nn.Conv1d):
    """``nn.Conv1d`` with weight ``w * H(m)``; arguments as for ``nn.Conv1d`` plus ``mask_init``,
    ``ste`` and ``granularity`` (see :class:`MaskedLinear`)."""

    dense_cls = nn.Conv1d


class MaskedConv2d(_MaskedConvNd, nn.Conv2d):
    """``nn.Conv2d`` with weight ``w * H(m)``; grouped and depthwise convolutions included.

    Example::

        >>> conv = MaskedConv2d(4, 4, 3, groups=4, padding=1)  # depthwise
        >>> conv.mask.shape
        torch.Size([4, 1, 3, 3])
        >>> conv(torch.randn(1, 4, 5, 5)).shape
        torch.Size([1, 4, 5, 5])
        >>> MaskedConv2d(4, 8, 3, granularity="channel").mask.shape  # one mask per filter
        torch.Size([8, 1, 1, 1])
    """

    dense_cls = nn.Conv2d


class MaskedConv3d(_MaskedConvNd, nn.Conv3d):
    """``nn.Conv3d`` with weight ``w * H(m)``; arguments as for ``nn.Conv3d`` plus ``mask_init``,
    ``ste`` and ``granularity`` (see :class:`MaskedLinear`)."""

    dense_cls = nn.Conv3d


_STATIC: dict[type[nn.Module], type[MaskedLayer]] = {
    nn.Linear: MaskedLinear,
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
    nn.Conv3d: MaskedConv3d,
}
_GENERATED: dict[tuple[type[nn.Module], str, int], type[MaskedLayer]] = {}


def _absent(name: str) -> property:
    """An attribute the dense class does not have stays absent (``hasattr`` is False)."""

    def get(self: nn.Module) -> Any:
        raise AttributeError(name)

    return property(get)


def _unmasked_method(method: Any) -> Any:
    """``method`` of the dense class, run on the stored weight (an initializer writes it)."""

    def run(self: MaskedLayer, *args: Any, **kwargs: Any) -> Any:
        self.__dict__["_unmasked"] = True
        try:
            return method(self, *args, **kwargs)
        finally:
            self.__dict__.pop("_unmasked", None)

    run.__name__ = method.__name__
    run.__doc__ = method.__doc__
    return run


def masked_class(
    dense_cls: type[nn.Module], weight_name: str = "weight", out_dim: int = 0
) -> type[MaskedLayer]:
    """The masked class of ``dense_cls``, whose parameter ``weight_name`` is masked and holds
    its output units along ``out_dim``: :class:`MaskedLinear` and :class:`MaskedConv1d/2d/3d`
    for the torch classes, otherwise a subclass of ``dense_cls`` made once and reused (a
    subclass of ``nn.Linear`` gets a subclass of :class:`MaskedLinear` and of itself, so both
    ``isinstance`` checks hold). The layer's own ``forward`` is kept; it reads the masked
    parameter through the property :meth:`MaskedLayer.weight` (or under ``weight_name``).

    Which layers get one is decided by the registry
    (:func:`~scl_lightning.nn.register_maskable`); this only makes the class.

    Example::

        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> cls = masked_class(MyLinear)
        >>> cls.__name__, issubclass(cls, MaskedLinear), issubclass(cls, MyLinear)
        ('MaskedMyLinear', True, True)
    """
    static = _STATIC.get(dense_cls)
    if static is not None and weight_name == "weight" and out_dim == 0:
        return static
    key = (dense_cls, weight_name, out_dim)
    cls = _GENERATED.get(key)
    if cls is not None:
        return cls
    base: type[MaskedLayer] = MaskedLayer
    if weight_name == "weight" and out_dim == 0:
        base = next((m for d, m in _STATIC.items() if issubclass(dense_cls, d)), MaskedLayer)
    namespace: dict[str, Any] = {
        "dense_cls": dense_cls,
        "weight_name": weight_name,
        "out_dim": out_dim,
        "_generated": True,
        "__module__": __name__,
        "__doc__": f"``{dense_cls.__qualname__}`` with its ``{weight_name}`` masked: "
        f"``w * H(m)`` (made by :func:`masked_class`).",
    }
    if weight_name != "weight":
        namespace[weight_name] = property(MaskedLayer._masked_read, MaskedLayer._refuse_write)
        namespace["weight"] = _absent("weight")
    if not hasattr(dense_cls, "reset_parameters"):  # transformers' Conv1D, MultiheadAttention
        namespace["reset_parameters"] = _absent("reset_parameters")
    if hasattr(dense_cls, "_reset_parameters"):  # MultiheadAttention's own initializer
        namespace["_reset_parameters"] = _unmasked_method(dense_cls._reset_parameters)
    cls = cast(
        "type[MaskedLayer]", type(f"Masked{dense_cls.__name__}", (base, dense_cls), namespace)
    )
    _GENERATED[key] = cls
    return cls


def _new_masked(dense_cls: type[nn.Module], weight_name: str, out_dim: int) -> MaskedLayer:
    """An empty instance of ``masked_class(...)``, for unpickling (its state follows)."""
    cls = masked_class(dense_cls, weight_name, out_dim)
    return cast(MaskedLayer, object.__new__(cls))
