"""FLOPs of (masked) networks: dense per-layer counts traced once with fvcore, and effective
counts under the current masks.

A dense layer's FLOPs are traced once (fvcore counts one multiply-add as one FLOP). For a Linear
or convolution layer every weight takes part in the same number of multiply-adds (one per output
position), so with unstructured masks a layer's effective FLOPs are exactly its dense FLOPs times
the fraction of its connections that are active. Layers that are not masked count in full.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from scl_lightning.nn.masked import MaskedLayer
from scl_lightning.nn.sparsify import maskable_modules
from scl_lightning.nn.stats import connectivity

__all__ = [
    "FlopCounts",
    "count_flops",
    "dense_view",
    "example_for",
    "example_from_batch",
    "flop_counts",
    "maskable_connectivity",
]


@contextlib.contextmanager
def dense_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily give masked layers their dense class back (plain ops, masks ignored)."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for module in model.modules():
            if isinstance(module, MaskedLayer):
                swapped.append((module, type(module)))
                module.__class__ = module.dense_cls  # type: ignore[assignment]
        yield model
    finally:
        for module, cls in swapped:
            module.__class__ = cls


@dataclass(frozen=True)
class FlopCounts:
    """Dense FLOPs of one forward pass of one sample: the total, each maskable layer's, and
    (``modules``) every submodule's, by qualified name (``""`` is the whole model)."""

    total: int
    layers: dict[str, int] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)

    def effective(self, active_fraction: Mapping[str, float]) -> tuple[int, dict[str, float]]:
        """Total and per-layer FLOPs when layer ``name`` keeps ``active_fraction[name]``."""
        per_layer = {n: f * active_fraction.get(n, 1.0) for n, f in self.layers.items()}
        total = self.total - sum(self.layers.values()) + sum(per_layer.values())
        return round(total), per_layer

    def effective_module(self, name: str, active_fraction: Mapping[str, float]) -> int:
        """Effective FLOPs of submodule ``name`` (``""``: the whole model, as
        :meth:`effective`): its dense FLOPs, less what the pruned connections of the maskable
        layers inside it would have cost."""
        prefix = f"{name}." if name else ""
        saved = sum(
            flops * (1.0 - active_fraction.get(layer, 1.0))
            for layer, flops in self.layers.items()
            if layer == name or layer.startswith(prefix)
        )
        dense = self.total if not name else self.modules.get(name, 0)
        return round(dense - saved)


def example_from_batch(batch: Any) -> Tensor | None:
    """One sample of a batch's input, for tracing: ``x[:1]`` of a tensor, the first element of a
    tuple/list, or the first tensor value of a dict."""
    if isinstance(batch, Tensor):
        return batch[:1]
    if isinstance(batch, (tuple, list)) and batch:
        return example_from_batch(batch[0])
    if isinstance(batch, Mapping):
        for key in ("x", "input", "inputs", "image", "images"):
            if key in batch:
                return example_from_batch(batch[key])
        for value in batch.values():
            if isinstance(value, Tensor):
                return value[:1]
    return None


def example_for(module: nn.Module, batch: Any, given: Tensor | None = None) -> Tensor | None:
    """The input to trace ``module`` with: ``given``, else the module's ``example_input_array``
    (a Lightning module's), else one sample of ``batch`` (:func:`example_from_batch`)."""
    if given is not None:
        return given
    example = getattr(module, "example_input_array", None)
    if isinstance(example, Tensor):
        return example
    return example_from_batch(batch)


@torch.no_grad()
def count_flops(model: nn.Module, example_input: Tensor | tuple[Any, ...]) -> FlopCounts:
    """Trace ``model`` once on ``example_input`` (batch of one) and count dense FLOPs.

    Masked layers are traced as their dense classes; the model is traced in eval mode and the
    training mode of every submodule restored afterwards. fvcore's warnings about operators it
    does not count (element-wise ops, which do not change the ranking) are silenced.
    """
    from fvcore.nn import FlopCountAnalysis

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    # Restore each module's own mode: `model.train()` would unfreeze a BatchNorm kept in eval.
    modes = [(module, module.training) for module in model.modules()]
    fvcore_logger = logging.getLogger("fvcore")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    try:
        model.eval()
        with dense_view(model):
            analysis = (
                FlopCountAnalysis(model, inputs)
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
                .tracer_warnings("none")
            )
            by_module = analysis.by_module()
            total = int(analysis.total())
    finally:
        for module, mode in modes:
            module.training = mode
        fvcore_logger.setLevel(level)
    layers = {name: int(by_module.get(name, 0)) for name, _ in maskable_modules(model)}
    modules = {name: int(flops) for name, flops in by_module.items()}
    return FlopCounts(total=total, layers=layers, modules=modules)


def maskable_connectivity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (active, total)}`` for every maskable layer; dense ones count as fully active.

    A view of :func:`scl_lightning.nn.stats.connectivity`, which defines the counts.
    """
    return {c.name: (c.active, c.total) for c in connectivity(model).layers}


_TRACED: weakref.WeakKeyDictionary[nn.Module, dict[Any, FlopCounts]] = weakref.WeakKeyDictionary()


def flop_counts(model: nn.Module, example_input: Tensor) -> FlopCounts:
    """:func:`count_flops` for one sample, traced once per model and input shape.

    ``example_input`` may be a batch: its first sample is traced, so the counts are always one
    sample's; it is moved to the model's device and floating dtype first. Dense FLOPs depend on
    the architecture and the input shape only (never on the masks), so every consumer in a run
    (:class:`~scl_lightning.callbacks.SparsityMonitor`, the run summary) shares one fvcore
    trace.
    """
    sample = example_input[:1] if example_input.dim() > 0 else example_input
    # on the model's device, and in its floating dtype: under `bf16-true`/`64-true` the model is
    # converted, an example input (`example_input_array`, a kept batch) is not
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        dtype = param.dtype if sample.is_floating_point() else sample.dtype
        sample = sample.to(param.device, dtype)
    key = (tuple(sample.shape), sample.dtype, str(sample.device))
    cache = _TRACED.setdefault(model, {})
    if key not in cache:
        cache[key] = count_flops(model, sample)
    return cache[key]
