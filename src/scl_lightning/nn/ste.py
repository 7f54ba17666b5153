"""Straight-through estimators (STEs) for the unit step ``H(m) = 1[m > 0]``.

The forward pass of every estimator is the exact unit step. The backward pass replaces its
derivative (zero almost everywhere) by a *proxy gradient* ``proxy(m)``. SCL's principle is that the
proxy must be positive everywhere so that every mask variable keeps receiving gradient, can cross
zero in both directions, and converges. ``hardtanh`` breaks that principle on purpose (its proxy is
zero for ``|m| > 1``) and exists for the ablation that shows why it matters.

Three autograd functions use the estimators:

* :func:`heaviside` gives ``H(m)`` with ``dH/dm := proxy(m)``.
* :func:`active_count` gives ``sum(H(m))`` with the same gradient, without the ``H(m)`` tensor;
  it is what :func:`~scl_lightning.nn.stats.connection_count` sums.
* :func:`masked_weight` gives ``w * H(m)`` fused: gradients ``dL/dw = g * H(m)`` and
  ``dL/dm = (g * w) * proxy(m)``. Beyond ``w`` and ``m`` (parameters, already resident) it saves
  ``H(m)`` for the backward pass, in the weight's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "STE",
    "HardtanhSTE",
    "IdentitySTE",
    "LeakyReLUSTE",
    "SoftplusSTE",
    "active_count",
    "available_stes",
    "count_dtype",
    "count_positive",
    "get_ste",
    "heaviside",
    "masked_weight",
    "register_ste",
    "step",
]


def step(m: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The unit step ``H(m) = 1[m > 0]`` in ``dtype`` (default: the dtype of ``m``; no
    gradient), written by the comparison itself: one pass, no boolean temporary."""
    dtype = dtype or m.dtype
    if torch.compiler.is_compiling():
        return (m > 0).to(dtype)  # fused by the compiler anyway; `out=` would break the graph
    return torch.gt(m.detach(), 0, out=torch.empty_like(m, dtype=dtype))


def count_dtype(m: Tensor, per_entry: int = 1) -> torch.dtype:
    """The dtype that sums ``H(m)`` exactly: at least float32, float64 above 2**24 entries
    (above 2**24 connections when each entry of ``m`` stands for ``per_entry`` of them)."""
    # At least float32 (a bfloat16 count is not exact above 256), and float64 above 2**24
    # entries: a sum of 0s and 1s is exact while every partial sum is an integer that the
    # accumulator represents exactly; a count times `per_entry` is exact below 2**24 too.
    if m.numel() * per_entry > 2**24:
        return torch.float64
    return torch.promote_types(m.dtype, torch.float32)


def count_positive(m: Tensor) -> Tensor:
    """The number of entries of ``m`` that are > 0, exactly, as a float scalar tensor (no
    gradient): ``H(m)`` written as floats by the comparison and summed, which is about twice as
    fast on the CPU as summing the boolean ``m > 0`` (converted to int64 on the way).

    Example::

        >>> count_positive(torch.tensor([-1.0, 0.0, 2.0, 3.0]))
        tensor(2.)
    """
    return step(m, count_dtype(m)).sum()


class STE:
    """Base class of straight-through estimators: subclasses define :meth:`proxy`.

    An estimator is a small, picklable, stateless object: it holds only its hyper-parameters.
    ``proxy(m)`` returns the surrogate for ``dH/dm`` with the shape and dtype of ``m``.
    """

    name: str = ""

    def proxy(self, m: Tensor) -> Tensor:
        raise NotImplementedError

    def scale(self, grad: Tensor, m: Tensor) -> Tensor:
        """``grad * proxy(m)``: the chain rule through the step. Estimators whose proxy is
        trivial override it to skip the multiplication (``identity`` returns ``grad``)."""
        return grad * self.proxy(m)

    def add_proxy_(self, grad: Tensor, m: Tensor, alpha: float) -> Tensor:
        """``grad += alpha * proxy(m)`` in place: the gradient of ``alpha * sum(H(m))`` (SCL's
        penalty) added to ``grad``; ``identity`` adds the scalar, with no ``proxy`` tensor."""
        return grad.add_(self.proxy(m).to(grad.dtype), alpha=alpha)

    def hparams(self) -> dict[str, float]:
        """The estimator's hyper-parameters, as accepted by :func:`get_ste`."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.hparams() == other.hparams()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.hparams().items()))))


class IdentitySTE(STE):
    """Proxy gradient 1 everywhere (the default, and the paper's simplest positive proxy).

    Example::

        >>> IdentitySTE().proxy(torch.tensor([-2.0, 0.5]))
        tensor([1., 1.])
    """

    name = "identity"

    def proxy(self, m: Tensor) -> Tensor:
        return torch.ones_like(m)

    def scale(self, grad: Tensor, m: Tensor) -> Tensor:
        return grad  # times 1: no pass over the weights, no temporary

    def add_proxy_(self, grad: Tensor, m: Tensor, alpha: float) -> Tensor:
        return grad.add_(alpha)  # alpha * 1: a scalar, no tensor of ones


class LeakyReLUSTE(STE):
    """Proxy gradient 1 for ``m > 0`` and ``alpha`` otherwise (positive for ``alpha > 0``).

    Args:
        alpha: the proxy slope of pruned connections, in ``(0, 1]``.

    Raises:
        ValueError: if ``alpha`` is not in ``(0, 1]``.

    Example::

        >>> LeakyReLUSTE(alpha=0.1).proxy(torch.tensor([-2.0, 0.5]))
        tensor([0.1000, 1.0000])
    """

    name = "leaky_relu"

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"leaky_relu STE: alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def proxy(self, m: Tensor) -> Tensor:
        return torch.where(m > 0, torch.ones_like(m), torch.full_like(m, self.alpha))

    def hparams(self) -> dict[str, float]:
        return {"alpha": self.alpha}


class SoftplusSTE(STE):
    """Proxy gradient ``sigmoid(beta * m)``: the derivative of ``softplus(beta * m) / beta``.

    Args:
        beta: sharpness, ``> 0``; larger values approach the unit step's own (zero) gradient.

    Raises:
        ValueError: if ``beta`` is not positive.

    Example::

        >>> SoftplusSTE(beta=1.0).proxy(torch.tensor([0.0]))
        tensor([0.5000])
    """

    name = "softplus"

    def __init__(self, beta: float = 1.0) -> None:
        if not float(beta) > 0.0:
            raise ValueError(f"softplus STE: beta must be > 0, got {beta!r}")
        self.beta = float(beta)

    def proxy(self, m: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * m)

    def hparams(self) -> dict[str, float]:
        return {"beta": self.beta}


class HardtanhSTE(STE):
    """Proxy gradient 1 for ``|m| <= 1`` and 0 elsewhere.

    This proxy is **not** positive everywhere: masks that leave ``[-1, 1]`` freeze for good. It
    exists for the ablation that shows why SCL requires a positive proxy.

    Example::

        >>> HardtanhSTE().proxy(torch.tensor([-2.0, 0.5, 1.0]))
        tensor([0., 1., 1.])
    """

    name = "hardtanh"

    def proxy(self, m: Tensor) -> Tensor:
        return (m.abs() <= 1).to(m.dtype)


_REGISTRY: dict[str, type[STE]] = {}


def register_ste(cls: type[STE]) -> type[STE]:
    """Register an :class:`STE` subclass under its ``name`` so :func:`get_ste` finds it."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an STE named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (IdentitySTE, LeakyReLUSTE, SoftplusSTE, HardtanhSTE):
    register_ste(_cls)


def available_stes() -> list[str]:
    """Names accepted by :func:`get_ste`."""
    return sorted(_REGISTRY)


def get_ste(ste: str | STE, **kwargs: Any) -> STE:
    """Return an estimator from its name (with its hyper-parameters) or pass one through.

    Raises:
        ValueError: for an unknown name or a bad hyper-parameter.

    Example::

        >>> get_ste("leaky_relu", alpha=0.2)
        LeakyReLUSTE(alpha=0.2)
    """
    if isinstance(ste, STE):
        if kwargs:
            raise ValueError("get_ste: pass hyper-parameters only together with an STE name")
        return ste
    if not isinstance(ste, str) or ste not in _REGISTRY:
        raise ValueError(f"unknown STE {ste!r}; choose one of: {', '.join(available_stes())}")
    try:
        return _REGISTRY[ste](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters {kwargs} for STE {ste!r}: {err}") from None


class _ActiveCount(torch.autograd.Function):
    """``per_entry * sum(H(m))`` as a scalar, with ``d/dm := per_entry * proxy(m)``: one
    comparison pass forward (or only a sum, of a given ``h = H(m)``), and for the identity
    estimator a broadcast scalar backward (nothing the size of ``m``)."""

    @staticmethod
    def forward(ctx: Any, m: Tensor, ste: STE, h: Tensor | None, per_entry: int) -> Tensor:
        ctx.save_for_backward(m)
        ctx.ste = ste
        ctx.per_entry = per_entry
        if per_entry != 1:
            dtype = count_dtype(m, per_entry)
            count = step(m, dtype).sum() if h is None else h.sum(dtype=dtype)
            return count.mul_(per_entry)
        if h is None:
            return count_positive(m)
        return h.sum(dtype=count_dtype(m))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        (m,) = ctx.saved_tensors
        grad = grad.to(m.dtype)
        if ctx.per_entry != 1:
            grad = grad * ctx.per_entry
        return ctx.ste.scale(grad.expand_as(m), m), None, None, None


def active_count(
    m: Tensor, ste: STE | None = None, *, h: Tensor | None = None, per_entry: int = 1
) -> Tensor:
    """``H(m).sum()``, differentiable through ``ste`` like :func:`heaviside`, but without the
    ``H(m)`` tensor.

    ``h``, when given, must be ``step(m)`` for the current values of ``m`` (a masked layer's
    forward pass has computed it already): it is summed instead of comparing ``m`` again.

    ``per_entry`` is the number of connections each entry of ``m`` switches: 1 for a mask of the
    weight's shape, the fan-in for one mask per output unit (``granularity="channel"``). The
    count is then ``per_entry * sum(H(m))`` connections and its gradient
    ``per_entry * proxy(m)``, so a penalty on it prices every connection alike.

    Example::

        >>> m = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
        >>> count = active_count(m)
        >>> count.backward()
        >>> count, m.grad
        (tensor(2., grad_fn=<_ActiveCountBackward>), tensor([1., 1., 1.]))
    """
    return _ActiveCount.apply(m, ste if ste is not None else _IDENTITY, h, int(per_entry))


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, m: Tensor, ste: STE) -> Tensor:
        ctx.save_for_backward(m)
        ctx.ste = ste
        return step(m)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        (m,) = ctx.saved_tensors
        return ctx.ste.scale(grad, m), None


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, m: Tensor, ste: STE, h: Tensor | None) -> Tensor:
        if h is None:
            h = step(m, w.dtype)
        # H(m) as a float tensor of the weight's dtype, saved for the weight gradient. Not a
        # boolean mask with torch.where (the CPU kernel of `where` branches per element: 0.3 ms
        # for a 300x3072 weight with every mask on, 1.9 ms with a random half off), nor
        # multiplied as bytes (the multiply converts them to a float copy first, every call).
        ctx.save_for_backward(w, m, h)
        ctx.ste = ste
        return w * h

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        w, m, h = ctx.saved_tensors
        grad_w = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_w = grad * h
        if ctx.needs_input_grad[1]:
            gw = grad * w
            if m.shape != w.shape:
                # one mask entry per output unit (broadcast): its gradient is the sum over the
                # connections it switches, accumulated in the mask's dtype (>= float32)
                dims = [d for d in range(w.dim()) if m.shape[d] == 1 and w.shape[d] != 1]
                gw = gw.sum(dim=dims, keepdim=True, dtype=m.dtype)
            grad_m = ctx.ste.scale(gw, m)
        return grad_w, grad_m, None, None


def heaviside(m: Tensor, ste: STE | None = None) -> Tensor:
    """``H(m)`` in the forward pass, ``grad * ste.proxy(m)`` in the backward pass.

    Example::

        >>> m = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> heaviside(m).sum().backward()
        >>> m.grad
        tensor([1., 1.])
    """
    return _Heaviside.apply(m, ste if ste is not None else _IDENTITY)


def masked_weight(
    w: Tensor, m: Tensor, ste: STE | None = None, *, h: Tensor | None = None
) -> Tensor:
    """The effective weight ``w * H(m)``, differentiable in ``w`` and (through ``ste``) in ``m``.

    ``h``, when given, must be ``step(m, w.dtype)`` (the caller computed it): it is used instead
    of comparing ``m`` again. ``m`` may also broadcast against ``w`` (shape ``(out, 1, ...)``:
    one mask per output unit); its gradient is then summed over the connections each entry
    switches.

    Example::

        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> m = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> masked_weight(w, m)
        tensor([0., 4.], grad_fn=<_MaskedWeightBackward>)
    """
    return _MaskedWeight.apply(w, m, ste if ste is not None else _IDENTITY, h)


_IDENTITY = IdentitySTE()
