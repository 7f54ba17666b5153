"""Export a pruned network in the format that runs it fastest: dense, compact, sparse or ONNX.

===========  ===============  ==========================================================
format       file             what it is
===========  ===============  ==========================================================
``dense``    ``.safetensors`` ``w * H(m)`` baked into the original architecture
                              (:func:`~scl_lightning.deploy.save_pruned`); loads with
                              ``strict=True`` into the never-masked network
``compact``  ``.pt2``         :func:`~scl_lightning.deploy.compact.compact`: units and
                              channels nothing uses removed, smaller layers; saved with
                              ``torch.export`` (loads without scl_lightning, runs no code)
``sparse``   ``.pt2``         the compact network with each ``Linear`` stored and computed
                              in CSR where that was *measured* faster than dense on this
                              machine at the batch size given (convolutions stay dense:
                              torch has no sparse convolution on CPU; compact removes
                              their dead channels instead); saved with ``torch.export``
                              around the op ``scl_lightning::csr_linear``, so loading it
                              needs scl_lightning imported. Where the network cannot be
                              compacted (``torch.fx`` cannot trace it), the pruned network
                              uncompacted, with a warning and a note
``onnx``     ``.onnx``        the compact network in ONNX (uncompacted, with a warning and
                              a note, where it cannot be compacted), every output checked
                              against onnxruntime when written (needs the ``deploy``
                              extra)
===========  ===============  ==========================================================

Every export reports parameters, bytes on disk and FLOPs per sample before (the dense network)
and after; FLOPs are counted with fvcore, and a network it cannot trace is still exported, in
every format, with one warning and the FLOPs reported as unknown. Files are written to a
temporary name next to the output and moved into place, so a failed export leaves nothing
behind and an existing file is never replaced unless asked. A network compiled with
``torch.compile`` is exported as the network it wraps
(:func:`~scl_lightning.deploy.export.uncompiled`): the same files as the uncompiled one.

**Structured outputs** (a tuple, a dict, a namedtuple, a dataclass, Hugging Face's
``ModelOutput``, nested). ``dense`` stores weights only, whatever the network returns.
``compact`` and ``sparse`` keep the structure wherever ``torch.export`` can save it: tuples,
lists, dicts (a ``ModelOutput`` comes back as a plain dict of the same keys, which ``torch.fx``
makes of it) and types registered as pytree nodes with a serialized name (a dataclass registered
with ``torch.export.register_dataclass(cls, serialized_type_name=...)``, in the process that
loads it too). ``onnx`` flattens the output into its tensors, named by their path (``logits``,
``aux.0``): :func:`load_export` gives them back as a dict of those names (one tensor, for a
network that returns one). An output ``torch.export`` cannot save (a namedtuple, an unregistered
dataclass), or one that holds something other than tensors and numbers (a cache object), is
refused before anything is written, in one line that says what works: usually
:func:`select_output`, a wrapper that returns one named tensor of the output.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.jit import TracerWarning

from scl_lightning.deploy.compact import (
    CompactReport,
    LinearOnSelectedInputs,
    compact,
    stored_parameters,
)
from scl_lightning.deploy.export import atomic_file, save_pruned, uncompiled
from scl_lightning.nn.flops import flop_counts_or_none
from scl_lightning.nn.outputs import key_path_name, named_outputs
from scl_lightning.nn.sparsify import export_pruned, masked_modules

__all__ = [
    "DEFAULT_NAMES",
    "FORMATS",
    "SUFFIXES",
    "ExportReport",
    "ExportedModule",
    "SelectedOutput",
    "SparseLinear",
    "csr_linear",
    "export_model",
    "load_export",
    "select_output",
    "sparsify_linears",
]

FORMATS = ("dense", "compact", "sparse", "onnx")
SUFFIXES = {"dense": ".safetensors", "compact": ".pt2", "sparse": ".pt2", "onnx": ".onnx"}
#: the file ``scl export`` writes in a run's ``export/`` folder unless told otherwise
DEFAULT_NAMES = {
    "dense": "model.safetensors",
    "compact": "model.pt2",
    "sparse": "model_sparse.pt2",
    "onnx": "model.onnx",
}
#: largest difference allowed between onnxruntime's outputs and torch's on the example input
ONNX_TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """What an export wrote and what it saves against the dense network (per sample).

    ``flops_before`` and ``flops_after`` are ``None`` when fvcore cannot trace the network
    (a warning said why): the export is written all the same."""

    format: str
    path: Path
    params_before: int
    params_after: int
    bytes_before: int  # the dense network's parameters in their dtype
    bytes_after: int  # the file written
    flops_before: int | None  # fvcore, one sample, multiply-adds; None: not traceable
    flops_after: int | None
    notes: list[str] = field(default_factory=list)
    compact: CompactReport | None = None

    def summary(self) -> str:
        def ratio(before: int, after: int) -> str:
            # compaction can add parameters (a bias map for a removed unit's constant output)
            if before <= 0 or after <= 0:
                return "-"
            if after > before:
                return f"{after / before:.1f}x larger"
            return f"{before / after:.1f}x smaller" if after < before else "unchanged"

        if self.flops_before is None or self.flops_after is None:
            flops = "  FLOPs: unknown (fvcore cannot trace the network; see the warning)"
        else:
            flops = (
                f"  FLOPs      {self.flops_before:,} -> {self.flops_after:,} per sample "
                f"({ratio(self.flops_before, self.flops_after)})"
            )
        lines = [
            f"{self.format} -> {self.path}",
            f"  parameters {self.params_before:,} -> {self.params_after:,} "
            f"({ratio(self.params_before, self.params_after)})",
            f"  bytes      {self.bytes_before:,} -> {self.bytes_after:,} "
            f"({ratio(self.bytes_before, self.bytes_after)})",
            flops,
            *(f"  note: {n}" for n in self.notes),
        ]
        return "\n".join(lines)


@torch.library.custom_op("scl_lightning::csr_linear", mutates_args=())
def csr_linear(
    input: Tensor, crow: Tensor, col: Tensor, values: Tensor, out_features: int
) -> Tensor:
    """``input @ W.T`` for a ``(out_features, in)`` weight ``W`` given by its CSR components.

    A torch custom op, so ``torch.export`` keeps it as one opaque call whose arguments are plain
    dense tensors: the program saves to ``.pt2`` (sparse tensors themselves cannot be exported)
    and loads wherever scl_lightning is imported."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        weight = torch.sparse_csr_tensor(crow, col, values, (out_features, input.shape[-1]))
    return torch.sparse.mm(weight, input.t()).t().contiguous()


@csr_linear.register_fake
def _csr_linear_shape(
    input: Tensor, crow: Tensor, col: Tensor, values: Tensor, out_features: int
) -> Tensor:
    return input.new_empty(input.shape[0], out_features)


class SparseLinear(nn.Module):
    """A ``Linear`` whose weight is stored as CSR components (``crow``, ``col``, ``values``:
    ``nnz`` values instead of ``out x in``) and computed with ``torch.sparse.mm``.

    It keeps the ``Linear``'s ``in_features``, ``out_features`` and ``bias`` (a parameter, or
    ``None``). ``weight`` is a read-only view for code that reads a layer's weight
    (``layer.weight.dtype``, ``F.linear(x, layer.weight)``): the dense ``(out_features,
    in_features)`` matrix, in the values' dtype and on their device, built from the CSR
    components on each read. Writing into it changes nothing, assigning it raises
    ``AttributeError``, and each read costs a dense matrix, which is why
    :func:`sparsify_linears` keeps dense a layer whose weight the network reads.

    Example::

        >>> linear = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     linear.weight[0] = 0
        >>> sparse = SparseLinear(linear)
        >>> torch.equal(sparse.weight, linear.weight), sparse.weight.dtype, sparse.in_features
        (True, torch.float32, 3)
        >>> torch.allclose(sparse(torch.ones(4, 3)), linear(torch.ones(4, 3)))
        True
    """

    crow: Tensor
    col: Tensor
    values: Tensor
    inputs: Tensor | None  # a first layer's input features (LinearOnSelectedInputs), else None
    #: the layers whose ``weight`` was read, while :func:`sparsify_linears` checks a replacement
    _weight_reads: ClassVar[list[SparseLinear] | None] = None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = linear.weight.detach().to_sparse_csr()
        col = csr.col_indices()
        inputs = None
        if isinstance(linear, LinearOnSelectedInputs):
            # read the network's input directly: the selection moves into the column indices
            inputs = linear.inputs.clone()
            col = inputs[col]
        # copies (a component view keeps the sparse tensor alive, which torch.export refuses),
        # int32 where the sizes allow: torch's CSR kernels run faster on them
        index = torch.int32 if max(col.numel(), csr.shape[1]) < 2**31 else torch.int64
        self.register_buffer("crow", csr.crow_indices().to(index, copy=True))
        self.register_buffer("col", col.to(index, copy=True))
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("inputs", inputs)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight, built from the CSR components (a
        copy, for reading)."""
        if SparseLinear._weight_reads is not None:
            SparseLinear._weight_reads.append(self)
        values = self.values
        # no sparse tensor on the way (torch.export cannot trace one): a scatter of the values
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=values.device),
            self.crow.diff().long(),
            output_size=values.numel(),
        )
        columns = self.col.long()
        if self.inputs is not None:  # back from the network's input to the layer's own
            # (compact lists the inputs in increasing order)
            columns = torch.searchsorted(self.inputs, columns)
        dense = values.new_zeros(self.out_features, self.in_features)
        return dense.index_put((rows, columns), values)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":
            raise AttributeError(
                "SparseLinear.weight is a read-only view of the CSR values; set the layer's "
                "values buffer, or replace the layer with an nn.Linear"
            )
        super().__setattr__(name, value)

    def forward(self, input: Tensor) -> Tensor:
        flat = input.reshape(-1, input.shape[-1])
        out = csr_linear(flat, self.crow, self.col, self.values, self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nnz={self.values.numel()}"


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    with torch.inference_mode():
        fn()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed run: other load only ever adds time


def sparsify_linears(
    model: nn.Module,
    batch_size: int = 256,
    repeats: int = 20,
    example: Tensor | None = None,
) -> tuple[nn.Module, list[str]]:
    """Replace each ``Linear`` of ``model`` (in place) by a :class:`SparseLinear` where CSR was
    measured faster than dense for a batch of ``batch_size`` on this machine.

    With ``example``, each replacement is checked on it: a layer whose weight the network reads
    outside the layer's forward (attention code computing ``F.linear(x, self.qkv.weight)``, or
    reading ``self.qkv.weight.dtype``: a :class:`SparseLinear` would rebuild its dense weight
    on every read), or whose replacement changes the output or fails, stays dense, with a note.
    Without ``example`` nothing is checked: such a network still runs (the CSR layer's
    ``weight`` is a dense view) but pays for a dense matrix at each read. A compiled ``model``
    (``torch.compile``) is unwrapped: the module it wraps is changed and returned."""
    with uncompiled(model) as plain:
        return _sparsify_linears(plain, batch_size, repeats, example)


def _sparsify_linears(
    model: nn.Module, batch_size: int, repeats: int, example: Tensor | None
) -> tuple[nn.Module, list[str]]:
    notes = []
    reference = None
    if example is not None:
        with torch.no_grad():
            reference = pytree.tree_leaves(model(example))
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, LinearOnSelectedInputs):
            continue
        assert isinstance(module, nn.Linear)
        # the network's input width for a first layer that selects its inputs
        width = module.in_features
        if isinstance(module, LinearOnSelectedInputs):
            width = int(module.inputs.max()) + 1
        # the layer's own dtype: a float64 network times (and runs) in float64
        x = torch.randn(batch_size, width, dtype=module.weight.dtype)
        sparse = SparseLinear(module)
        dense_s = _best_time(functools.partial(module, x), repeats)
        sparse_s = _best_time(functools.partial(sparse, x), repeats)
        density = float(module.weight.ne(0).float().mean())
        chosen = sparse_s < dense_s
        notes.append(
            f"{name}: density {density:.3f}, batch {batch_size}: dense {dense_s * 1e6:.0f} us, "
            f"CSR {sparse_s * 1e6:.0f} us -> {'CSR' if chosen else 'dense'}"
        )
        if chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, sparse)
            why = _replacement_breaks(model, sparse, example, reference)
            if why is not None:
                setattr(parent, child, module)
                notes.append(f"{name}: kept dense, {why}")
    return model, notes


def _replacement_breaks(
    model: nn.Module, sparse: SparseLinear, example: Tensor | None, reference: list[Any] | None
) -> str | None:
    """Why ``model``, with ``sparse`` in the place of a ``Linear``, should not keep it: the
    network reads its weight, or no longer computes ``reference`` on ``example``; or ``None``."""
    if example is None or reference is None:
        return None
    reads: list[SparseLinear] = []
    SparseLinear._weight_reads = reads
    try:
        with torch.no_grad():
            out = pytree.tree_leaves(model(example))
    except Exception as err:  # anything else the CSR layer cannot do where it stands
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"the network fails with it in CSR ({type(err).__name__}: {reason:.200})"
    finally:
        SparseLinear._weight_reads = None
    if any(layer is sparse for layer in reads):
        return (
            "its weight is read outside its forward (a CSR layer would rebuild the dense "
            "matrix at every read)"
        )
    same = len(out) == len(reference) and all(
        not isinstance(a, Tensor) or torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        for a, b in zip(out, reference, strict=True)
    )
    return None if same else "the network computes something else with it in CSR"


def _flops(model: nn.Module, example: Tensor, sparse: nn.Module | None = None) -> int | None:
    """fvcore FLOPs (multiply-adds) of one sample of ``model``, or ``None`` (with a warning)
    when fvcore cannot trace it; with ``sparse`` (``model`` with some ``Linear`` layers made
    :class:`SparseLinear`), those layers count their stored values instead: a layer's traced
    FLOPs times its density (one multiply-add per stored value and input row, however many
    rows a sample gives it: one for a vector, T for ``(T, C)`` tokens)."""
    counts = flop_counts_or_none(model, example[:1], "export")
    if counts is None:
        return None
    total = counts.total
    for name, module in sparse.named_modules() if sparse is not None else []:
        if isinstance(module, SparseLinear):
            values = module.values
            assert isinstance(values, Tensor)
            density = values.numel() / max(module.in_features * module.out_features, 1)
            total -= round(counts.modules.get(name, 0) * (1.0 - density))
    return total


class _OutputNotFound(ValueError):
    """:class:`SelectedOutput` was asked for an output the network does not return."""


class SelectedOutput(nn.Module):
    """``model`` returning one tensor of its output: the leaf named ``key``
    (:func:`select_output` builds it)."""

    def __init__(self, model: nn.Module, key: str | int) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"select_output: model must be an nn.Module, got {type(model).__name__}"
            )
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise TypeError(
                f"select_output: key must be an output's name (str) or index (int), got {key!r}"
            )
        self.model = model
        self.key = key

    # one named input, not *args: torch.fx (compact) cannot trace through variadic arguments
    def forward(self, input: Any) -> Any:
        output = self.model(input)
        if isinstance(self.key, int) and isinstance(output, tuple | list):  # a namedtuple too
            if -len(output) <= self.key < len(output):
                return output[self.key]
        outputs = named_outputs(output)
        for name, leaf in outputs:
            if name == str(self.key):
                return leaf
        names = ", ".join(repr(name) for name, _ in outputs[:20]) or "none"
        raise _OutputNotFound(
            f"select_output: {type(self.model).__name__} returns no output named {self.key!r}; "
            f"its outputs are {names}"
        )

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


def select_output(model: nn.Module, key: str | int) -> SelectedOutput:
    """A module that runs ``model`` on its input and returns the one output named ``key``: what
    every export format takes from a network with a structured output it cannot save as it is.

    ``key`` names a tensor of the output as :func:`~scl_lightning.nn.outputs.named_outputs`
    does, by its path: a dict key (``"logits"``, for a Hugging Face ``ModelOutput`` too), a
    namedtuple or dataclass field, a tuple index, joined by dots when nested (``"aux.0"``); an
    ``int`` indexes a tuple or namedtuple output (``1``, ``-1``). The wrapper takes one input
    (what :func:`export_model` feeds it). ``model`` is shared, not copied, and is the wrapper's
    submodule ``model``: its state-dict keys gain the prefix ``model.`` (a ``dense`` export of
    the wrapper loads into ``select_output(plain_model, key)``; export the model itself as
    ``dense``, which takes any output).

    Raises:
        TypeError: ``model`` is not a module, or ``key`` neither a ``str`` nor an ``int``.
        ValueError: when called, if the output has no tensor named ``key`` (the error lists
            the names it has).

    Example::

        >>> class TwoHeads(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         h = self.body(x)
        ...         return {"logits": h, "aux": (h.sum(-1),)}
        >>> net = TwoHeads()
        >>> select_output(net, "logits")(torch.ones(2, 4)).shape
        torch.Size([2, 3])
        >>> select_output(net, "aux.0")(torch.ones(2, 4)).shape
        torch.Size([2])
    """
    return SelectedOutput(model, key)


_CONSTANTS = (int, float, bool)  # non-tensor outputs torch.export saves and loads back


def _suggestion(output: Any) -> str:
    """``select_output(model, 'name')`` with the name of the output's first tensor."""
    name = next((n for n, leaf in named_outputs(output) if isinstance(leaf, Tensor)), "logits")
    return f"scl_lightning.deploy.select_output(model, {name!r})"


def _a(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _check_leaves(output: Any, model: nn.Module, format: str) -> None:
    """Refuse, in one line, an output that holds something no traced format can store."""
    allowed = (Tensor,) if format == "onnx" else (Tensor, *_CONSTANTS)
    for name, leaf in named_outputs(output):
        if not isinstance(leaf, allowed):
            where = f" at {name!r}" if name else ""
            kind = "ONNX outputs are tensors" if format == "onnx" else "torch.export cannot save it"
            raise ValueError(
                f"export: {format}: {type(model).__name__}'s output holds "
                f"{_a(type(leaf).__name__)}{where}, and {kind}; export one output with "
                f"{_suggestion(output)}, or the whole network as 'dense'"
            )


def _unsavable(value: Any, path: str = "") -> tuple[str, Any] | None:
    """The first part of an output whose structure ``torch.export.save`` cannot record: a type
    pytree does not know (a dataclass never registered) or knows without a serialized name (a
    namedtuple), as ``(path, value)``."""
    if value is None or isinstance(value, (Tensor, *_CONSTANTS)):
        return None
    if pytree.tree_is_leaf(value):
        return path, value
    try:
        pytree.treespec_dumps(pytree.tree_structure(value, is_leaf=lambda x: x is not value))
    except Exception:  # NotImplementedError, TypeError: no serialized name for this type
        return path, value
    try:
        pairs = [
            (key_path_name(key_path), child)
            for key_path, child in pytree.tree_flatten_with_path(
                value, is_leaf=lambda x: x is not value
            )[0]
        ]
    except ValueError:  # registered without key paths (as transformers' older ModelOutput)
        children = pytree.tree_leaves(value, is_leaf=lambda x: x is not value)
        pairs = [(str(i), child) for i, child in enumerate(children)]
    for name, child in pairs:
        found = _unsavable(child, f"{path}.{name}" if path else name)
        if found is not None:
            return found
    return None


def _check_program_output(output: Any, model: nn.Module, format: str) -> None:
    """Refuse, in one line, an output structure ``torch.export`` cannot save and load back."""
    _check_leaves(output, model, format)
    found = _unsavable(output)
    if found is None:
        return
    path, value = found
    cls = type(value)
    what = f"holds {_a(cls.__name__)}" if path else f"is {_a(cls.__name__)}"
    where = f" at {path!r}" if path else ""
    if dataclasses.is_dataclass(value):
        why = (
            f" (a dataclass){where}, which torch.export saves only when registered: call "
            f"torch.export.register_dataclass({cls.__name__}, serialized_type_name="
            f"'{cls.__module__}.{cls.__qualname__}') where the model is exported and where it "
            "is loaded, or export"
        )
    else:
        kind = " (a namedtuple)" if isinstance(value, tuple) else ""
        why = f"{kind}{where}, whose structure torch.export cannot save; export"
    raise ValueError(
        f"export: {format}: {type(model).__name__}'s output {what}{why} one output with "
        f"{_suggestion(output)}, or use 'onnx' (outputs flattened and named) or 'dense'"
    )


class _FlatOutputs(nn.Module):
    """``model`` with its output flattened to a tuple of tensors (ONNX outputs are flat)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: Tensor) -> tuple[Tensor, ...]:
        return tuple(leaf for _, leaf in named_outputs(self.model(input)))


def _onnx_names(output: Any) -> list[str]:
    """The ONNX output names: each tensor's path (``logits``, ``aux.0``), ``output`` for a bare
    tensor, ``output.0`` for a tuple's first (the exporter refuses names that are numbers).
    Two paths that read alike (a key ``"a.b"`` beside ``{"a": {"b": ...}}``) are told apart
    by a suffix, ``a.b~2``: ONNX outputs need distinct names."""
    names: list[str] = []
    for name, _ in named_outputs(output):
        name = f"output.{name}" if name[:1].isdigit() else name or "output"
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}~{n}"
        names.append(unique)
    return names


def _export_onnx(model: nn.Module, example: Tensor, path: Path) -> tuple[float, list[str]]:
    """Write ``model`` to ``path`` in ONNX, outputs flattened and named, with a dynamic batch;
    check every output against onnxruntime on two batch sizes. Returns the largest difference
    and a note for what the ``torch.jit`` trace warned of (code that depends on the values or
    shapes of the example: the ONNX graph holds the path the example took)."""
    import onnxruntime as ort

    flat = _FlatOutputs(model).eval()
    other = torch.cat([example, example[:1]])  # another batch size: is the batch dynamic?
    with torch.inference_mode():
        output = model(example)
        want_other = flat(other)
    want = tuple(leaf for _, leaf in named_outputs(output))
    names = _onnx_names(output)
    batched = {
        name: {0: "batch"}
        for name, a, b in zip(names, want, want_other, strict=True)
        if a.dim() > 0 and a.shape[0] == len(example) and b.shape[0] == len(other)
    }
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                flat,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=names,
                dynamic_axes={"input": {0: "batch"}, **batched},
            )
        except Exception as err:  # an operator ONNX lacks, a trace that fails: one line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"export: onnx: torch.onnx.export failed on {type(model).__name__} "
                f"({type(err).__name__}: {reason:.300}); the ONNX file was not written; export "
                "it as 'dense', or as 'sparse' (saved with torch.export; uncompacted where "
                "torch.fx cannot trace it)"
            ) from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    largest = 0.0
    for batch, expected in ((example, want), (other, want_other)):
        got = session.run(None, {"input": batch.numpy()})
        for name, array, wanted in zip(names, got, expected, strict=True):
            value = torch.from_numpy(array)
            if value.shape != wanted.shape:
                raise ValueError(
                    f"export: onnxruntime's output {name!r} has shape {tuple(value.shape)} and "
                    f"torch's {tuple(wanted.shape)} (batch {len(batch)}); the ONNX file was "
                    "not written"
                )
            if not wanted.numel():
                continue
            diff = float((value.double() - wanted.double()).abs().max())
            scale = max(1.0, float(wanted.double().abs().max()))
            if diff > ONNX_TOLERANCE * scale:
                raise ValueError(
                    f"export: onnxruntime's output {name!r} differs from torch's by {diff:.3g}; "
                    "the ONNX file was not written"
                )
            largest = max(largest, diff)
    traced = list(dict.fromkeys(str(w.message) for w in caught if w.category is TracerWarning))
    notes = []
    if traced:
        first = traced[0].strip().splitlines()[0].split(". ")[0]
        more = f" (and {len(traced) - 1} more)" if len(traced) > 1 else ""
        notes.append(
            f"the torch.jit trace warned: {first}{more}; the ONNX graph follows the path the "
            "example input took: check it on inputs of your own"
        )
    return largest, notes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _save_program(model: nn.Module, example: Tensor, path: Path, format: str) -> None:
    """``torch.export`` the network with a dynamic batch and save it (``.pt2``); a network
    ``torch.export`` cannot take is one line."""
    batch = torch.export.Dim("batch", min=1)
    if len(example) == 1:
        # torch.export specializes a dimension of size 1 (and then refuses to make it dynamic):
        # trace on two copies of the sample; the program still accepts a batch of one
        example = torch.cat([example, example])
    # before failing on data-dependent code, torch logs and prints the partial graph: the one
    # line below says what was wrong; what it writes on success is passed on
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # data-dependent control flow, an operator without a tracing rule
        raise ValueError(
            f"export: {format}: torch.export failed on {type(model).__name__} "
            f"({type(err).__name__}: {_first_line(err):.300}); the file was not written; export "
            "it as 'dense' (the weights, for the never-masked architecture), or as 'onnx' "
            "(traced with torch.jit instead)"
        ) from None
    finally:
        shapes_log.setLevel(level)
    sys.stderr.write(printed.getvalue())
    torch.export.save(program, str(path))


def _compaction_failure(err: Exception, network: str) -> str:
    """Why :func:`compact` failed, in one line starting ``compact:``, without the formats its
    own message suggests (:func:`export_model` names those that work for the format asked)."""
    text = _first_line(err)
    if isinstance(err, ValueError) and text.startswith("compact: "):
        return re.split(r"; export (?:it )?as ", text, maxsplit=1)[0]
    return f"compact: failed on {network} ({type(err).__name__}: {text:.200})"


@torch.no_grad()
def _run(model: nn.Module, example: Tensor, name: str) -> Any:
    """``model(example)``, or one line saying that the network fails on the example input."""
    try:
        return model(example)
    except _OutputNotFound as err:
        raise ValueError(str(err)) from None
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"export: {name} fails on the example input of shape {tuple(example.shape)} "
            f"({type(err).__name__}: {reason:.200}); pass a batch it accepts"
        ) from None


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str,
    example_input: Tensor,
    *,
    overwrite: bool = False,
    batch_size: int = 256,
) -> ExportReport:
    """Write the pruned ``model`` to ``path`` in ``format`` (see the module docstring).

    Args:
        model: a masked network (:func:`~scl_lightning.sparsify`), not modified. Its output
            may be a tensor or a structure of them (see "Structured outputs" in the module
            docstring); :func:`select_output` picks one tensor of it.
        path: the output file; its suffix must be the format's (``.safetensors``, ``.pt2``,
            ``.onnx``).
        format: one of :data:`FORMATS`.
        example_input: one batch the network accepts (traces it, checks outputs, counts
            FLOPs).
        overwrite: replace ``path`` if it exists.
        batch_size: the batch the ``sparse`` format chooses each layer's storage for.

    A compiled ``model`` (``torch.compile``, whole or in part) is exported as the network it
    wraps: the same file as the uncompiled network's.

    Warns:
        UserWarning: once when fvcore cannot trace the network (in any format): the FLOPs are
            then reported as unknown (``None``) and the export goes on; once when ``sparse``
            or ``onnx`` cannot compact the network (``torch.fx`` cannot trace it, or the
            compacted network would compute something else): the pruned network is then
            exported uncompacted, and the report's first note, ``not compacted: ...``, says why.

    Raises:
        ValueError: an unknown format, a suffix that does not match it, a model without masks,
            a model that fails on ``example_input``, an output the format cannot store (named
            with what to do instead; see the module docstring), a network that cannot be
            compacted for ``compact`` (the error names the formats that export it
            uncompacted), a network ``torch.export`` (``compact``, ``sparse``) or
            ``torch.onnx.export`` cannot take, or an ONNX file that onnxruntime does not
            reproduce. Nothing is written then.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        IsADirectoryError: ``path`` is a directory.
        ImportError: ``onnx`` without onnxruntime installed.
    """
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    suffix = SUFFIXES[format]
    if path.suffix != suffix:
        raise ValueError(f"export: a {format} export is a {suffix} file, got {str(path)!r}")
    # before any work (the write itself checks again, atomically)
    if path.is_dir():
        raise IsADirectoryError(f"export: {path} is a directory; pass a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"export: {path} already exists; pass overwrite=True to replace it, or choose "
            "another path"
        )
    with uncompiled(model) as plain:
        return _export(plain, path, format, example_input, overwrite, batch_size)


def _export(
    model: nn.Module,
    path: Path,
    format: str,
    example_input: Tensor,
    overwrite: bool,
    batch_size: int,
) -> ExportReport:
    """:func:`export_model` on a network without compile wrappers, its arguments checked."""
    if not any(True for _ in masked_modules(model)):
        raise ValueError(
            f"export: {type(model).__name__} has no masked layer: nothing was pruned (train it "
            "with SCL, or pass the run's checkpoint)"
        )
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ImportError(
                "export --format onnx needs onnx and onnxruntime: "
                "pip install 'scl-lightning[deploy]'"
            ) from None
    example = example_input.detach().cpu()
    dense = export_pruned(model).cpu().eval()
    network = type(model).__name__
    output = _run(dense, example, network)
    if format != "dense":  # before compacting: no traced format stores these
        _check_leaves(output, model, format)
    params_before = stored_parameters(dense)
    bytes_before = sum(p.numel() * p.element_size() for p in dense.parameters())
    flops_before = _flops(dense, example)
    if format == "dense":
        save_pruned(model, path, overwrite=overwrite)
        return ExportReport(
            format,
            path,
            params_before,
            params_before,
            bytes_before,
            path.stat().st_size,
            flops_before,
            flops_before,
        )
    notes: list[str] = []
    compact_report: CompactReport | None
    try:
        small, compact_report = compact(model, example)
    except Exception as err:  # torch.fx cannot trace it, or compact cannot do it right
        reason = _compaction_failure(err, network)
        if format == "compact":
            raise ValueError(
                f"{reason}; export it as 'dense' (the weights, for the never-masked "
                "architecture), or as 'sparse' or 'onnx' (the network uncompacted)"
            ) from (None if isinstance(err, ValueError) else err)
        # the pruned network is exact by construction; torch.export and the torch.jit trace
        # behind ONNX need no torch.fx graph
        small, compact_report = dense, None
        why = reason.removeprefix("compact: ")
        notes.append(f"not compacted: {why}")
        warnings.warn(
            f"export: {format}: not compacted: {why}; the pruned network is exported uncompacted",
            UserWarning,
            stacklevel=3,
        )
    else:
        notes += [f"{name}: kept, {why}" for name, why in compact_report.kept.items()]
    if format != "onnx":  # what torch.export will see: compaction may rebuild the output
        _check_program_output(_run(small, example, network), model, format)
    # FLOPs after, only where they were counted before: one warning per export at most
    counted = flops_before is not None
    with atomic_file(path, overwrite, "export") as tmp:
        if format == "compact":
            _save_program(small, example, tmp, format)
            result: nn.Module = small
            flops_after = _flops(small, example) if counted else None
        elif format == "sparse":
            result, timing = sparsify_linears(copy.deepcopy(small), batch_size, example=example)
            flops_after = _flops(small, example, sparse=result) if counted else None
            notes += timing
            _save_program(result, example, tmp, format)
        else:
            diff, traced = _export_onnx(small, example, tmp)
            notes += traced
            notes.append(f"onnxruntime reproduces torch within {diff:.2g}")
            result = small
            flops_after = _flops(small, example) if counted else None
    return ExportReport(
        format,
        path,
        params_before,
        stored_parameters(result),
        bytes_before,
        path.stat().st_size,
        flops_before,
        flops_after,
        notes,
        compact_report,
    )


class ExportedModule(nn.Module):
    """A loaded ``.pt2`` program as a module in eval mode: ``program.module()``, the graph
    ``torch.export`` traced with the network in eval mode (dropout off, batch norm on its
    running statistics baked in), which can run no other way.

    ``training`` is ``False``; ``eval()`` and ``train(False)`` are accepted and change nothing;
    ``train()`` raises (the graph cannot train: train the masked network, then export again).
    The :class:`~torch.export.ExportedProgram` itself is ``program``."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program
        self.graph = program.module()
        self.train(False)

    def train(self, mode: bool = True) -> ExportedModule:
        if mode:
            raise NotImplementedError(
                "load_export: an exported .pt2 program runs in eval mode only; to train, load "
                "the run's checkpoint (scl_lightning.load_sparse) and export again"
            )
        # the graph module's own train()/eval() raise: set the flags, nothing else changes
        for module in self.modules():
            object.__setattr__(module, "training", False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph(*args, **kwargs)


class OnnxModule(nn.Module):
    """An onnxruntime session as a callable module (CPU): a tensor in; out, the one output
    tensor, or a dict of the named outputs (a network with a structured output)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def forward(self, input: Tensor) -> Tensor | dict[str, Tensor]:
        arrays = self.session.run(None, {"input": input.detach().cpu().numpy()})
        outputs = [torch.from_numpy(array) for array in arrays]
        if self.output_names == ["output"]:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))


def load_export(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load what :func:`export` wrote, as a module in eval mode.

    ``.pt2`` (compact, sparse) loads with ``torch.export.load`` (no pickle, no code runs) as an
    :class:`ExportedModule` (``training`` is ``False``, ``eval()`` works, ``train()`` raises),
    which returns the network's output structure (dicts as dicts) for any batch size;
    ``.onnx`` as an onnxruntime session, which returns the one output tensor, or a dict of the
    named outputs of a network with a structured output; ``.safetensors`` (dense) into
    ``model``, the never-masked architecture, which is required for that format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_export: {path} does not exist")
    if path.suffix == ".pt2":
        return ExportedModule(torch.export.load(str(path)))
    if path.suffix == ".onnx":
        return OnnxModule(path)
    if path.suffix == ".safetensors":
        from scl_lightning.deploy.export import load_pruned

        if model is None:
            raise ValueError(
                "load_export: a dense export holds weights only; pass model=, the network "
                "without masks"
            )
        tensors, _ = load_pruned(path)
        with uncompiled(model) as plain:  # a compiled network loads into the one it wraps
            plain.load_state_dict(tensors, strict=True)
        return model.eval()
    raise ValueError(
        f"load_export: {path.suffix!r} is not an export ({', '.join(SUFFIXES.values())})"
    )
