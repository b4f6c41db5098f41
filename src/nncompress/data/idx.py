"""Reader for the IDX format used by MNIST and Fashion-MNIST (LeCun's format).

An IDX file is: two zero bytes, a dtype code byte, a byte giving the number of dimensions,
then one big-endian uint32 per dimension, then the data in C order. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..core.errors import NncompressError

__all__ = ["DataError", "read_idx", "write_idx"]

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {v.newbyteorder(">") if v.itemsize > 1 else v: k for k, v in _DTYPES.items()}
_MAX_ELEMENTS = 1 << 31  # refuse absurd headers before allocating anything


class DataError(NncompressError, ValueError):
    """A data file is missing, truncated or not what it claims to be."""


DEFAULT_MAX_BYTES = 1 << 30  # data bytes an IDX file may declare (Fashion-MNIST: 47 MB)


def _header(read, path: Path) -> tuple[int, tuple[int, ...], int]:
    """``(dtype code, dims, header length)`` read with ``read(n)``; refuses a bad magic."""
    head = read(4)
    if len(head) < 4:
        raise DataError(f"IDX file '{path}' is truncated: {len(head)} bytes, header needs 4")
    zero, code, ndim = head[:2], head[2], head[3]
    if zero != b"\x00\x00" or code not in _DTYPES:
        raise DataError(
            f"IDX file '{path}' has wrong magic number {head[:4].hex()}: expected 0000 then a "
            f"dtype code in {sorted(hex(c) for c in _DTYPES)}"
        )
    if not 1 <= ndim <= 8:
        raise DataError(f"IDX file '{path}' claims {ndim} dimensions: allowed 1..8")
    raw = read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"IDX file '{path}' is truncated inside its header")
    return code, struct.unpack(f">{ndim}I", raw), 4 + 4 * ndim


def read_idx(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array, validating its header.

    The header's dimensions bound everything: at most ``max_bytes`` of data (default 1 GiB),
    and a gzipped file is inflated only up to the size its header declares (a small gzip
    expanding to gigabytes is refused, not decompressed).

    Raises
    ------
    DataError
        If the file is missing, its magic number is wrong, it declares more than
        ``max_bytes``, or its length does not match the dimensions in the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file '{path}' does not exist")
    with path.open("rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as f:
            code, dims, header_len = _header(f.read, path)
            # exact Python integers: np.prod in int64 wraps round for absurd headers
            count = math.prod(dims)
            dtype = _DTYPES[code]
            nbytes = count * dtype.itemsize
            if count > _MAX_ELEMENTS or nbytes > max_bytes:
                raise DataError(
                    f"IDX file '{path}' declares {count} elements ({nbytes} bytes): more than "
                    f"max_bytes={max_bytes} (refused before reading)"
                )
            data = f.read(nbytes)  # inflates at most what the header declares
            extra = f.read(1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"IDX file '{path}': gzip stream is corrupt or truncated ({exc})") from exc
    expected = header_len + nbytes
    if len(data) < nbytes or extra:
        what = "truncated" if len(data) < nbytes else "longer than its header says"
        got = header_len + len(data) + len(extra)
        raise DataError(
            f"IDX file '{path}' is {what}: {'at least ' if extra else ''}{got} bytes, "
            f"dimensions {dims} need {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.astype(dtype.newbyteorder("=")).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (used by tests and for exporting data)."""
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in _CODES:
        raise DataError(f"dtype {array.dtype} cannot be stored in IDX: allowed {list(_CODES)}")
    header = bytes([0, 0, _CODES[big], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(big).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)
