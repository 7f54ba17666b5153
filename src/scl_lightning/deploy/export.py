"""Pruned-model files: save_pruned and load_pruned, in safetensors (nothing runs on load).

A pruned export is the state dict of :func:`~scl_lightning.nn.sparsify.export_pruned` (plain
tensors with ``w * H(m)`` baked in, no masks) written with `safetensors
<https://huggingface.co/docs/safetensors>`_: a JSON header and raw tensor bytes, so loading it
never unpickles anything and cannot run code, unlike a ``torch.save`` file. The header carries
string metadata: the format tag, the scl_lightning version, the network's class, its global
sparsity and connection counts, and whatever the caller adds.

Files are written atomically (a temporary file in the same directory, flushed to disk, then
moved into place), so a crash or a full disk leaves either the previous file or none, never a
truncated one, and an existing file is replaced only when asked to.

A network compiled with ``torch.compile`` (an ``OptimizedModule``, whole or as a submodule) is
saved as the network it wraps: the file is the same as the uncompiled network's
(:func:`uncompiled`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from scl_lightning._utils import fsync_directory
from scl_lightning.nn.sparsify import export_pruned
from scl_lightning.nn.stats import connectivity

__all__ = ["PRUNED_FORMAT", "PRUNED_METADATA_KEYS", "load_pruned", "save_pruned", "uncompiled"]

#: Value of the ``format`` metadata entry of every file :func:`save_pruned` writes.
PRUNED_FORMAT = "scl_lightning.pruned/1"
#: Metadata entries :func:`save_pruned` writes itself; the caller's metadata may not use them.
PRUNED_METADATA_KEYS = (
    "format",
    "scl_lightning_version",
    "network",
    "global_sparsity",
    "active_connections",
    "total_connections",
)
SUFFIX = ".safetensors"


def _compiled_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (``OptimizedModule``) around another."""
    # no compiled module exists before torch._dynamo is imported: never import it here
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    return wrapper is not None and isinstance(module, wrapper)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrappers (``module`` if it has none)."""
    while _compiled_wrapper(module):
        inner = module._orig_mod
        assert isinstance(inner, nn.Module)
        module = inner
    return module


@contextlib.contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` without ``torch.compile``'s wrappers, for as long as the block runs.

    Yields the module a compiled ``model`` wraps (``model._orig_mod``; ``model`` itself when
    it is not compiled). A compiled submodule (``net.body = torch.compile(net.body)``) is
    replaced in its parent by the module it wraps until the block ends, then put back: inside,
    names and state-dict keys are those of the plain network (no ``_orig_mod.``), so what is
    exported from a compiled network is what the plain one gives.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> compiled = torch.compile(net, backend="eager")
        >>> with uncompiled(compiled) as plain:
        ...     plain is net, list(plain.state_dict())
        (True, ['0.weight', '0.bias'])
    """
    model = _unwrapped(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    seen: set[int] = set()
    stack = [model]
    try:
        while stack:
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, child in list(module._modules.items()):
                if child is None:
                    continue
                inner = _unwrapped(child)
                if inner is not child:
                    swapped.append((module, name, child))
                    module._modules[name] = inner
                stack.append(inner)
        yield model
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child


def _metadata_strings(metadata: Mapping[str, str | int | float | bool]) -> dict[str, str]:
    # safetensors headers hold str -> str only: convert plain scalars, refuse everything else
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"save_pruned: metadata keys must be non-empty strings, got {key!r}")
        if key in PRUNED_METADATA_KEYS:
            raise ValueError(
                f"save_pruned: metadata key {key!r} is written by save_pruned itself "
                f"(reserved: {', '.join(PRUNED_METADATA_KEYS)}); rename it"
            )
        if not isinstance(value, str | int | float):
            raise TypeError(
                f"save_pruned: metadata[{key!r}] is a {type(value).__name__}; safetensors "
                "metadata holds strings, so pass a str, int, float or bool (e.g. json.dumps it)"
            )
        out[key] = str(value)
    return out


def _pruned_tensors(model: nn.Module) -> dict[str, Tensor]:
    # safetensors refuses tensors that share memory (tied weights, views) or are not
    # contiguous: give every entry its own contiguous CPU copy
    tensors: dict[str, Tensor] = {}
    for name, value in export_pruned(model).state_dict().items():
        if not isinstance(value, Tensor) or value.layout != torch.strided:
            raise TypeError(
                f"save_pruned: state dict entry {name!r} is not a dense tensor "
                f"({type(value).__name__}); safetensors stores dense tensors only"
            )
        tensors[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return tensors


def _check_path(path: str | os.PathLike[str], fn: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _exists_message(path: Path, who: str = "save_pruned") -> str:
    return (
        f"{who}: {path} already exists; pass overwrite=True to replace it, or choose another path"
    )


def _publish(tmp: Path, path: Path, overwrite: bool, who: str) -> None:
    """Move the finished ``tmp`` to ``path`` in one step: readers see the old file or the new."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # a hard link never replaces an existing file, even one created since the first check
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(_exists_message(path, who)) from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise FileExistsError(_exists_message(path, who)) from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool, who: str) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path next to it for the body to write,
    then flush that file to disk and move it to ``path`` in one step.

    A failure anywhere leaves the previous ``path`` (or none) and no temporary file; an existing
    ``path`` is replaced only with ``overwrite``. The temporary name is hidden, in the same
    directory (the final rename stays on one file system), keeps ``path``'s suffix (writers
    such as ``torch.export.save`` check it), and is created exclusively with the permissions a
    plain ``open()`` would give. ``who`` prefixes the errors.
    """
    if path.is_dir():
        raise IsADirectoryError(f"{who}: {path} is a directory; pass a file path")
    if path.exists() and not overwrite:
        raise FileExistsError(_exists_message(path, who))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777  # 0o666 less the umask
        yield tmp
        os.chmod(tmp, mode)  # writers may rename their own 0o600 temporary file onto ``tmp``
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite, who)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, str | int | float | bool] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the pruned weights of a masked ``model`` to a ``.safetensors`` file, atomically.

    The file holds the state dict of :func:`~scl_lightning.nn.sparsify.export_pruned`
    (``w * H(m)`` baked in, no masks: it loads with ``strict=True`` into the never-masked
    architecture), every tensor as its own contiguous CPU copy, and string metadata:
    ``format`` (:data:`PRUNED_FORMAT`), ``scl_lightning_version``, ``network`` (the model's
    class), ``global_sparsity``, ``active_connections``, ``total_connections`` and the entries
    of ``metadata`` (numbers and booleans written with ``str``). The bytes go to a temporary
    file next to ``path``, are flushed to disk and then moved to ``path`` in one step, so a
    failure leaves the previous file (or none) and no temporary file behind. Read it back with
    :func:`load_pruned`, or with any safetensors reader.

    Args:
        model: a network with masked layers (:func:`~scl_lightning.nn.sparsify.sparsify`); it is
            not modified. A compiled one (``torch.compile``) is saved as the network it wraps:
            the same file as the uncompiled network's.
        path: the file to write; it must end in ``.safetensors``. Missing parent directories
            are created.
        metadata: extra header entries, ``{str: str | int | float | bool}``, e.g. the epoch.
        overwrite: replace ``path`` if it exists.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
        IsADirectoryError: if ``path`` is a directory.
        TypeError: for a ``path`` or ``metadata`` of the wrong type, or a state dict entry that
            is not a dense tensor.
        ValueError: if ``path`` does not end in ``.safetensors``, ``metadata`` uses a key
            listed in :data:`PRUNED_METADATA_KEYS`, or ``model`` has no masked layer.

    Example::

        >>> import os, tempfile
        >>> from scl_lightning.nn.sparsify import sparsify
        >>> net = sparsify(nn.Sequential(nn.Linear(4, 2)))
        >>> with torch.no_grad():
        ...     net[0].mask[0, 0] = -1.0
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_pruned(net, os.path.join(tmp, "net.safetensors"), {"epoch": 3})
        ...     tensors, meta = load_pruned(path)
        >>> sorted(tensors), bool(tensors["0.weight"][0, 0] == 0)
        (['0.bias', '0.weight'], True)
        >>> meta["global_sparsity"], meta["active_connections"], meta["epoch"]
        ('0.125', '7', '3')
    """
    path = _check_path(path, "save_pruned")
    if path.suffix != SUFFIX:
        raise ValueError(f"save_pruned: path must end in {SUFFIX}, got {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(
            f"save_pruned: {path} is a directory; pass a file path ending in {SUFFIX}"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(_exists_message(path))
    extra = _metadata_strings(metadata or {})

    from scl_lightning import __version__  # here: scl_lightning/__init__ imports this module

    with uncompiled(model) as plain:  # a compiled network is saved as the one it wraps
        tensors = _pruned_tensors(plain)  # raises for a model without masked layers
        conn = connectivity(plain)
        network = type(plain).__qualname__
    header = {
        "format": PRUNED_FORMAT,
        "scl_lightning_version": __version__,
        "network": network,
        "global_sparsity": str(conn.sparsity),
        "active_connections": str(conn.active),
        "total_connections": str(conn.total),
        **extra,
    }

    with atomic_file(path, overwrite, "save_pruned") as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file that failed to load suggest it is, for the error."""
    if head[8:9] == b"{":  # a safetensors header: its length, then JSON
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "; it looks like a torch.save zip archive, which was not unpickled"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "; it looks like a pickle, which was not unpickled"
    return ""


def load_pruned(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file written by :func:`save_pruned`: its tensors and metadata.

    Only the safetensors format is read, never a pickle, so a file from anywhere cannot run code
    here. Any safetensors file loads (its metadata may then be empty); the tensors are on the
    CPU and load with ``strict=True`` into the never-masked architecture that was exported.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: ``{name: tensor}`` and the header's ``{str: str}`` metadata,
        sorted by key (numbers as strings: ``float(meta["global_sparsity"])``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IsADirectoryError: if ``path`` is a directory.
        ValueError: if the file is not a valid safetensors file (truncated, corrupt, or another
            format such as a ``torch.save`` pickle).

    Example::

        >>> import os, tempfile
        >>> from scl_lightning.nn.sparsify import sparsify
        >>> net = sparsify(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1)))
        >>> plain = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     tensors, meta = load_pruned(save_pruned(net, os.path.join(tmp, "a.safetensors")))
        >>> plain.load_state_dict(tensors, strict=True)
        <All keys matched successfully>
        >>> meta["format"], meta["network"], meta["total_connections"]
        ('scl_lightning.pruned/1', 'Sequential', '10')
    """
    path = _check_path(path, "load_pruned")
    if not path.exists():
        raise FileNotFoundError(f"load_pruned: {path} does not exist; check the path")
    if path.is_dir():
        raise IsADirectoryError(
            f"load_pruned: {path} is a directory; pass the {SUFFIX} file inside it"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(sorted((f.metadata() or {}).items()))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except OSError:
        raise  # permissions, I/O errors: the system's own message says it best
    except Exception as err:  # SafetensorError for a bad header; be safe with the rest
        with open(path, "rb") as f:
            kind = _looks_like(f.read(9))
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"load_pruned: {path} is not a safetensors file (truncated or another format"
            f"{kind}): {reason:.200}; export the model again with scl_lightning.save_pruned"
        ) from None
    return tensors, metadata
