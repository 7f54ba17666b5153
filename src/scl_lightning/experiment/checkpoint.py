"""Checkpoint files that survive a kill while they are written and cannot run code when loaded.

:class:`SafeCheckpointIO` is a Lightning ``CheckpointIO`` plugin (``scl fit`` installs it by
itself; elsewhere pass ``Trainer(plugins=[SafeCheckpointIO()])``):

- **Atomic saves.** The checkpoint is written to a temporary file in the same directory,
  flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic on POSIX). A
  process killed while saving leaves the previous file (``last.ckpt``, say) whole: readers see
  the old checkpoint or the new one, never a truncated one. Lightning's own writer serializes
  to memory and moves a file from the system temp directory, which is a copy, not a rename, when
  that directory is on another file system.
- **Safe loads.** Every checkpoint is read with ``torch.load(weights_only=True)``: tensors and
  plain Python data only, so a crafted checkpoint cannot execute code. A file that is not a
  readable checkpoint gives one clear :class:`CheckpointError` line.

:func:`load_checkpoint` reads a checkpoint the same way outside a Trainer.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from scl_lightning._compat import CheckpointError, check_compatible
from scl_lightning._utils import fsync_directory

__all__ = [
    "CheckpointError",
    "SafeCheckpointIO",
    "atomic_torch_save",
    "check_compatible",
    "load_checkpoint",
]

_TMP_SUFFIX = ".tmp"
#: torch's weights-only refusals of a global, a class or a blocked module: an unsafe checkpoint
_UNSAFE_PICKLE = re.compile(r"GLOBAL \S+|allowlisted|is blocked")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def _first_line(err: BaseException) -> str:
    """The first sentence of an exception's message (PyTorch's run on for several)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that never leaves ``path`` half-written.

    The object is written to ``.<name>.<random>.tmp`` next to ``path``, fsync'ed, then renamed
    over ``path``. Temporary files left by an earlier process killed while saving to the same
    ``path`` are removed first.

    Example::

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> atomic_torch_save({"step": 1}, target)
        >>> atomic_torch_save({"step": 2}, target)
        >>> load_checkpoint(target)["step"], sorted(p.name for p in target.parent.iterdir())
        (2, ['last.ckpt'])
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    # temporary files of writers killed mid-save: of this file, and of any checkpoint here (a
    # one-off top-k name is never saved again)
    stale = {*directory.glob(f"{prefix}*{_TMP_SUFFIX}"), *directory.glob(f".*.ckpt.*{_TMP_SUFFIX}")}
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=directory)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file for its owner only; give it the mode a plain open() would
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, not a PyTorch checkpoint, or holds objects other
            than tensors and plain data (one line saying which).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"checkpoint {path} is a directory, not a checkpoint file: pass a .ckpt file (a "
            f"run keeps them in {path / 'checkpoints'}), or --ckpt_path last to resume the "
            "latest run"
        )
    if path.is_file() and _is_safetensors(path):
        raise CheckpointError(
            f"{path} is a pruned-weights export (safetensors), not a training checkpoint: it "
            "holds no masks, optimizer or trainer state to resume or evaluate from; read it with "
            "scl_lightning.load_pruned, or pass the run's .ckpt"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path (--ckpt_path) or use "
            "--ckpt_path last to resume the latest run"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if _UNSAFE_PICKLE.search(text):
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain data, which could "
                "run code when loaded; scl-lightning loads checkpoints with weights_only=True. "
                "Re-save it as a plain state dict if you trust its source"
            ) from None
        # garbage bytes also fail in the weights-only unpickler ("Unsupported operand 110"):
        # that is a damaged file, not an unsafe one
        found = _UNPICKLER_REASON.search(text)
        message = found.group(1).strip().rstrip(".") if found else _first_line(err)
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({message}); it may be "
            "truncated: resume from an earlier checkpoint"
        ) from None
    except MemoryError:
        raise
    except Exception as err:  # a damaged file makes torch.load raise almost anything
        detail = _first_line(err)
        if detail != type(err).__name__:
            detail = f"{type(err).__name__}: {detail}"
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({detail}); it "
            "may be truncated: resume from an earlier checkpoint"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict"
        )
    return checkpoint


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 27


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with atomic saves and ``weights_only=True`` loads.

    Local paths are written with :func:`atomic_torch_save`; remote URLs (``s3://``...) are left
    to Lightning's writer. Loads always use ``weights_only=True``, also when a caller asks for
    ``weights_only=False``.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(plugins=[SafeCheckpointIO()], logger=False)
        >>> type(trainer.strategy.checkpoint_io).__name__
        'SafeCheckpointIO'
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)
