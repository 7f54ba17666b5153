"""FLOPs of (masked) networks: dense per-layer counts traced once with fvcore, and effective
counts under the current masks.

A dense layer's FLOPs are traced once (fvcore counts one multiply-add as one FLOP). For a Linear
or convolution layer every weight takes part in the same number of multiply-adds (one per output
position), so with unstructured masks a layer's effective FLOPs are exactly its dense FLOPs times
the fraction of its connections that are active. Layers that are not masked count in full.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from scl_lightning.nn.maskable import layer_weight
from scl_lightning.nn.masked import MaskedLayer
from scl_lightning.nn.outputs import named_outputs
from scl_lightning.nn.sparsify import maskable_modules
from scl_lightning.nn.stats import connectivity

__all__ = [
    "FlopCounts",
    "count_flops",
    "dense_view",
    "example_for",
    "example_from_batch",
    "flop_counts",
    "flop_counts_or_none",
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


def _traceable_outputs(module: nn.Module, args: Any, output: Any) -> tuple[Tensor, ...]:
    """The tensors of ``output``, flat, for the ``torch.jit`` trace; an output that also holds
    objects the trace cannot see into is refused: the work that only feeds them would go
    uncounted, and a wrong count is worse than none."""
    tensors = []
    for name, leaf in named_outputs(output):
        if isinstance(leaf, Tensor):
            tensors.append(leaf)
        elif not isinstance(leaf, int | float | complex | str | bytes):
            where = f" at {name!r}" if name else ""
            raise TypeError(
                f"the output holds a value of type {type(leaf).__name__}{where}, which FLOPs "
                "tracing cannot see into (register it with torch.utils._pytree to flatten it)"
            )
    if not tensors:
        raise TypeError(f"the output ({type(output).__name__}) holds no tensor to trace")
    return tuple(tensors)


@torch.no_grad()
def count_flops(model: nn.Module, example_input: Tensor | tuple[Any, ...]) -> FlopCounts:
    """Trace ``model`` once on ``example_input`` (batch of one) and count dense FLOPs.

    Masked layers are traced as their dense classes; the model is traced in eval mode and the
    training mode of every submodule restored afterwards. fvcore's warnings about operators it
    does not count (element-wise ops, which do not change the ranking) are silenced. Outputs
    of any structure trace (dicts, dataclasses, ``ModelOutput``, namedtuples, nested): the
    ``torch.jit`` tracer under fvcore accepts tuples of tensors, so the output is flattened
    (:func:`~scl_lightning.nn.outputs.named_outputs`) for the trace; an output holding an object
    that is neither a tensor, a number nor a container raises ``TypeError``.
    """
    from fvcore.nn import FlopCountAnalysis

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    # Restore each module's own mode: `model.train()` would unfreeze a BatchNorm kept in eval.
    modes = [(module, module.training) for module in model.modules()]
    fvcore_logger = logging.getLogger("fvcore")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    # registered before fvcore's own scope hooks, so they and the tracer see the flat outputs
    flatten = model.register_forward_hook(_traceable_outputs)
    # `nn.MultiheadAttention`'s fused inference kernel is opaque to fvcore: trace its
    # products (projections, attention) instead
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
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
        torch.backends.mha.set_fastpath_enabled(fastpath)
        flatten.remove()
        for module, mode in modes:
            module.training = mode
        fvcore_logger.setLevel(level)
    maskable = list(maskable_modules(model))
    layers = {name: int(by_module.get(name, 0)) for name, _ in maskable}
    modules = {name: int(flops) for name, flops in by_module.items()}
    # A layer whose weight the network reads itself (`F.linear(x, self.qkv.weight)`) is never
    # called, and fvcore books its multiply-adds to the caller; a layer type whose module does
    # more than its product with the weight (`nn.MultiheadAttention`: attention itself) would
    # be priced for all of it. Count those where the weight is read.
    unseen = [name for name, module in maskable if layers[name] == 0 or not _plain_layer(module)]
    if unseen:
        found = _functional_flops(model, inputs, unseen, modes)
        for name in unseen:
            # no product read its weight where one could see it (an einsum, a copy of the
            # weight): fvcore's count of the module is all there is
            layers[name] = found.get(name) or layers[name]
            if not modules.get(name):
                modules[name] = layers[name]
    return FlopCounts(total=total, layers=layers, modules=modules)


def _plain_layer(module: nn.Module) -> bool:
    """A Linear or convolution whose module FLOPs are its weight's: fvcore's count is right."""
    dense = module.dense_cls if isinstance(module, MaskedLayer) else type(module)
    return issubclass(dense, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


class _WeightReads(torch.overrides.TorchFunctionMode):
    """Multiply-adds of the products whose weight is (a view of) one of ``weights``
    (``storage pointer -> layer name``): linear, convolutions, and the matrix products
    (``addmm``, ``mm``, ``matmul``) of layers that store their weight ``(in, out)``; each
    output element costs the product's inner dimension."""

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights = weights
        self.flops: dict[str, int] = {}

    def _name(self, value: Any) -> str | None:
        if not isinstance(value, Tensor) or value.dim() < 2:
            return None
        return self.weights.get(value.untyped_storage().data_ptr())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor):
            return out
        inner = name = None
        if func in _LINEAR_CONV:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self._name(weight)
            if name is not None:
                inner = weight.numel() // max(int(weight.shape[0]), 1)
        elif func in _PRODUCTS:
            a, b = (args[1], args[2]) if func is torch.addmm else (args[0], args[1])
            name = self._name(b) or self._name(a)
            if name is not None and isinstance(a, Tensor):
                inner = int(a.shape[-1])
        if name is not None and inner is not None:
            self.flops[name] = self.flops.get(name, 0) + out.numel() * inner
        return out


_LINEAR_CONV = frozenset(
    {
        torch.nn.functional.linear,
        torch.nn.functional.conv1d,
        torch.nn.functional.conv2d,
        torch.nn.functional.conv3d,
    }
)
_PRODUCTS = frozenset({torch.addmm, torch.mm, torch.matmul, Tensor.matmul, Tensor.__matmul__})


def _functional_flops(
    model: nn.Module,
    inputs: tuple[Any, ...],
    names: list[str],
    modes: list[tuple[nn.Module, bool]],
) -> dict[str, int]:
    """FLOPs of the maskable layers ``names`` from their weights' reads in one forward pass
    (views of a weight count for it: ``nn.MultiheadAttention`` splits ``in_proj_weight``)."""
    modules = dict(model.named_modules())
    weights = {layer_weight(modules[name]).untyped_storage().data_ptr(): name for name in names}
    reads = _WeightReads(weights)
    # `nn.MultiheadAttention` computes its products inside a function the mode above cannot
    # look into (it dispatches through `handle_torch_function`): counted from its inputs
    hooks = []
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            wanted = {n: n in names for n in (name, f"{name}.out_proj" if name else "out_proj")}
            if any(wanted.values()):
                hooks.append(
                    module.register_forward_pre_hook(
                        functools.partial(_attention_flops, reads.flops, wanted),
                        with_kwargs=True,
                    )
                )
    try:
        model.eval()
        with dense_view(model), reads:
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes:
            module.training = mode
    return reads.flops


def _attention_flops(
    flops: dict[str, int],
    wanted: dict[str, bool],
    module: nn.MultiheadAttention,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Multiply-adds of an attention's packed input projection (q, k and v tokens each times
    ``E x E``) and of its output projection (q tokens times ``E x E``)."""
    given = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
    e = module.embed_dim
    tokens = [
        given[k].numel() // width
        for k, width in zip(("query", "key", "value"), (e, module.kdim, module.vdim), strict=True)
    ]
    (in_name, in_wanted), (out_name, out_wanted) = wanted.items()
    if in_wanted:
        flops[in_name] = flops.get(in_name, 0) + sum(tokens) * e * e
    if out_wanted:
        flops[out_name] = flops.get(out_name, 0) + tokens[0] * e * e


def maskable_connectivity(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (active, total)}`` for every maskable layer; dense ones count as fully active.

    A view of :func:`scl_lightning.nn.stats.connectivity`, which defines the counts.
    """
    return {c.name: (c.active, c.total) for c in connectivity(model).layers}


_TRACED: weakref.WeakKeyDictionary[nn.Module, dict[Any, FlopCounts]] = weakref.WeakKeyDictionary()
_FAILED: weakref.WeakKeyDictionary[nn.Module, set[Any]] = weakref.WeakKeyDictionary()


def _one_sample(model: nn.Module, example_input: Tensor) -> tuple[Tensor, Any]:
    """The first sample of ``example_input`` on ``model``'s device and floating dtype, and the
    key that identifies its trace."""
    sample = example_input[:1] if example_input.dim() > 0 else example_input
    # on the model's device, and in its floating dtype: under `bf16-true`/`64-true` the model is
    # converted, an example input (`example_input_array`, a kept batch) is not
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None:
        dtype = param.dtype if sample.is_floating_point() else sample.dtype
        sample = sample.to(param.device, dtype)
    return sample, (tuple(sample.shape), sample.dtype, str(sample.device))


def flop_counts(model: nn.Module, example_input: Tensor) -> FlopCounts:
    """:func:`count_flops` for one sample, traced once per model and input shape.

    ``example_input`` may be a batch: its first sample is traced, so the counts are always one
    sample's; it is moved to the model's device and floating dtype first. Dense FLOPs depend on
    the architecture and the input shape only (never on the masks), so every consumer in a run
    (:class:`~scl_lightning.callbacks.SparsityMonitor`, the run summary) shares one fvcore
    trace.
    """
    sample, key = _one_sample(model, example_input)
    cache = _TRACED.setdefault(model, {})
    if key not in cache:
        cache[key] = count_flops(model, sample)
    return cache[key]


def flop_counts_or_none(model: nn.Module, example_input: Tensor, who: str) -> FlopCounts | None:
    """:func:`flop_counts`, or ``None`` when fvcore cannot trace ``model``: FLOPs are a figure
    to report, never a reason for what asked for them (an export) to fail.

    The first failure for a model and input shape warns once (``UserWarning``, prefixed with
    ``who``, naming the tracer's error) and is remembered: later calls return ``None`` without
    tracing again or warning.

    Example::

        >>> import warnings
        >>> class Opaque(nn.Linear):  # returns an object fvcore cannot look into
        ...     def forward(self, x):
        ...         return {"y": super().forward(x), "cache": object()}
        >>> flop_counts_or_none(nn.Linear(3, 2), torch.ones(1, 3), "me").total
        6
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     print(flop_counts_or_none(Opaque(3, 2), torch.ones(1, 3), "me"))
        None
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        me: FLOPs not counted: fvcore cannot trace Opaque (TypeError: the output holds a value...
    """
    sample, key = _one_sample(model, example_input)
    if key in _FAILED.get(model, ()):
        return None
    try:
        return flop_counts(model, sample)
    except Exception as err:  # tracing other people's modules can fail in many ways
        _FAILED.setdefault(model, set()).add(key)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(
            f"{who}: FLOPs not counted: fvcore cannot trace {type(model).__name__} "
            f"({type(err).__name__}: {reason:.200}); FLOPs are reported as unknown",
            UserWarning,
            stacklevel=2,
        )
        return None
