"""The ``.ncz`` format: a state dict stored with Deep Compression's stage-3 coding.

This module holds the byte layout (prefix, framed sections, deflated JSON header) and the
symbol-stream codecs; :mod:`.encode` writes files and :mod:`.decode` reads them.

Byte layout (all integers little-endian; full description in docs/format.md)::

    prefix   16 bytes: magic b"\\x89NCZ\\r\\n\\x1a\\n", u16 major=1, u16 minor (what the
             contents need, at least 2: written_minor), u32 sections S
    S sections, each framed as: u32 length, u32 CRC32 (of the u32 section index then the
      payload; of the payload alone in version 1.0 and 1.1 files), payload
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
* ``affine`` (format 1.3; weight-only quantized matrices, :mod:`nncompress.quant.weight_only`):
  packed group-wise codes, float16 scales and zero points; decoded as ``(q - z) * s``.
* ``alias`` (format 1.3): a tensor bit-identical to an earlier one (tied weights), no data.
* ``sparse`` (format 1.5; float tensors with at most 75% nonzeros whose values are not
  shared: pruned layers): relative-index positions as in the codebook scheme's sparse layout,
  and the nonzero values as byte planes (most significant first), each an entropy-coded
  stream; see :mod:`.sparse_values`.

Zeros: in the codebook, pq and sparse schemes both +0.0 and -0.0 count as zero and decode to +0.0 (a masked
weight ``w * 0`` is -0.0 when ``w < 0``; keeping the sign would make every pruned negative weight
a nonzero). ``round_for_storage_`` applies the same rule, so decoded == evaluated bit for bit.
Every other value, NaN payloads included, is kept bit-exactly.

Decoding validates every length, count and shape against the remaining bytes and sane limits
(``max_elements``, ``max_bytes`` of declared output) before allocating, checks each section's
CRC32, decodes streams in chunks (memory: the declared output plus O(file size + CHUNK)), and
raises :class:`FormatError` (a ``ValueError``) for any damage -- never another exception.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..coding.ans import AnsStream, ans_decode_chunks, ans_encode
from ..coding.bitpack import (
    ByteReader,
    CodingError,
    check_padding,
    pack_bits,
    packed_size,
    unpack_bits,
    write_uvarint,
)
from ..coding.entropy import empirical_entropy
from ..coding.huffman import HuffmanStream, huffman_decode, huffman_encode
from .errors import FormatError
from .report import StreamReport, TensorReport

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "MAGIC",
    "VERSION",
    "alias_report",
    "needed_minor",
    "nonzero_count",
    "section_crc",
]

MAGIC = b"\x89NCZ\r\n\x1a\n"
VERSION = (1, 5)  # 1.1: 'pq'; 1.2: CRCs bound to their index; 1.3: 'affine', 'alias', dtypes;
# 1.4: the codebook layout 'context'; 1.5: the 'sparse' scheme (pruned float tensors)
BOUND_CRC_MINOR = 2  # first minor version whose CRCs cover the section index
#: the minor version each scheme needs (a scheme not listed needs 1.0); a file is written with
#: the largest of BOUND_CRC_MINOR and what its tensors need, so a file without a newer scheme
#: stays readable by older readers ("version needed to extract")
SCHEME_MINOR = {"pq": 1, "sparse": 3}
_PREFIX = struct.Struct("<8sHHI")
_FRAME = struct.Struct("<II")
MAX_HEADER_BYTES = 16 << 20  # decompressed header / metadata JSON
MAX_SECTIONS = 1 << 22
MAX_NDIM = 16
DEFAULT_MAX_ELEMENTS = 1 << 28  # total tensor elements a file may declare (1 GiB of fp32)
DEFAULT_MAX_BYTES = 1 << 31  # total bytes of the decoded tensors a file may declare (2 GiB)
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
    # format 1.3: every other fixed-size dtype a state dict may hold, stored raw
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
#: dtypes added in format 1.3 (a file holding one needs 1.3)
DTYPES_1_3 = frozenset(
    ("uint16", "uint32", "uint64", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")
)
# floating dtypes that may use the codebook scheme: numpy float type and same-size uint view
_CODEBOOK_DTYPES = {"float32": (np.float32, np.uint32), "float16": (np.float16, np.uint16)}
_STORE_BYTES = {"float16": 2, "float32": 4}


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
    elif codec in ("ans", "context"):  # 'context': streams outside the context layout use ANS
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


CHUNK = 1 << 16  # symbols decoded per step: a decoder's temporaries stay O(CHUNK)


class SymbolStream:
    """A parsed symbol stream of exactly ``n`` symbols below ``alphabet``, decoded chunk by
    chunk (:meth:`chunks`), so that decoding never holds more than ``CHUNK`` symbols at a time
    except a Huffman stream's, whose ``n`` is at most its payload bits (n <= 8 x its bytes).

    Every field was checked against the stream's bytes when it was parsed
    (:func:`open_stream`); :meth:`chunks` raises :class:`FormatError` for damage found while
    decoding (a symbol outside the alphabet, an ANS coder not empty at the end).
    """

    def __init__(self, codec, n, alphabet, payload_bits, nbytes, what, source) -> None:
        self.codec, self.n, self.alphabet = codec, n, alphabet
        self.payload_bits, self.nbytes, self.what = payload_bits, nbytes, what
        self._source = source  # callable returning an iterator of int64 chunks
        self.counts: np.ndarray | None = None

    def chunks(self, *, count: bool = False) -> Iterator[np.ndarray]:
        """The symbols, in order, as int64 arrays of at most ``CHUNK`` each. With ``count``,
        :attr:`counts` holds each symbol's count afterwards (for :func:`stream_report`)."""
        if count:
            self.counts = np.zeros(self.alphabet, dtype=np.int64)
        seen = 0
        try:
            for sym in self._source():
                if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= self.alphabet):
                    raise FormatError(f"{self.what}: symbol out of range [0, {self.alphabet})")
                seen += sym.size
                if count:
                    self.counts += np.bincount(sym, minlength=self.alphabet)
                yield sym
        except CodingError as exc:
            raise FormatError(f"{self.what}: {exc}") from exc
        if seen != self.n:  # pragma: no cover - every source yields exactly n
            raise FormatError(f"{self.what}: decoded {seen} symbols, expected {self.n}")


def _constant(n: int, symbol: int):
    def source() -> Iterator[np.ndarray]:
        for a in range(0, n, CHUNK):
            yield np.full(min(CHUNK, n - a), symbol, dtype=np.int64)

    return source


def _raw_source(packed: memoryview, n: int, width: int):
    def source() -> Iterator[np.ndarray]:
        if width == 0:
            yield from _constant(n, 0)()
            return
        for a in range(0, n, CHUNK):  # CHUNK values of any width end on a whole byte
            m = min(CHUNK, n - a)
            lo = a * width // 8
            yield unpack_bits(packed[lo : lo + packed_size(m, width)], width, m)

    return source


def _huffman_source(st: HuffmanStream):
    def source() -> Iterator[np.ndarray]:
        sym = huffman_decode(st)  # (n,) with n <= payload bits: O(the stream's bytes)
        for a in range(0, sym.size, CHUNK):
            yield sym[a : a + CHUNK]

    return source


def open_stream(codec: str, data: memoryview, n: int, alphabet: int, what: str) -> SymbolStream:
    """Parse a stream's fields (checked against its bytes before anything is allocated) and
    return it ready to decode; the stream must hold exactly ``n`` symbols below ``alphabet``.
    Raises :class:`FormatError`."""
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
            packed = r.packed_bytes(n, width, "raw symbols")
            r.expect_end("raw stream")
            return SymbolStream(
                codec, n, alphabet, n * width, len(data), what, _raw_source(packed, n, width)
            )
        if codec == "huffman":
            st = HuffmanStream.from_bytes(data, max_symbols=n)
            _expect(codec, st.n, st.alphabet_size, n, alphabet)
            check_padding(st.payload, st.payload_bits, "huffman payload")
            if st.n and st.max_length == 0:  # one distinct symbol: A' - 1, no payload
                source = _constant(n, st.alphabet_size - 1)
            else:
                source = _huffman_source(st)
            return SymbolStream(codec, n, alphabet, st.payload_bits, len(data), what, source)
        if codec == "ans":
            st = AnsStream.from_bytes(data, max_symbols=n)
            _expect(codec, st.n, st.alphabet_size, n, alphabet)
            return SymbolStream(
                codec, n, alphabet, st.payload_bits, len(data), what,
                lambda: ans_decode_chunks(st, CHUNK),
            )  # fmt: skip
        raise CodingError(f"codec={codec!r}: must be one of raw, huffman, ans")
    except CodingError as exc:
        raise FormatError(f"{what}: {exc}") from exc


def _expect(codec: str, got_n: int, got_alphabet: int, n: int, alphabet: int) -> None:
    if got_n != n or got_alphabet > alphabet:
        raise CodingError(
            f"{codec} stream has {got_n} symbols over {got_alphabet} values; expected "
            f"{n} symbols below {alphabet}"
        )


def stream_report(role: str, stream: SymbolStream) -> StreamReport:
    """The :class:`StreamReport` of a stream decoded with ``chunks(count=True)``."""
    counts = stream.counts if stream.counts is not None else np.zeros(0, np.int64)
    return StreamReport(
        role=role,
        codec=stream.codec,
        symbols=stream.n,
        alphabet=stream.alphabet,
        entropy=empirical_entropy(counts, counts=True),
        payload_bits=stream.payload_bits,
        table_bits=8 * stream.nbytes - stream.payload_bits,
    )


# ----------------------------------------------------------------------------- framing


def _canonical_json(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: must be JSON-serialisable ({exc})") from exc
    return zlib.compress(text.encode("ascii"), 9)


#: the minor version each scheme needs (a scheme not listed needs 1.0)
SCHEME_MINOR = {"pq": 1, "affine": 3, "alias": 3, "sparse": 5}
LAYOUT_MINOR = {"context": 4}  # codebook layouts added after 1.0


def needed_minor(entries: list[dict]) -> int:
    """The minor version a file's entries need: the newest scheme or dtype they use."""
    return max(
        (
            max(
                SCHEME_MINOR.get(e.get("scheme"), 0),
                3 if e.get("dtype") in DTYPES_1_3 else 0,
                LAYOUT_MINOR.get(e.get("layout"), 0),
            )
            for e in entries
        ),
        default=0,
    )


def written_minor(entries: list[dict]) -> int:
    """The minor version a writer puts in the prefix: at least 1.2 (CRCs bound to section
    indices), 1.3 when the contents need it. Writing the lowest such version (rather than the
    newest) keeps a one-bit flip of the field from turning a 1.3 file into a valid 1.2 one."""
    return max(BOUND_CRC_MINOR, needed_minor(entries))


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


def section_crc(index: int, payload: bytes | memoryview, minor: int = VERSION[1]) -> int:
    """The CRC32 stored in section ``index``'s frame: from format 1.1 on it covers the
    section's index (4 bytes, little-endian) followed by its payload, so a section moved to
    another place no longer matches; format 1.0 covered the payload alone."""
    if minor >= BOUND_CRC_MINOR:
        return zlib.crc32(payload, zlib.crc32(struct.pack("<I", index)))
    return zlib.crc32(payload)


def _frame(payload: bytes, index: int) -> bytes:
    return _FRAME.pack(len(payload), section_crc(index, payload)) + payload


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


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
        return json.loads(text.decode("ascii"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(f"{what}: not valid JSON ({exc})") from exc


def _split_sections(data: bytes | memoryview) -> tuple[list[memoryview], int]:
    """The sections' payloads (every frame and CRC checked) and the file's minor version."""
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
        if section_crc(i, payload, minor) != crc:
            moved = " or moved from another place" if minor >= BOUND_CRC_MINOR else ""
            raise _fail(f"section {i}: CRC32 mismatch (file corrupted{moved})")
        out.append(payload)
        pos += length
    if pos != len(buf):
        raise _fail(f"{len(buf) - pos} unexpected bytes after the last section")
    return out, minor
