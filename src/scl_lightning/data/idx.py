"""Reading and verifying IDX files, the format of MNIST and Fashion-MNIST (standard library and
numpy only).

An IDX file is a 4-byte magic number ``00 00 <type> <ndim>``, ``ndim`` big-endian ``uint32``
dimensions, then the values in C order. The datasets ship them gzip-compressed
(``*-ubyte.gz``); :func:`read_idx` reads a compressed or an uncompressed file alike.

Verification is of the *decompressed* bytes (SHA-256), so the upstream ``.gz`` files and
re-compressed copies (Debian's ``dataset-fashion-mnist`` package, ``gzip -9`` by hand) are accepted
alike. A file that is corrupt, truncated, of the wrong format or fails its checksum raises one
:class:`~scl_lightning.data._archive.ArchiveError` naming the file and what to do; the file is
never deleted or moved (it may be a system package's file).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ._archive import ArchiveError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

# IDX type byte -> numpy dtype (big-endian, as the format stores them).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path, hint: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ArchiveError(
            f"cannot decompress {path}: it is truncated or corrupt ({type(err).__name__}: {err})"
            + (f"; {hint}" if hint else "")
        ) from err


def read_idx(
    path: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    shape: tuple[int, ...] | None = None,
    hint: str = "",
) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a numpy array.

    Args:
        path: The file.
        sha256: Expected SHA-256 of the decompressed content; ``None`` skips the check.
        shape: Expected array shape; ``None`` accepts any.
        hint: What the user should do about a bad file, appended to every error message.

    Returns:
        The array, in native byte order (``uint8`` for image and label files).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ArchiveError: If the file is truncated, corrupt, not IDX (wrong magic number), has another
            shape, or fails its checksum. The file is left where it is.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_idx(Path(d) / "x-idx1-ubyte.gz", np.arange(3, dtype=np.uint8))
        ...     read_idx(p).tolist()
        [0, 1, 2]
    """
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    data = _read_bytes(path, hint)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ArchiveError(
            f"{path} is not an IDX file (magic number {data[:4].hex() or 'missing'}, expected "
            f"0000<type><ndim>){suffix}"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise ArchiveError(f"{path} has the unknown IDX type code 0x{code:02x}{suffix}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ArchiveError(f"{path} is truncated: its IDX header is incomplete{suffix}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected_bytes = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected_bytes:
        what = "truncated" if len(data) < expected_bytes else "longer than its header says"
        raise ArchiveError(
            f"{path} is {what}: {len(data):,} bytes decompressed, its header {dims} needs "
            f"{expected_bytes:,}{suffix}"
        )
    if shape is not None and dims != tuple(shape):
        raise ArchiveError(
            f"{path} holds an array of shape {dims}, expected {tuple(shape)}{suffix}"
        )
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise ArchiveError(
                f"{path} decompresses to content with SHA-256 {actual}, expected {sha256}: it is "
                f"not the official file{suffix}"
            )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(
    path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None
) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``, or as
    ``compress`` says); for tests and for small datasets of one's own.

    Raises:
        ValueError: If ``array``'s dtype has no IDX type code or it has more than 255 dimensions.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): c for c, dt in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim > 255:
        raise ValueError(
            f"cannot write a {array.dtype} array with {array.ndim} dimensions as IDX; use one of "
            f"{sorted(str(d) for d in codes)} with at most 255 dimensions"
        )
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    data = header + body
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
