"""Fixed-width bit packing of unsigned integers, plus the small byte-level readers the coders use.

``pack_bits(values, width)`` writes each value as ``width`` bits, most significant bit first,
values one after the other with no padding between them; the last byte is padded with zero bits.
This is the "after P+Q" storage of Deep Compression (Han et al., ICLR 2016): n values of b bits
take exactly ``ceil(n * b / 8)`` bytes. It is also how the Huffman code-length tables and the
ANS frequency tables are stored.

Vectorised with numpy (``np.unpackbits``/``np.packbits`` over an (n, width) bit matrix, built in
chunks so 10 million values never need more than a few tens of MB).
"""

from __future__ import annotations

import numpy as np

from ..core.errors import NncompressError

__all__ = [
    "ByteReader",
    "CodingError",
    "check_padding",
    "pack_bits",
    "packed_size",
    "read_uvarint",
    "unpack_bits",
    "write_uvarint",
]

MAX_WIDTH = 32
_CHUNK = 1 << 20  # values per chunk while packing/unpacking (bounds temporary memory)


class CodingError(NncompressError, ValueError):
    """A coded stream is malformed (truncated, inconsistent, or with absurd sizes)."""


def packed_size(count: int, width: int) -> int:
    """Bytes taken by ``count`` values of ``width`` bits: ``ceil(count * width / 8)``."""
    return (count * width + 7) // 8


def _check_width(width: int) -> None:
    if not isinstance(width, int | np.integer) or not 0 <= width <= MAX_WIDTH:
        raise ValueError(f"width={width!r}: must be an integer in [0, {MAX_WIDTH}]")


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Pack unsigned integers into ``width`` bits each, MSB first, concatenated.

    Parameters
    ----------
    values : 1-D array of non-negative integers, each ``< 2**width``.
    width : bits per value, in [0, 32] (0 packs nothing: all values must be 0).

    Returns
    -------
    bytes of length ``ceil(len(values) * width / 8)``; trailing pad bits are zero.
    """
    _check_width(width)
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"values: must be 1-D, got shape {v.shape}")
    if v.size == 0 or width == 0:
        if v.size and int(v.max()) != 0:
            raise ValueError("values: width=0 can only pack zeros")
        return b""
    if v.dtype.kind not in "ui":
        raise ValueError(f"values: must be integers, got dtype {v.dtype}")
    if int(v.min()) < 0 or int(v.max()) >= (1 << width):
        raise ValueError(
            f"values: must be in [0, {(1 << width) - 1}] for width={width}, got range "
            f"[{int(v.min())}, {int(v.max())}]"
        )
    v = v.astype(np.uint32, copy=False)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)  # (width,) MSB first
    bits = np.empty(v.size * width, dtype=np.uint8)
    for start in range(0, v.size, _CHUNK):
        chunk = v[start : start + _CHUNK]
        m = ((chunk[:, None] >> shifts[None, :]) & 1).astype(np.uint8)  # (n_chunk, width)
        bits[start * width : (start + chunk.size) * width] = m.ravel()
    return np.packbits(bits).tobytes()


def unpack_bits(data: bytes | memoryview | np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values of ``width`` bits -> int64 array.

    Raises :class:`CodingError` if ``data`` is shorter than ``ceil(count * width / 8)`` bytes.
    """
    _check_width(width)
    if count < 0:
        raise CodingError(f"count={count}: must be >= 0")
    need = packed_size(count, width)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size < need:
        raise CodingError(
            f"packed data truncated: {count} values of {width} bits need {need} bytes, "
            f"got {buf.size}"
        )
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    weights = (np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)).astype(np.int64)
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        b0, b1 = start * width, (start + n) * width
        byte0 = b0 // 8
        bits = np.unpackbits(buf[byte0 : (b1 + 7) // 8])[b0 - byte0 * 8 :][: n * width]
        out[start : start + n] = bits.reshape(n, width).astype(np.int64) @ weights  # (n,)
    return out


def write_uvarint(value: int) -> bytes:
    """Unsigned LEB128 varint (7 bits per byte, low group first, high bit = continue)."""
    if value < 0:
        raise ValueError(f"value={value}: a varint must be >= 0")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_uvarint(data: bytes | memoryview, pos: int, what: str = "varint") -> tuple[int, int]:
    """Read an unsigned LEB128 varint at ``pos``: ``(value, new_pos)``; at most 10 bytes."""
    value = 0
    for i in range(10):
        if pos + i >= len(data):
            raise CodingError(f"{what}: truncated varint at byte {pos}")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise CodingError(f"{what}: varint at byte {pos} is longer than 10 bytes")


class ByteReader:
    """Bounds-checked sequential reader over bytes; every read names what it reads."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def varint(self, what: str, limit: int) -> int:
        value, self.pos = read_uvarint(self.data, self.pos, what)
        if value > limit:
            raise CodingError(f"{what}={value}: larger than the allowed {limit}")
        return value

    def u8(self, what: str) -> int:
        if self.remaining < 1:
            raise CodingError(f"{what}: truncated (no byte left at offset {self.pos})")
        value = self.data[self.pos]
        self.pos += 1
        return int(value)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CodingError(
                f"{what}: needs {n} bytes at offset {self.pos}, only {self.remaining} left"
            )
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def expect_end(self, what: str) -> None:
        if self.remaining:
            raise CodingError(f"{what}: {self.remaining} unexpected trailing bytes")

    def packed(self, count: int, width: int, what: str) -> np.ndarray:
        """Read ``count`` values of ``width`` bits packed with :func:`pack_bits` (whose padding
        bits after the last value must be zero)."""
        return unpack_bits(self.packed_bytes(count, width, what), width, count)

    def packed_bytes(self, count: int, width: int, what: str) -> memoryview:
        """The bytes of ``count`` packed ``width``-bit values, not unpacked (for readers that
        unpack them in chunks); checks that the padding bits of the last byte are zero."""
        if not isinstance(width, int) or not 0 <= width <= MAX_WIDTH:
            raise CodingError(f"{what}: width={width} outside [0, {MAX_WIDTH}]")
        view = self.take(packed_size(count, width), what)
        check_padding(view, count * width, what)
        return view


def check_padding(data: bytes | memoryview, bits: int, what: str) -> None:
    """Raise :class:`CodingError` unless the bits of ``data`` after the first ``bits`` (the
    padding of the last byte) are zero, as every writer of the format leaves them."""
    used = bits % 8
    if used and len(data) and data[(bits - 1) // 8] & ((1 << (8 - used)) - 1):
        raise CodingError(f"{what}: nonzero padding bits after the last value")
