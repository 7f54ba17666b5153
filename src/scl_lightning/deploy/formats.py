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
                              needs scl_lightning imported
``onnx``     ``.onnx``        the compact network in ONNX (uncompacted, with a note,
                              where ``torch.fx`` cannot trace it), every output checked
                              against onnxruntime when written (needs the ``deploy``
                              extra)
===========  ===============  ==========================================================

Every export reports parameters, bytes on disk and FLOPs per sample before (the dense network)
and after; FLOPs are counted with fvcore, and a network it cannot trace is still exported, with
a warning and the FLOPs reported as unknown. Files are written to a temporary name next to the
output and moved into place, so a failed export leaves nothing behind and an existing file is
never replaced unless asked.

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
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from scl_lightning.deploy.export import atomic_file, save_pruned
from scl_lightning.nn.flops import flop_counts_or_none
from scl_lightning.nn.outputs import key_path_name, named_outputs
from scl_lightning.nn.sparsify import export_pruned, masked_modules

__all__ = [
    "DEFAULT_NAMES",
    "FORMATS",
    "SUFFIXES",
    "ExportReport",
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
            return f"{before / after:.1f}x smaller" if after else "-"

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
    ``nnz`` values instead of ``out x in``) and computed with ``torch.sparse.mm``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = linear.weight.detach().to_sparse_csr()
        col = csr.col_indices()
        if isinstance(linear, LinearOnSelectedInputs):
            # read the network's input directly: the selection moves into the column indices
            col = linear.inputs[col]
        # copies (a component view keeps the sparse tensor alive, which torch.export refuses),
        # int32 where the sizes allow: torch's CSR kernels run faster on them
        index = torch.int32 if max(col.numel(), csr.shape[1]) < 2**31 else torch.int64
        self.register_buffer("crow", csr.crow_indices().to(index, copy=True))
        self.register_buffer("col", col.to(index, copy=True))
        self.register_buffer("values", csr.values().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, input: Tensor) -> Tensor:
        flat = input.reshape(-1, input.shape[-1])
        out = csr_linear(flat, self.crow, self.col, self.values, self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        values = self.values
        assert isinstance(values, Tensor)
        return f"in={self.in_features}, out={self.out_features}, nnz={values.numel()}"


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
    outside the layer's forward (attention code computing ``F.linear(x, self.qkv.weight)``;
    a :class:`SparseLinear` has no dense ``weight``), or whose replacement changes the output,
    stays dense, with a note."""
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
        x = torch.randn(batch_size, width)
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
            why = _replacement_breaks(model, example, reference)
            if why is not None:
                setattr(parent, child, module)
                notes.append(f"{name}: kept dense, {why}")
    return model, notes


def _replacement_breaks(
    model: nn.Module, example: Tensor | None, reference: list[Any] | None
) -> str | None:
    """Why the network no longer computes ``reference`` on ``example``, or ``None``."""
    if example is None or reference is None:
        return None
    try:
        with torch.no_grad():
            out = pytree.tree_leaves(model(example))
    except AttributeError as err:
        return f"its weight is read outside its forward ({err})"
    except Exception as err:  # anything else the CSR layer cannot do where it stands
        return f"the network fails with it in CSR ({type(err).__name__}: {err})"
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
                "it as 'dense', or as 'compact' where torch.fx traces it"
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


def _save_program(model: nn.Module, example: Tensor, path: Path) -> None:
    """``torch.export`` the network with a dynamic batch and save it (``.pt2``)."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


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

    Warns:
        UserWarning: when fvcore cannot trace the network; the FLOPs are then reported as
            unknown (``None``) and the export goes on.

    Raises:
        ValueError: an unknown format, a suffix that does not match it, a model without masks,
            a model that fails on ``example_input``, an output the format cannot store (named
            with what to do instead; see the module docstring), a network ``torch.fx`` cannot
            trace for ``compact`` or ``sparse`` (``onnx`` then writes it uncompacted, with a
            note), or an ONNX file that onnxruntime does not reproduce. Nothing is written
            then.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ImportError: ``onnx`` without onnxruntime installed.
    """
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    suffix = SUFFIXES[format]
    if path.suffix != suffix:
        raise ValueError(f"export: a {format} export is a {suffix} file, got {str(path)!r}")
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
    except ValueError as err:  # torch.fx cannot trace the network
        reason = str(err).split("; export it as")[0]
        if format != "onnx":
            raise ValueError(
                f"{reason}; export it as 'dense' (the weights, for the never-masked "
                "architecture) or 'onnx' (the network uncompacted)"
            ) from None
        # ONNX is written from a torch.jit trace, which needs no torch.fx graph
        small, compact_report = dense, None
        notes.append(f"not compacted: {reason.removeprefix('compact: ')}")
    else:
        notes += [f"{name}: kept, {why}" for name, why in compact_report.kept.items()]
    if format != "onnx":  # what torch.export will see: compaction may rebuild the output
        _check_program_output(_run(small, example, network), model, format)
    # FLOPs after, only where they were counted before: one warning per export at most
    counted = flops_before is not None
    with atomic_file(path, overwrite, "export") as tmp:
        if format == "compact":
            _save_program(small, example, tmp)
            result: nn.Module = small
            flops_after = _flops(small, example) if counted else None
        elif format == "sparse":
            result, timing = sparsify_linears(copy.deepcopy(small), batch_size, example=example)
            flops_after = _flops(small, example, sparse=result) if counted else None
            notes += timing
            _save_program(result, example, tmp)
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

    ``.pt2`` (compact, sparse) loads with ``torch.export.load`` (no pickle, no code runs) and
    returns the network's output structure (dicts as dicts); ``.onnx`` as an onnxruntime
    session, which returns the one output tensor, or a dict of the named outputs of a network
    with a structured output; ``.safetensors`` (dense) into ``model``, the never-masked
    architecture, which is required for that format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_export: {path} does not exist")
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
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
        model.load_state_dict(tensors, strict=True)
        return model.eval()
    raise ValueError(
        f"load_export: {path.suffix!r} is not an export ({', '.join(SUFFIXES.values())})"
    )
