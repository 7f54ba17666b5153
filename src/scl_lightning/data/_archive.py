"""Download, checksum, safe extraction and safe unpickling of dataset archives (standard library
and numpy only).

Policies shared by every dataset that uses these helpers:

- **Downloads** stream into a temporary ``*.part`` file next to the destination, are checked
  against their MD5, and only then renamed into place, so an interrupted download never leaves a
  file that looks complete. A failed connection raises one :class:`DownloadError` that names the
  URL and the exact path to put the file at, for machines without network access.
- **A checksum mismatch** raises :class:`ArchiveError`. The offending file is never deleted: it is
  renamed to ``<name>.<actual md5>.bad`` next to where it was, so the next run can download a
  fresh copy and the bad one stays available for inspection.
- **Extraction** refuses, before writing anything, an archive with a member that could land
  outside the target directory: an absolute path, a ``..`` component, a symbolic or hard link
  whose target is absolute, contains ``..`` or leaves the directory, or a device or FIFO. It then
  extracts with ``tarfile``'s ``"data"`` filter where available (Python 3.12, and 3.8.17+ / 3.11.4+
  backports) into a temporary directory inside the target and moves the top-level entries into
  place, so a failure midway leaves no partial tree behind. Existing entries are never overwritten.
- **Unpickling** (:func:`restricted_pickle_load`) resolves only the globals a pickled numpy array
  needs, so a malicious pickle cannot run code.

All errors are :class:`ValueError` or :class:`FileNotFoundError` subclasses with one-line
messages, which the ``scl`` command prints as a single line.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ArchiveError",
    "DownloadError",
    "check_md5",
    "download_file",
    "md5sum",
    "restricted_pickle_load",
    "safe_extract",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# tarfile's extraction-filter refusals (Python 3.12, and 3.8.17+ / 3.11.4+ backports).
_FILTER_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(tarfile, "FilterError", None),) if e is not None
)


class ArchiveError(ValueError):
    """A dataset file that is corrupt, truncated, fails its checksum, or is unsafe to open."""


class DownloadError(FileNotFoundError):
    """A file that is not on disk and could not be downloaded (no network, HTTP error)."""


def md5sum(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: str | os.PathLike[str], expected: str, *, hint: str = "") -> None:
    """Raise :class:`ArchiveError` unless ``path`` has MD5 ``expected``.

    On a mismatch the file is renamed to ``<name>.<actual md5>.bad`` (never deleted) and the
    message names the file, both checksums, where the file went, and ``hint`` (what to do next).
    """
    path = Path(path)
    actual = md5sum(path)
    if actual == expected.lower():
        return
    moved = path.with_name(f"{path.name}.{actual}.bad")
    os.replace(path, moved)
    raise ArchiveError(
        f"{path} has MD5 {actual} but {expected} was expected: the file is corrupt, truncated or "
        f"not the official one; it was moved aside to {moved.name}" + (f"; {hint}" if hint else "")
    )


def download_file(
    url: str, path: str | os.PathLike[str], md5: str, *, timeout: float = 60.0
) -> None:
    """Download ``url`` to ``path`` and check its MD5; ``path`` appears only when complete.

    Raises:
        DownloadError: If the file cannot be fetched (no network, HTTP error, dropped
            connection); the message says where to put a copy fetched by other means.
        ArchiveError: If the downloaded bytes do not have MD5 ``md5`` (kept as ``*.bad``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, path)
    fd, part_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    part = Path(part_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                # Looked up on the module at call time, so tests can stand in for the network.
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out, _CHUNK)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(
                f"could not download {url} ({reason}); without network access, download it on "
                f"another machine and put it at {path.resolve()} (MD5 {md5}), then run again"
            ) from err
        actual = md5sum(part)
        if actual != md5.lower():
            moved = path.with_name(f"{path.name}.{actual}.bad")
            os.replace(part, moved)
            raise ArchiveError(
                f"the file downloaded from {url} has MD5 {actual} but {md5} was expected (kept as "
                f"{moved}); the server sent something other than the official file: try again "
                f"later, or put a copy fetched by other means at {path.resolve()}"
            )
        part.chmod(0o644)  # mkstemp makes it private to the owner; a dataset is not
        os.replace(part, path)
    finally:
        # Only our own temporary file: gone once renamed, removed on any failure or interrupt.
        part.unlink(missing_ok=True)


def _is_within(base: str, target: str) -> bool:
    return target == base or target.startswith(base.rstrip(os.sep) + os.sep)


def _has_parent_ref(name: str) -> bool:
    return ".." in name.replace("\\", "/").split("/")


def _check_member(member: tarfile.TarInfo, root: str, archive: Path) -> None:
    """Raise :class:`ArchiveError` if extracting ``member`` under ``root`` could escape it."""
    name = member.name

    def refuse(why: str) -> ArchiveError:
        return ArchiveError(
            f"refusing to extract {archive}: member {name!r} {why}; the archive is corrupt or "
            f"malicious, so nothing was extracted: delete it and download the official file again"
        )

    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise refuse("has an absolute path")
    if _has_parent_ref(name):
        raise refuse("has a '..' component")
    dest = os.path.normpath(os.path.join(root, name))
    if not _is_within(root, dest):
        raise refuse("would be written outside the target directory")
    if member.issym() or member.islnk():
        link = member.linkname
        kind = "symbolic" if member.issym() else "hard"
        if link.startswith(("/", "\\")) or os.path.isabs(link):
            raise refuse(f"is a {kind} link to the absolute path {link!r}")
        if _has_parent_ref(link):
            # Lexical checks cannot follow '..' through other links in the archive: refuse it.
            raise refuse(f"is a {kind} link to {link!r}, with a '..' component")
        # Symlink targets are relative to the link's folder, hard-link targets to the archive root.
        base = os.path.dirname(dest) if member.issym() else root
        if not _is_within(root, os.path.normpath(os.path.join(base, link))):
            raise refuse(f"is a {kind} link to {link!r}, outside the target directory")
    elif not (member.isfile() or member.isdir()):
        raise refuse("is a device, FIFO or other special file")


def safe_extract(archive: str | os.PathLike[str], target: str | os.PathLike[str]) -> list[str]:
    """Extract the tar archive ``archive`` (any compression) into ``target`` safely.

    Every member is checked before anything is written (see the module docstring); the archive
    is then extracted into a temporary directory inside ``target`` and its top-level entries are
    moved into place. An entry that already exists in ``target`` is kept as it is.

    Returns:
        The names of the top-level entries of the archive.

    Raises:
        ArchiveError: If the archive is truncated, corrupt, not a tar file, or has a member that
            could escape ``target``.
    """
    archive = Path(archive)
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(target)
    corrupt = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            files: set[str] = set()
            for member in members:
                _check_member(member, root, archive)
                if member.islnk() and os.path.normpath(member.linkname) not in files:
                    raise ArchiveError(
                        f"refusing to extract {archive}: member {member.name!r} is a hard link "
                        f"to {member.linkname!r}, which is not an earlier file of the archive; "
                        f"the archive is corrupt or malicious: delete it and download it again"
                    )
                if member.isfile():
                    files.add(os.path.normpath(member.name))
            tmp = tempfile.mkdtemp(prefix=".extract-", dir=root)
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without the extraction filters
                    tar.extractall(tmp, members=members)
                tops = sorted(os.listdir(tmp))
                for top in tops:
                    dest = os.path.join(root, top)
                    try:
                        if os.path.lexists(dest):
                            raise FileExistsError(dest)
                        os.rename(os.path.join(tmp, top), dest)
                    except OSError:
                        if not os.path.lexists(dest):
                            raise
                        # Already there (or another process extracting the same archive just
                        # put it there): never overwrite it.
                        log.info("%s already exists; keeping it", dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except _FILTER_ERRORS as err:  # pragma: no cover - our own checks refuse these first
        raise ArchiveError(
            f"refusing to extract {archive}: {err}; the archive is corrupt or malicious: delete "
            f"it and download the official file again"
        ) from err
    except corrupt as err:
        raise ArchiveError(
            f"cannot read {archive}: it is truncated or corrupt ({type(err).__name__}: {err}); "
            f"delete it and download it again"
        ) from err
    except (OSError, KeyError) as err:
        # e.g. a name too long for the file system, or links that clash with each other
        raise ArchiveError(
            f"cannot extract {archive} into {target} ({type(err).__name__}: {err}); if the "
            f"archive is the official one, check the disk and permissions, else delete it and "
            f"download it again"
        ) from err
    return tops


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` restricted to the codecs pickle uses for bytes (no arbitrary codecs)."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "utf-8"):
        raise pickle.UnpicklingError(
            f"global _codecs.encode with codec {encoding!r} is not allowed"
        )
    return codecs.encode(text, encoding)


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` limited to plain numbers: no object, void, string or structured dtypes,
    whose raw bytes numpy would read as pointers or fields."""
    try:
        dtype = np.dtype(*args)
    except (TypeError, ValueError) as err:
        raise pickle.UnpicklingError(f"bad numpy dtype {args!r}: {err}") from None
    if dtype.kind not in "biuf" or dtype.hasobject or dtype.fields or dtype.subdtype:
        raise pickle.UnpicklingError(f"numpy dtype {dtype!r} is not allowed")
    return dtype


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The callables a pickled numpy array refers to, under every module path numpy has used."""
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce_ex__(2)[0]  # numpy.(_)core.multiarray._reconstruct
    frombuffer = probe.__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") in pickle protocols 0-2.
        ("_codecs", "encode"): _latin1_encode,
        # and b"" as bytes() in those protocols
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays.

    Containers, strings, bytes and numbers need no globals at all; anything else (``os.system``,
    ``builtins.eval``, arbitrary classes) raises :class:`pickle.UnpicklingError` before it can be
    called. Numpy dtypes are limited to plain numbers, and a dtype's state may only be the one
    numpy itself writes for it: a crafted state (flags saying "holds objects", a changed item
    size) would make numpy read raw bytes as pointers. This is the pure-Python unpickler, whose
    BUILD opcode can be checked; the CIFAR files are a few large byte strings, so it is fast.
    """

    _allowed = _numpy_globals()
    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]  # type: ignore[attr-defined]
        if isinstance(inst, np.dtype) and state != inst.__reduce__()[2]:
            raise pickle.UnpicklingError(
                f"numpy dtype {inst!r} with a crafted state is not allowed"
            )
        super().load_build()  # type: ignore[misc]

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def restricted_pickle_load(
    path: str | os.PathLike[str], *, validate: Callable[[Any], None] | None = None
) -> Any:
    """Load a pickle of plain containers and numpy arrays, refusing anything that could run code.

    Python 2 pickles (such as the official CIFAR files) load with ``encoding="latin1"``, the
    encoding numpy documents for them; dictionary keys keep the type they were written with.

    Args:
        path: The pickle file.
        validate: Optional check of the loaded object; a ``ValueError`` it raises becomes part of
            the one-line error.

    Raises:
        ArchiveError: If the file references a forbidden global, is truncated or corrupt, or fails
            ``validate``.
        FileNotFoundError: If ``path`` does not exist.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as err:
            if "is not allowed" in str(err):
                raise ArchiveError(
                    f"refusing to unpickle {path}: {err}, and a genuine data file needs only "
                    f"numpy arrays and plain containers; the file is corrupt or malicious: delete "
                    f"it and extract it again from the official archive"
                ) from err
            raise _corrupt(path, err) from err
        except Exception as err:  # truncated or garbled files raise many types
            raise _corrupt(path, err) from err
    if validate is not None:
        try:
            validate(obj)
        except ValueError as err:
            raise ArchiveError(
                f"{path} is not in the expected format: {err}; delete it and extract it again "
                f"from the official archive"
            ) from err
    return obj


def _corrupt(path: Path, err: BaseException) -> ArchiveError:
    return ArchiveError(
        f"cannot unpickle {path}: it is truncated or corrupt ({type(err).__name__}: {err}); "
        f"delete it and extract it again from the official archive"
    )
