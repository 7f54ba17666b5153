"""Which layers get a mask: the registry of maskable layer types, and why a layer stays dense.

A layer is *maskable* when it is a Linear or a convolution in substance: a registered type
(``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers' ``Conv1D``, ``nn.MultiheadAttention``'s
packed input projection; :func:`register_maskable` adds one) or a subclass of one. A subclass
that overrides ``forward`` is masked only if its output is still linear in the weight, which a
probe checks once per class on a small input (timm's ``Linear``, which only casts, passes;
a weight-standardized convolution, whose zeroed weights would not stay zero, does not).

Every other layer with a weight stays dense, and :func:`dense_reason` says why; the setup line
of :func:`~scl_lightning.nn.coverage` lists them.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from scl_lightning.nn.masked import MaskedLayer, masked_class

__all__ = [
    "MaskableType",
    "layer_weight",
    "maskable_type",
    "maskable_types",
    "register_maskable",
]


@dataclass(frozen=True)
class MaskableType:
    """A registered layer type: its class (or ``"module.QualName"``, matched without importing
    the module), the name of the weight parameter to mask, the weight dimension that holds the
    output units, and whether subclasses are covered too."""

    cls: type[nn.Module] | str
    weight: str = "weight"
    out_dim: int = 0
    subclasses: bool = True

    def matches(self, candidate: type) -> bool:
        if isinstance(self.cls, str):
            return f"{candidate.__module__}.{candidate.__qualname__}" == self.cls
        return candidate is self.cls


# newest first: a registration of one's own takes precedence over the built-in ones
_REGISTRY: list[MaskableType] = [
    MaskableType(nn.Linear),
    MaskableType(nn.Conv1d),
    MaskableType(nn.Conv2d),
    MaskableType(nn.Conv3d),
    # GPT-2 and its descendants: a Linear whose weight is stored (in, out)
    MaskableType("transformers.pytorch_utils.Conv1D", out_dim=1),
    # the packed q/k/v projection; `out_proj` is an nn.Linear subclass, masked on its own
    MaskableType(nn.MultiheadAttention, weight="in_proj_weight"),
]

# a probe input can be built for these bases, so their subclasses' forward can be checked
_PROBED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PROBES: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def register_maskable(
    cls: type[nn.Module] | str,
    *,
    weight: str = "weight",
    out_dim: int = 0,
    subclasses: bool = True,
) -> None:
    """Mask layers of type ``cls`` from now on: their parameter ``weight`` becomes
    ``w * H(m)``, with output units along dimension ``out_dim`` of that parameter (what
    ``granularity="channel"`` switches and mask gradients are normalized over).

    ``cls`` is a class, or its ``"module.QualName"`` string so that a library need not be
    imported to register it. The layer's ``forward`` must compute a function *linear in that
    weight* (a matrix product or convolution with it, plus anything that does not involve it):
    then a connection whose mask is off contributes nothing. Nothing in this project needs
    subclassing; a registration replaces an earlier one of the same class.

    Raises:
        TypeError: if ``cls`` is neither an ``nn.Module`` class nor a dotted name.
        ValueError: for an empty ``weight`` or a negative ``out_dim``.

    Example::

        >>> class Dense(nn.Module):  # y = x @ kernel, kernel stored (in, out)
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.kernel = nn.Parameter(torch.randn(n_in, n_out))
        ...     def forward(self, x):
        ...         return x @ self.kernel
        >>> register_maskable(Dense, weight="kernel", out_dim=1)
        >>> from scl_lightning.nn import sparsify
        >>> net = sparsify(nn.Sequential(Dense(4, 3)), granularity="channel")
        >>> net[0].mask.shape
        torch.Size([1, 3])
    """
    if isinstance(cls, str):
        if "." not in cls:
            raise TypeError(f"register_maskable: {cls!r} is not a dotted 'module.Class' name")
    elif not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_maskable expects an nn.Module class, got {cls!r}")
    if not isinstance(weight, str) or not weight:
        raise ValueError(f"register_maskable: weight must be a parameter name, got {weight!r}")
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 0:
        raise ValueError(f"register_maskable: out_dim must be an int >= 0, got {out_dim!r}")
    entry = MaskableType(cls, weight, out_dim, subclasses)
    _REGISTRY[:] = [e for e in _REGISTRY if e.cls != cls]
    _REGISTRY.insert(0, entry)
    _PROBES.clear()


def maskable_types() -> tuple[MaskableType, ...]:
    """The registered layer types, newest registration first."""
    return tuple(_REGISTRY)


def _entry(cls: type) -> tuple[MaskableType, type] | None:
    """The registration that covers ``cls`` and the registered class it matched."""
    for depth, base in enumerate(cls.__mro__):
        for entry in _REGISTRY:
            if entry.matches(base) and (depth == 0 or entry.subclasses):
                return entry, base
    return None


def _overrides(cls: type, base: type) -> bool:
    return any(
        getattr(cls, name, None) is not getattr(base, name, None)
        for name in ("forward", "_conv_forward")
    )


def _probe_input(module: nn.Module, base: type, generator: torch.Generator) -> Tensor:
    if base is nn.Linear:
        features = cast(nn.Linear, module).in_features
        return torch.randn(3, features, generator=generator, dtype=torch.float64)
    conv = cast(nn.Conv2d, module)
    spatial = [
        (k - 1) * d + 1 + 2 * s + 1
        for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride, strict=True)
    ]
    return torch.randn(2, conv.in_channels, *spatial, generator=generator, dtype=torch.float64)


def _linear_in_weight(module: nn.Module, base: type, weight: str) -> str | None:
    """``None`` if ``module``'s own forward is linear in its ``weight`` (checked on a float64
    copy, random weights and input, its hooks not run), else why not."""
    try:
        probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        generator = torch.Generator().manual_seed(0)
        x = _probe_input(probe, base, generator)
        shape = probe._parameters[weight].shape  # type: ignore[union-attr]
        w1 = torch.randn(shape, generator=generator, dtype=torch.float64)
        w2 = torch.randn(shape, generator=generator, dtype=torch.float64)

        def run(w: Tensor) -> Tensor:
            probe._parameters[weight] = nn.Parameter(w, requires_grad=False)
            return cast(Tensor, type(probe).forward(probe, x))

        with torch.no_grad():
            y0, y1, y2, y12 = (
                run(torch.zeros(shape, dtype=torch.float64)),
                run(w1),
                run(w2),
                run(w1 + w2),
            )
    except Exception as err:  # other people's layers: anything can happen
        return f"its forward could not be checked ({type(err).__name__}: {err})"
    left, right = y12 - y0, (y1 - y0) + (y2 - y0)
    scale = float(right.abs().max()) if right.numel() else 0.0
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()) or not torch.allclose(
        left, right, rtol=1e-6, atol=1e-9 * max(scale, 1.0)
    ):
        return (
            "its forward is not linear in the weight (it transforms it, e.g. standardizes it), "
            "so a connection masked off would not be zero"
        )
    return None


def maskable_type(module: nn.Module) -> tuple[MaskableType | None, str | None]:
    """``(registration, None)`` when :func:`~scl_lightning.nn.sparsify` can mask ``module``
    by its type, else ``(registration or None, why not)``; ``(None, None)`` for a module with
    no weight to speak of. Instance matters (tied weights, hooks, exclusion) are not judged
    here: see :func:`~scl_lightning.nn.coverage`."""
    if isinstance(module, MaskedLayer):
        return MaskableType(module.dense_cls, module.weight_name, module.out_dim), None
    found = _entry(type(module))
    if found is None:
        weight = module._parameters.get("weight")
        if isinstance(weight, Tensor) and weight.dim() >= 2:
            return None, type(module).__name__
        return None, None
    entry, base = found
    stored = module._parameters.get(entry.weight)
    if stored is None and not isinstance(getattr(module, entry.weight, None), Tensor):
        return entry, f"{type(module).__name__} holds no {entry.weight!r} parameter"
    if isinstance(stored, nn.parameter.UninitializedParameter):
        return entry, (
            f"{type(module).__name__}'s {entry.weight} is not built yet (a lazy layer): run one "
            "forward pass before sparsify"
        )
    if type(module) is not base and _overrides(type(module), base):
        cls = type(module)
        if not any(issubclass(base, b) for b in _PROBED):
            return entry, (
                f"{cls.__name__} overrides the forward of {base.__name__}, which cannot be "
                "checked; register it (register_maskable) if it is linear in its weight"
            )
        if cls not in _PROBES:
            _PROBES[cls] = _linear_in_weight(module, base, entry.weight)
        reason = _PROBES[cls]
        if reason is not None:
            return entry, f"{cls.__name__}: {reason}"
    return entry, None


def layer_weight(module: nn.Module) -> Tensor:
    """The stored (unmasked) weight of a maskable or masked layer, whatever its name."""
    if isinstance(module, MaskedLayer):
        return module.raw_weight
    entry, _ = maskable_type(module)
    name = entry.weight if entry is not None else "weight"
    return cast(Tensor, getattr(module, name))


def masked_class_of(module: nn.Module) -> type[MaskedLayer]:
    """The masked class :func:`~scl_lightning.nn.sparsify` gives ``module``."""
    entry, reason = maskable_type(module)
    if entry is None or reason is not None:
        raise TypeError(reason or f"{type(module).__name__} is not maskable")
    return masked_class(type(module), entry.weight, entry.out_dim)
