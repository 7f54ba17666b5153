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
``onnx``     ``.onnx``        the compact network in ONNX, checked against onnxruntime
                              when written (needs the ``deploy`` extra)
===========  ===============  ==========================================================

Every export reports parameters, bytes on disk and FLOPs per sample before (the dense network)
and after. Files are written to a temporary name next to the output and moved into place, so a
failed export leaves nothing behind and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import copy
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
from torch import Tensor, nn

from scl_lightning.deploy.compact import (
    CompactReport,
    LinearOnSelectedInputs,
    compact,
    stored_parameters,
)
from scl_lightning.deploy.export import atomic_file, save_pruned
from scl_lightning.nn.flops import flop_counts
from scl_lightning.nn.sparsify import export_pruned, masked_modules

__all__ = [
    "DEFAULT_NAMES",
    "FORMATS",
    "SUFFIXES",
    "ExportReport",
    "SparseLinear",
    "csr_linear",
    "export_model",
    "load_export",
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
    """What an export wrote and what it saves against the dense network (per sample)."""

    format: str
    path: Path
    params_before: int
    params_after: int
    bytes_before: int  # the dense network's parameters in their dtype
    bytes_after: int  # the file written
    flops_before: int  # fvcore, one sample, multiply-adds
    flops_after: int
    notes: list[str] = field(default_factory=list)
    compact: CompactReport | None = None

    def summary(self) -> str:
        def ratio(before: int, after: int) -> str:
            return f"{before / after:.1f}x smaller" if after else "-"

        lines = [
            f"{self.format} -> {self.path}",
            f"  parameters {self.params_before:,} -> {self.params_after:,} "
            f"({ratio(self.params_before, self.params_after)})",
            f"  bytes      {self.bytes_before:,} -> {self.bytes_after:,} "
            f"({ratio(self.bytes_before, self.bytes_after)})",
            f"  FLOPs      {self.flops_before:,} -> {self.flops_after:,} per sample "
            f"({ratio(self.flops_before, self.flops_after)})",
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
    model: nn.Module, batch_size: int = 256, repeats: int = 20
) -> tuple[nn.Module, list[str]]:
    """Replace each ``Linear`` of ``model`` (in place) by a :class:`SparseLinear` where CSR was
    measured faster than dense for a batch of ``batch_size`` on this machine."""
    notes = []
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
    return model, notes


def _flops(model: nn.Module, example: Tensor, sparse: nn.Module | None = None) -> int:
    """fvcore FLOPs (multiply-adds) of one sample of ``model``; with ``sparse`` (``model``
    with some ``Linear`` layers made :class:`SparseLinear`), those layers count their stored
    values instead (on a vector input: one multiply-add each)."""
    total = flop_counts(model, example[:1]).total
    for module in sparse.modules() if sparse is not None else []:
        if isinstance(module, SparseLinear):
            values = module.values
            assert isinstance(values, Tensor)
            total -= module.in_features * module.out_features - values.numel()
    return total


def _export_onnx(model: nn.Module, example: Tensor, path: Path) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "export --format onnx needs onnx and onnxruntime: pip install 'scl-lightning[deploy]'"
        ) from None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    with torch.inference_mode():
        want = model(example)
    diff = float((torch.from_numpy(got) - want).abs().max())
    if diff > ONNX_TOLERANCE * max(1.0, float(want.abs().max())):
        raise ValueError(
            f"export: onnxruntime's outputs differ from torch's by {diff:.3g}; the ONNX file "
            "was not written"
        )
    return diff


def _save_program(model: nn.Module, example: Tensor, path: Path) -> None:
    """``torch.export`` the network with a dynamic batch and save it (``.pt2``)."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


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
        model: a masked network (:func:`~scl_lightning.sparsify`), not modified.
        path: the output file; its suffix must be the format's (``.safetensors``, ``.pt2``,
            ``.onnx``).
        format: one of :data:`FORMATS`.
        example_input: one batch the network accepts (traces it, checks outputs).
        overwrite: replace ``path`` if it exists.
        batch_size: the batch the ``sparse`` format chooses each layer's storage for.

    Raises:
        ValueError: an unknown format, a suffix that does not match it, a model without masks,
            or an ONNX file that onnxruntime does not reproduce.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
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
    example = example_input.detach().cpu()
    dense = export_pruned(model).cpu().eval()
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
    small, compact_report = compact(model, example)
    notes = [f"{name}: kept, {why}" for name, why in compact_report.kept.items()]
    with atomic_file(path, overwrite, "export") as tmp:
        if format == "compact":
            _save_program(small, example, tmp)
            result: nn.Module = small
            flops_after = _flops(small, example)
        elif format == "sparse":
            result, timing = sparsify_linears(copy.deepcopy(small), batch_size)
            flops_after = _flops(small, example, sparse=result)
            notes += timing
            _save_program(result, example, tmp)
        else:
            diff = _export_onnx(small, example, tmp)
            notes.append(f"onnxruntime reproduces torch within {diff:.2g}")
            result = small
            flops_after = _flops(small, example)
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
    """An onnxruntime session as a callable module (CPU): tensors in, tensors out."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, input: Tensor) -> Tensor:
        (out,) = self.session.run(None, {"input": input.detach().cpu().numpy()})
        return torch.from_numpy(out)


def load_export(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load what :func:`export` wrote, as a module in eval mode.

    ``.pt2`` (compact, sparse) loads with ``torch.export.load`` (no pickle, no code runs);
    ``.onnx`` as an onnxruntime session; ``.safetensors`` (dense) into ``model``, the
    never-masked architecture, which is required for that format.
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
