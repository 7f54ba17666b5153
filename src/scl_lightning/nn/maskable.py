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
_PROBES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, tuple[int, ...]], str | None]] = (
    weakref.WeakKeyDictionary()
)
_ENTRIES: weakref.WeakKeyDictionary[type, tuple[MaskableType, type] | None] = (
    weakref.WeakKeyDictionary()
)


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
    _ENTRIES.clear()


def maskable_types() -> tuple[MaskableType, ...]:
    """The registered layer types, newest registration first."""
    return tuple(_REGISTRY)


def _entry(cls: type) -> tuple[MaskableType, type] | None:
    """The registration that covers ``cls`` and the registered class it matched (looked up
    once per class: every count of a network's layers asks it of each module)."""
    if cls in _ENTRIES:
        return _ENTRIES[cls]
    found = None
    for depth, base in enumerate(cls.__mro__):
        found = next(
            (
                (entry, base)
                for entry in _REGISTRY
                if entry.matches(base) and (depth == 0 or entry.subclasses)
            ),
            None,
        )
        if found is not None:
            break
    _ENTRIES[cls] = found
    return found


def _overrides(cls: type, base: type) -> bool:
    return any(
        getattr(cls, name, None) is not getattr(base, name, None)
        for name in ("forward", "_conv_forward")
    )


def _probe_input(module: nn.Module, base: type, generator: torch.Generator) -> Tensor:
    if issubclass(base, nn.Linear):
        features = cast(nn.Linear, module).in_features
        return torch.randn(3, features, generator=generator, dtype=torch.float64)
    conv = cast(nn.Conv2d, module)
    spatial = [
        (k - 1) * d + 1 + 2 * s + 1
        for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride, strict=True)
    ]
    return torch.randn(2, conv.in_channels, *spatial, generator=generator, dtype=torch.float64)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


def _linear_in_weight(module: nn.Module, base: type, weight: str) -> str | None:
    """``None`` if ``module``'s own forward is linear in its ``weight``, with no other path to
    its output (checked on a float64 copy in eval mode, random weights and input from a
    generator of its own, the bias zeroed, its hooks not run), else why not.

    Linear: ``f(w1 + w2) = f(w1) + f(w2)``, so a connection whose weight is zero adds nothing;
    nothing else: ``f(0) = 0``, so no weight outside the mask (a LoRA adapter) carries the
    input past it. The verdict is the instance's, never cached: a flag of the instance may
    change what its forward does."""
    if any(t.is_meta for t in module.parameters(recurse=False)):
        return "its weights are on the meta device: sparsify after they are materialized"
    try:
        probe = copy.deepcopy(module)
        probe.to(device="cpu", dtype=torch.float64)
        probe.eval()
        bias = probe._parameters.get("bias")
        if isinstance(bias, Tensor):
            probe._parameters["bias"] = nn.Parameter(torch.zeros_like(bias), requires_grad=False)
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
        return (
            f"its forward could not be checked on a probe input ({_first_line(err)}); register "
            "its class (register_maskable) if it is linear in its weight"
        )
    if not all(bool(torch.isfinite(y).all()) for y in (y0, y1, y2, y12)):
        return "its forward is not linear in the weight (not finite on a probe input)"
    scale = max(float(y1.abs().max()), float(y2.abs().max()), 1e-30) if y1.numel() else 1.0
    if not torch.allclose(y12, y1 + y2 - y0, rtol=1e-6, atol=1e-9 * scale):
        return (
            "its forward is not linear in the weight (it transforms it, e.g. standardizes it), "
            "so a connection masked off would not be zero"
        )
    if float(y0.abs().max()) > 1e-9 * scale:
        return (
            "its output does not vanish with the weight and bias (another path, e.g. a LoRA "
            "adapter, carries the input past the mask)"
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
        if isinstance(module, nn.MultiheadAttention):
            return entry, (
                "its q, k and v projections are separate weights (kdim or vdim differ from "
                "embed_dim), which are not masked (its out_proj is); exclude it to say so"
            )
        return entry, f"{type(module).__name__} holds no {entry.weight!r} parameter"
    held = stored if stored is not None else getattr(module, entry.weight)
    if not isinstance(held, nn.parameter.UninitializedParameter) and entry.out_dim >= held.dim():
        return entry, (
            f"{type(module).__name__}'s {entry.weight} has {held.dim()} dims, no dim "
            f"{entry.out_dim} to hold its outputs: register it with the right out_dim"
        )
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
        reason = _probe(module, base, entry.weight)
        if reason is not None:
            return entry, f"{cls.__name__}: {reason}"
    return entry, None


def _probe(module: nn.Module, base: type, weight: str) -> str | None:
    """:func:`_linear_in_weight`, remembered for this module as long as its weight is the
    same tensor of the same shape (a network's layers are asked about many times)."""
    stored = module._parameters.get(weight)
    key = (id(stored), tuple(stored.shape) if stored is not None else ())
    known = _PROBES.get(module)
    if known is None or known[0] != key:
        known = (key, _linear_in_weight(module, base, weight))
        _PROBES[module] = known
    return known[1]


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
