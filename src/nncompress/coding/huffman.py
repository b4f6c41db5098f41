"""Canonical Huffman coding of integer symbol streams (Deep Compression stage 3).

Han et al., "Deep Compression" (ICLR 2016), section 4: the quantized weight indices and the
relative (gap) indices of a pruned layer have very skewed distributions; Huffman-coding both
saves a further 20-30% of storage.

What is implemented here, and why it is hand-written
----------------------------------------------------
* Code lengths: the classic Huffman merge of the two lightest subtrees (``heapq``), ties broken
  by creation order so the result is deterministic. Length limit (default 24 bits): if the
  longest code exceeds it, every nonzero count is halved (rounding up, so no symbol vanishes)
  and the tree is rebuilt, until it fits -- the simple, well-known approximation to the optimal
  package-merge algorithm; it only triggers for Fibonacci-like counts (> ~75 000 symbols for
  a 24-bit overflow) and costs a tiny fraction of a bit per symbol when it does.
* Canonical codes (Schwartz & Kallick 1964; DEFLATE, RFC 1951 section 3.2.2): symbols sorted by
  (length, symbol value) receive consecutive code values, so the table is fully described by
  the code length of each symbol. That list is what the file stores, packed at 5 bits each.
* Encoding is vectorised numpy (one pass per code-length bit). Decoding
  (:mod:`nncompress.coding.huffman_parse`) finds the code boundaries in ``O(payload bits)``
  numpy work whatever the block layout: regions of the payload are parsed in lock step from
  self-synchronised starting points, each start proven by the previous region landing on it,
  with a worst-case-linear all-offsets parse where a start fails. The stream is still cut
  into blocks of ``B`` symbols whose bit lengths are stored (format 1.0); the decoder only
  checks them (each block's codes must end at its recorded length). The block table costs
  ``(n/B - 1) * w`` bits (w = bits of the largest block length), under 0.3% of the stream.
  ``constriction``'s Huffman coder is not used: its trees are not canonical, and it codes one
  symbol per Python call.

Serialised form (all integers LEB128 varints unless noted), see docs/format.md::

    n            number of symbols
    [if n > 0]
    A            alphabet size = largest symbol + 1
    L (u8)       longest code length; 0 means a single-symbol stream (every symbol is A-1) and
                 nothing follows
    lengths      A code lengths, 5 bits each (pack_bits), 0 = symbol absent
    B            symbols per block
    w (u8)       bits per stored block length
    blocks       ceil(n/B) - 1 block bit lengths, w bits each (the last one is implied)
    total_bits   bits in the bitstream
    payload      ceil(total_bits / 8) bytes, codes MSB first, zero-padded
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from .bitpack import ByteReader, CodingError, pack_bits, packed_size, write_uvarint
from .entropy import symbol_counts
from .huffman_parse import Tables, decode_codes

__all__ = [
    "HuffmanStream",
    "canonical_codes",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
]

MAX_CODE_LENGTH = 24  # decoder peeks L + 7 <= 32 bits at a time
LENGTH_FIELD_BITS = 5  # bits per stored code length (values 0..24)
MAX_ALPHABET = 1 << 20
MAX_SYMBOLS = 1 << 34


def _huffman_lengths_once(counts: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if present.size <= 1:
        return lengths  # 0 or 1 symbol: no bits needed
    # heap entries: (weight, tiebreak, node id); leaves are 0..m-1, internal nodes m..2m-2
    m = present.size
    parent = np.full(2 * m - 1, -1, dtype=np.int64)
    heap = [(int(counts[s]), i, i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    nxt = m
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (w1 + w2, nxt, nxt))
        nxt += 1
    # depth of each node: internal nodes were created in increasing order, so walk downward
    depth = np.zeros(2 * m - 1, dtype=np.int64)
    for node in range(2 * m - 3, -1, -1):  # root is 2m-2 with depth 0
        depth[node] = depth[parent[node]] + 1
    lengths[present] = depth[:m]
    return lengths


def huffman_code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of every symbol from its count (0 for absent symbols).

    Minimises ``sum_s counts[s] * length[s]`` over prefix codes (Huffman 1952), subject to
    ``length <= max_length`` by count halving (see module docstring). A stream with a single
    distinct symbol gets length 0 (it is described by the symbol alone).

    Parameters
    ----------
    counts : (A,) non-negative integer counts.
    max_length : longest allowed code, in [1, 24]; needs ``2**max_length >= #present symbols``.
    """
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or (c.size and int(c.min()) < 0):
        raise ValueError("counts: must be a 1-D array of non-negative integers")
    if not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ValueError(f"max_length={max_length}: must be in [1, {MAX_CODE_LENGTH}]")
    n_present = int(np.count_nonzero(c))
    if n_present > (1 << max_length):
        raise ValueError(
            f"max_length={max_length}: too short for {n_present} distinct symbols "
            f"(needs >= {math.ceil(math.log2(n_present))})"
        )
    while True:
        lengths = _huffman_lengths_once(c)
        if lengths.size == 0 or int(lengths.max()) <= max_length:
            return lengths
        c = np.where(c > 0, (c + 1) // 2, 0)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code value of each symbol (RFC 1951 3.2.2): symbols sorted by (length,
    symbol) get consecutive values, shifted left whenever the length grows. 0 where absent."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for s in order:  # at most A iterations over the (small) alphabet
        ln = int(lengths[s])
        code <<= ln - prev
        codes[s] = code
        code += 1
        prev = ln
    return codes


def _default_block_size(n: int) -> int:
    return max(4096, 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n))))))


@dataclass(frozen=True)
class HuffmanStream:
    """A canonical-Huffman-coded stream of ``n`` symbols in ``[0, alphabet_size)``.

    Attributes
    ----------
    n : number of symbols.
    alphabet_size : largest symbol + 1 (0 for an empty stream).
    lengths : (alphabet_size,) code length per symbol; all zero for a single-symbol stream.
    block_size : symbols per independently decodable block.
    block_bits : (ceil(n / block_size),) bit length of each block.
    payload : the concatenated codes, MSB first, zero-padded to whole bytes.
    """

    n: int
    alphabet_size: int
    lengths: np.ndarray = field(repr=False)
    block_size: int
    block_bits: np.ndarray = field(repr=False)
    payload: bytes = field(repr=False)

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.size else 0

    @property
    def payload_bits(self) -> int:
        return int(self.block_bits.sum())

    def to_bytes(self) -> bytes:
        out = bytearray(write_uvarint(self.n))
        if self.n == 0:
            return bytes(out)
        out += write_uvarint(self.alphabet_size)
        L = self.max_length
        out.append(L)
        if L == 0:
            return bytes(out)
        out += pack_bits(self.lengths.astype(np.int64), LENGTH_FIELD_BITS)
        out += write_uvarint(self.block_size)
        head = self.block_bits[:-1]
        w = int(head.max()).bit_length() if head.size else 0
        out.append(w)
        out += pack_bits(head.astype(np.int64), w)
        out += write_uvarint(self.payload_bits)
        out += self.payload
        return bytes(out)

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    @property
    def table_bits(self) -> int:
        """Bits of everything but the code payload (counts, code-length table, block table)."""
        return 8 * (self.nbytes - len(self.payload))

    @classmethod
    def from_bytes(
        cls, data: bytes | memoryview, *, max_symbols: int = MAX_SYMBOLS
    ) -> HuffmanStream:
        """Parse :meth:`to_bytes` output, validating every field before allocating.

        Raises :class:`~nncompress.coding.bitpack.CodingError` on any inconsistency, including
        trailing bytes and codes that do not form a complete prefix code.
        """
        r = ByteReader(data)
        n = r.varint("huffman symbol count", max_symbols)
        empty = np.zeros(0, dtype=np.int64)
        if n == 0:
            r.expect_end("huffman stream")
            return cls(0, 0, np.zeros(0, np.uint8), 1, empty, b"")
        A = r.varint("huffman alphabet size", MAX_ALPHABET)
        if A == 0:
            raise CodingError("huffman alphabet size=0 for a non-empty stream")
        L = r.u8("huffman max code length")
        if L == 0:
            r.expect_end("huffman stream")
            return cls(n, A, np.zeros(A, np.uint8), max(n, 1), np.zeros(1, np.int64), b"")
        if L > MAX_CODE_LENGTH:
            raise CodingError(f"huffman max code length={L}: must be <= {MAX_CODE_LENGTH}")
        lengths = r.packed(A, LENGTH_FIELD_BITS, "huffman code lengths")
        if int(lengths.max()) != L:
            raise CodingError(f"huffman code lengths: longest is {int(lengths.max())}, header {L}")
        if lengths[A - 1] == 0:
            raise CodingError("huffman code lengths: largest symbol A-1 must be present")
        nz = lengths[lengths > 0]
        if nz.size < 2 or int((1 << (L - nz)).sum()) != (1 << L):
            raise CodingError("huffman code lengths do not form a complete prefix code")
        B = r.varint("huffman block size", max(n, 1))
        if B == 0:
            raise CodingError("huffman block size=0")
        nb = -(-n // B)
        w = r.u8("huffman block-length width")
        if w > 32:
            raise CodingError(f"huffman block-length width={w}: must be <= 32")
        if packed_size(nb - 1, w) > r.remaining:
            raise CodingError("huffman block table truncated")
        head = r.packed(nb - 1, w, "huffman block table")
        total = r.varint("huffman payload bits", n * L)
        lo = int(nz.min())
        if total < n * lo:
            raise CodingError(f"huffman payload bits={total}: fewer than {n} codes need")
        payload = bytes(r.take(packed_size(total, 1), "huffman payload"))
        r.expect_end("huffman stream")
        sizes = np.full(nb, B, dtype=np.int64)
        sizes[-1] = n - B * (nb - 1)
        last = total - int(head.sum())
        block_bits = np.concatenate([head, [last]]).astype(np.int64)
        if last < 0 or np.any(block_bits < sizes * lo) or np.any(block_bits > sizes * L):
            raise CodingError("huffman block table inconsistent with the payload length")
        return cls(n, A, lengths.astype(np.uint8), B, block_bits, payload)


def huffman_encode(
    symbols: np.ndarray,
    *,
    max_length: int = MAX_CODE_LENGTH,
    block_size: int | None = None,
) -> HuffmanStream:
    """Canonical-Huffman-encode a 1-D stream of non-negative integer symbols.

    Parameters
    ----------
    symbols : (n,) integers in [0, 2**20).
    max_length : longest code in bits (<= 24).
    block_size : symbols per decoding block (default ``max(4096, 2**ceil(log2(sqrt(n))))``).

    Returns
    -------
    HuffmanStream; ``stream.to_bytes()`` is its serialised form, ``huffman_decode`` inverts it.
    """
    s = np.asarray(symbols)
    if s.ndim != 1:
        raise ValueError(f"symbols: must be 1-D, got shape {s.shape}")
    n = int(s.size)
    if n == 0:
        return HuffmanStream(0, 0, np.zeros(0, np.uint8), 1, np.zeros(0, np.int64), b"")
    counts = symbol_counts(s)
    A = counts.size
    if A > MAX_ALPHABET:
        raise ValueError(f"symbols: largest symbol {A - 1} exceeds {MAX_ALPHABET - 1}")
    lengths = huffman_code_lengths(counts, max_length)
    if not lengths.any():  # a single distinct symbol (= A-1): no payload
        return HuffmanStream(n, A, lengths.astype(np.uint8), n, np.zeros(1, np.int64), b"")
    B = int(block_size) if block_size is not None else _default_block_size(n)
    if B < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    B = min(B, n)
    codes = canonical_codes(lengths)
    idx = s.astype(np.int64, copy=False)
    sym_len = lengths[idx]  # (n,)
    ends = np.cumsum(sym_len)  # (n,) bit offset after each code
    total = int(ends[-1])
    nbytes = (total + 7) // 8
    # Codes never overlap, so the bitstream is the *sum* of every code placed at its offset.
    # A code of <= 24 bits starting at bit offset o spans at most 4 bytes from byte o // 8:
    # left-align it in 32 bits, shift right by o % 8, and scatter-add its 4 bytes with
    # np.bincount (a fast, exact scatter-add; np.add.at is much slower).
    aligned = codes << (32 - np.maximum(lengths, 1))  # (A,) code in the top bits of 32
    out = np.zeros(nbytes + 4, dtype=np.int64)
    chunk = 1 << 20
    for a in range(0, n, chunk):
        st = ends[a : a + chunk] - sym_len[a : a + chunk]  # (m,) start bit of each code
        val = aligned[idx[a : a + chunk]] >> (st & 7)  # (m,) 32-bit window from byte st // 8
        b0 = st >> 3
        lo, hi = int(b0[0]), int(b0[-1]) + 4
        rel = b0 - lo
        for k in range(4):
            out[lo:hi] += np.bincount(
                rel + k, weights=(val >> (24 - 8 * k)) & 0xFF, minlength=hi - lo
            ).astype(np.int64)
    payload = out[:nbytes].astype(np.uint8).tobytes()
    block_bits = np.add.reduceat(sym_len, np.arange(0, n, B))  # (ceil(n/B),)
    return HuffmanStream(n, A, lengths.astype(np.uint8), B, block_bits.astype(np.int64), payload)


def huffman_decode(stream: HuffmanStream) -> np.ndarray:
    """Decode a :class:`HuffmanStream` back to its int64 symbols (exact inverse of encode).

    The codes are parsed by :func:`nncompress.coding.huffman_parse.decode_codes` in
    ``O(payload bits)`` numpy work whatever the block layout; the block table is only checked
    (every block's codes must end exactly at its recorded length). Raises
    :class:`CodingError` otherwise.
    """
    n, A = stream.n, stream.alphabet_size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if int(stream.lengths.max()) == 0:
        return np.full(n, A - 1, dtype=np.int64)
    symbols = decode_codes(stream.payload, stream.payload_bits, n, Tables(stream.lengths))
    symbols = symbols.astype(np.int64)  # (n,)
    if stream.block_bits.size > 1:  # the block table must match the codes (as the encoder's)
        bits = np.add.reduceat(
            stream.lengths.astype(np.int64)[symbols], np.arange(0, n, stream.block_size)
        )
        if not np.array_equal(bits, stream.block_bits):
            raise CodingError("huffman stream corrupt: codes do not end at the recorded block ends")
    return symbols
