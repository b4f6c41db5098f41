"""The ``.ncz`` format: a state dict stored with Deep Compression's stage-3 coding.

This module holds the byte layout (prefix, framed sections, deflated JSON header) and the
symbol-stream codecs; :mod:`.encode` writes files and :mod:`.decode` reads them.

Byte layout (all integers little-endian; full description in docs/format.md)::

    prefix   16 bytes: magic b"\\x89NCZ\\r\\n\\x1a\\n", u16 major=1, u16 minor (what the
             contents need, :func:`needed_minor`), u32 sections S
    S sections, each framed as: u32 length, u32 CRC32 (zlib.crc32 of the payload), payload
      section 0   header: zlib-deflated canonical JSON (tensor names, shapes, dtypes, schemes,
                  codecs, references to the sections below)
      section 1   metadata: zlib-deflated canonical JSON chosen by the caller (e.g. the
                  checkpoint sidecar: architecture, dataset, metrics), or null
      section 2.. tensor data: codebooks, weight-code streams, relative-index streams, dense
                  tensors -- one section each, in header order

Schemes (chosen per tensor to minimise bytes unless overridden, see :class:`EncodeConfig`):

* ``dense``: the tensor's raw bytes (any dtype, exact), or float16 for float32 tensors when
  ``dense_dtype='fp16'``.
* ``codebook`` (floating tensors with at most ``2**max_codebook_bits`` distinct nonzero
  values: shared weights after k-means, or any tensor with few values): a codebook of the
  distinct nonzero values sorted ascending, then either
  ``layout='sparse'``: the relative-index stream of the nonzero positions (with fillers, see
  :mod:`nncompress.coding.sparse`) and one code per nonzero; or ``layout='dense'``: one code per
  element (zero being a codebook value). Both streams are Huffman-, ANS- or fixed-width-coded.

* ``pq`` (format 1.1; product quantization, Stock et al. 2020; float tensors of 2+ dims
  whose consecutive ``d``-value subvectors take at most 65536 distinct values): a ``(k, d)``
  codebook of the distinct nonzero subvectors and one code per subvector, an all-zero
  subvector (pruned block) taking the reserved code ``k``; see :mod:`.pq_scheme`.
* ``affine`` (format 1.2; weight-only quantized matrices, :mod:`nncompress.quant.weight_only`): packed
  group-wise codes, float16 scales and zero points; decoded as ``(q - z) * s``.
* ``alias`` (format 1.2): a tensor bit-identical to an earlier one (tied weights), no data.

Zeros: in the codebook and pq schemes both +0.0 and -0.0 count as zero and decode to +0.0 (a masked
weight ``w * 0`` is -0.0 when ``w < 0``; keeping the sign would make every pruned negative weight
a nonzero). ``round_for_storage_`` applies the same rule, so decoded == evaluated bit for bit.
Every other value, NaN payloads included, is kept bit-exactly.

Decoding validates every length, count and shape against the remaining bytes and sane limits
before allocating, checks each section's CRC32, and raises :class:`FormatError` (a
``ValueError``) for any damage -- never another exception.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import torch

from ..coding.ans import AnsStream, ans_decode, ans_encode
from ..coding.bitpack import ByteReader, CodingError, pack_bits, write_uvarint
from ..coding.entropy import empirical_entropy
from ..coding.huffman import HuffmanStream, huffman_decode, huffman_encode
from .errors import FormatError
from .report import StreamReport, TensorReport

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "MAGIC",
    "VERSION",
    "alias_report",
    "needed_minor",
    "nonzero_count",
]

MAGIC = b"\x89NCZ\r\n\x1a\n"
VERSION = (1, 2)  # 1.1: the 'pq' scheme; 1.2: 'affine', 'alias' and more dtypes (needed_minor)
_PREFIX = struct.Struct("<8sHHI")
_FRAME = struct.Struct("<II")
MAX_HEADER_BYTES = 16 << 20  # decompressed header / metadata JSON
MAX_SECTIONS = 1 << 22
MAX_NDIM = 16
DEFAULT_MAX_ELEMENTS = 1 << 28  # total tensor elements a file may declare (1 GiB of fp32)
# beyond 2**24 elements a file must hold at least one byte per 65536 elements (a crafted
# 100-byte file must not make the decoder allocate gigabytes)
PLAUSIBLE_FREE_ELEMENTS = 1 << 24
PLAUSIBLE_ELEMENTS_PER_BYTE = 1 << 16

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    # format 1.2: every other fixed-size dtype a state dict may hold, stored raw
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_DTYPES_1_0 = frozenset(
    (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
)


def needed_minor(entries: list[dict]) -> int:
    """The minor version a file's contents need (like ZIP's "version needed to extract"): 2
    with an 'affine' or 'alias' entry or a dtype added in 1.2, else 1 with a 'pq' entry, else
    0. Writers write it, readers require it exactly."""
    if any(
        e.get("scheme") in ("affine", "alias") or e.get("dtype") not in _DTYPES_1_0 for e in entries
    ):
        return 2
    return 1 if any(e.get("scheme") == "pq" for e in entries) else 0


# floating dtypes that may use the codebook scheme: numpy float type and same-size uint view
_CODEBOOK_DTYPES = {"float32": (np.float32, np.uint32), "float16": (np.float16, np.uint16)}
_STORE_BYTES = {"float16": 2, "float32": 4}


def nonzero_count(t: torch.Tensor) -> int:
    """Nonzero elements (dtypes without ``count_nonzero``, e.g. uint16 or float8, count the
    elements with any nonzero byte)."""
    if t.numel() == 0:
        return 0
    try:
        return int(torch.count_nonzero(t.detach()))
    except (NotImplementedError, RuntimeError):
        size = t.element_size()
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).reshape(-1, size)
        return int(raw.any(dim=1).sum())


def alias_report(name: str, t: torch.Tensor) -> TensorReport:
    """Report of an ``alias`` entry: no bytes of its own (and no "original" bits)."""
    return TensorReport(
        name=name,
        shape=tuple(t.shape),
        dtype=str(t.dtype).removeprefix("torch."),
        scheme="alias",
        layout=None,
        numel=t.numel(),
        nonzeros=nonzero_count(t),
        total_bytes=0,
    )


def _fail(msg: str) -> FormatError:
    return FormatError(msg)


# ----------------------------------------------------------------------------- streams


def _raw_width(alphabet: int) -> int:
    return max(0, alphabet - 1).bit_length()


def _encode_stream(
    symbols: np.ndarray, alphabet: int, codec: str, fallback: bool, role: str
) -> tuple[str, bytes, StreamReport]:
    """Code one symbol stream; returns (codec used, bytes, report)."""
    n = int(symbols.size)
    width = _raw_width(alphabet)
    raw = write_uvarint(n) + bytes([width]) + pack_bits(symbols.astype(np.int64), width)
    raw_payload = n * width
    used, data, payload = "raw", raw, raw_payload
    if codec == "huffman":
        hs = huffman_encode(symbols)
        used, data, payload = "huffman", hs.to_bytes(), hs.payload_bits
    elif codec == "ans":
        a = ans_encode(symbols)
        used, data, payload = "ans", a.to_bytes(), a.payload_bits
    if used != "raw" and fallback and len(raw) < len(data):
        used, data, payload = "raw", raw, raw_payload
    rep = StreamReport(
        role=role,
        codec=used,
        symbols=n,
        alphabet=alphabet,
        entropy=empirical_entropy(symbols),
        payload_bits=payload,
        table_bits=8 * len(data) - payload,
    )
    return used, data, rep


# entropy-coded stream codecs: (stream class with from_bytes, decoder)
_ENTROPY_DECODERS = {"huffman": (HuffmanStream, huffman_decode), "ans": (AnsStream, ans_decode)}


def _decode_stream(
    codec: str, data: memoryview, n: int, alphabet: int, what: str
) -> tuple[np.ndarray, int]:
    """Decode a stream of exactly ``n`` symbols below ``alphabet``: (symbols, payload bits)."""
    try:
        if codec == "raw":
            r = ByteReader(data)
            got = r.varint(f"{what}: symbol count", n)
            width = r.u8(f"{what}: width")
            if got != n or width != _raw_width(alphabet):
                raise CodingError(
                    f"raw stream header (n={got}, width={width}) does not match the "
                    f"expected n={n}, width={_raw_width(alphabet)}"
                )
            sym = r.packed(n, width, "raw symbols")
            r.expect_end("raw stream")
            payload = n * width
        elif codec in _ENTROPY_DECODERS:
            stream_type, decode = _ENTROPY_DECODERS[codec]
            st = stream_type.from_bytes(data, max_symbols=n)
            if st.n != n or st.alphabet_size > alphabet:
                raise CodingError(
                    f"{codec} stream has {st.n} symbols over {st.alphabet_size} values; expected "
                    f"{n} symbols below {alphabet}"
                )
            sym, payload = decode(st), st.payload_bits
        else:
            raise CodingError(f"codec={codec!r}: must be one of raw, huffman, ans")
    except CodingError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    if sym.size and (int(sym.max()) >= alphabet or int(sym.min()) < 0):
        raise FormatError(f"{what}: symbol out of range [0, {alphabet})")
    return sym, payload


def _stream_report(role, codec, symbols, alphabet, secs, sec, payload) -> StreamReport:
    return StreamReport(
        role=role,
        codec=codec,
        symbols=int(symbols.size),
        alphabet=alphabet,
        entropy=empirical_entropy(symbols),
        payload_bits=payload,
        table_bits=8 * len(secs[sec]) - payload,
    )


# ----------------------------------------------------------------------------- framing


def _canonical_json(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: must be JSON-serialisable ({exc})") from exc
    return zlib.compress(text.encode("ascii"), 9)


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _inflate(payload: memoryview, what: str) -> Any:
    d = zlib.decompressobj()
    try:
        text = d.decompress(payload, MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise _fail(f"{what}: not valid deflate data ({exc})") from exc
    if d.unconsumed_tail:
        raise _fail(f"{what}: larger than {MAX_HEADER_BYTES} bytes once inflated")
    if not d.eof or d.unused_data:
        raise _fail(f"{what}: deflate stream truncated or followed by extra bytes")
    try:
        return json.loads(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(f"{what}: not valid JSON ({exc})") from exc


def _split_sections(data: bytes | memoryview) -> list[memoryview]:
    buf = memoryview(data)
    if len(buf) < _PREFIX.size:
        raise _fail(f"file too short ({len(buf)} bytes) to be an .ncz file")
    magic, major, minor, count = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _fail(f"bad magic {bytes(magic)!r}: not an nncompress .ncz file")
    if major != VERSION[0] or minor > VERSION[1]:
        raise _fail(
            f"format version {major}.{minor} is not supported (this reader handles "
            f"{VERSION[0]}.0 to {VERSION[0]}.{VERSION[1]}; a newer minor version comes from a "
            "newer nncompress)"
        )
    if not 2 <= count <= MAX_SECTIONS or count * _FRAME.size > len(buf) - _PREFIX.size:
        raise _fail(f"section count={count}: impossible for a file of {len(buf)} bytes")
    pos = _PREFIX.size
    out = []
    for i in range(count):
        if len(buf) - pos < _FRAME.size:
            raise _fail(f"section {i}: frame truncated at byte {pos}")
        length, crc = _FRAME.unpack_from(buf, pos)
        pos += _FRAME.size
        if length > len(buf) - pos:
            raise _fail(
                f"section {i}: length {length} exceeds the {len(buf) - pos} bytes left "
                "(file truncated?)"
            )
        payload = buf[pos : pos + length]
        if zlib.crc32(payload) != crc:
            raise _fail(f"section {i}: CRC32 mismatch (file corrupted)")
        out.append(payload)
        pos += length
    if pos != len(buf):
        raise _fail(f"{len(buf) - pos} unexpected bytes after the last section")
    return out
