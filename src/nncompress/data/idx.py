"""Reader for the IDX format used by MNIST and Fashion-MNIST (LeCun's format).

An IDX file is: two zero bytes, a dtype code byte, a byte giving the number of dimensions,
then one big-endian uint32 per dimension, then the data in C order. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import math
import struct
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


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"IDX file '{path}' does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(
                f"IDX file '{path}': gzip stream is corrupt or truncated ({exc})"
            ) from exc
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a numpy array, validating its header.

    Raises
    ------
    DataError
        If the file is missing, its magic number is wrong, or its length does not match
        the dimensions in the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"IDX file '{path}' is truncated: {len(raw)} bytes, header needs 4")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in _DTYPES:
        raise DataError(
            f"IDX file '{path}' has wrong magic number {raw[:4].hex()}: expected 0000 then a "
            f"dtype code in {sorted(hex(c) for c in _DTYPES)}"
        )
    if not 1 <= ndim <= 8:
        raise DataError(f"IDX file '{path}' claims {ndim} dimensions: allowed 1..8")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"IDX file '{path}' is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    # exact Python integers: np.prod in int64 wraps round for absurd headers (2^64 -> 0)
    count = math.prod(dims)
    if count > _MAX_ELEMENTS:
        raise DataError(f"IDX file '{path}' claims {count} elements: more than {_MAX_ELEMENTS}")
    dtype = _DTYPES[code]
    expected = header_len + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"IDX file '{path}' is {what}: {len(raw)} bytes, dimensions {dims} need {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len)
    return data.astype(dtype.newbyteorder("=")).reshape(dims)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (used by tests and for exporting data)."""
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in _CODES:
        raise DataError(f"dtype {array.dtype} cannot be stored in IDX: allowed {list(_CODES)}")
    header = bytes([0, 0, _CODES[big], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(big).tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)
