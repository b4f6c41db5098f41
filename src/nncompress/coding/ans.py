"""Asymmetric numeral systems (ANS) coding of integer symbol streams, via ``constriction``.

Huffman codes spend a whole number of bits per symbol, so a stream whose most frequent symbol
has probability p > 0.5 pays up to ~1 bit/symbol over the empirical entropy H (see
:mod:`nncompress.coding.entropy`). ANS (Duda 2013) is an entropy coder with arithmetic-coding
precision: it spends ``n * H`` bits plus a constant (here: at most one 32-bit word of state plus
the fixed-point rounding of the model). We use the stack-based ``AnsCoder`` of the
``constriction`` package (Bamler 2022), with a ``Categorical`` model built from the exact symbol
counts of the stream, which the stream stores so the decoder rebuilds the identical model.

Only symbols that occur are given probability: the stream is coded over the *rank* of each
symbol among the present ones, so absent symbols cost nothing (constriction gives every symbol
of a Categorical's alphabet a nonzero probability).

Serialised form (LEB128 varints unless noted), see docs/format.md::

    n            number of symbols
    [if n > 0]
    A            alphabet size = largest symbol + 1
    w (u8)       bits per stored count
    counts       A counts, w bits each (pack_bits); count 0 = absent
    [if more than one symbol is present]
    m            number of 32-bit ANS words
    words        m little-endian uint32 (constriction's compressed stack, read in order)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .bitpack import ByteReader, CodingError, pack_bits, write_uvarint
from .entropy import symbol_counts

__all__ = ["AnsStream", "ans_decode", "ans_decode_chunks", "ans_encode"]

MAX_ALPHABET = 1 << 20
MAX_COUNT_BITS = 32  # bits per stored count (pack_bits' limit): a symbol occurs < 2**32 times
MAX_SYMBOLS = 1 << 34


def _model(counts_present: np.ndarray):
    import constriction

    probs = counts_present.astype(np.float64) / float(counts_present.sum())  # (m,)
    return constriction.stream.model.Categorical(probs, perfect=False)


@dataclass(frozen=True)
class AnsStream:
    """An ANS-coded stream: ``n`` symbols, their ``counts`` (the model) and the coded words."""

    n: int
    counts: np.ndarray = field(repr=False)  # (alphabet_size,) int64
    words: np.ndarray = field(repr=False)  # (m,) uint32

    @property
    def alphabet_size(self) -> int:
        return int(self.counts.size)

    @property
    def payload_bits(self) -> int:
        return 32 * int(self.words.size)

    def to_bytes(self) -> bytes:
        out = bytearray(write_uvarint(self.n))
        if self.n == 0:
            return bytes(out)
        out += write_uvarint(self.alphabet_size)
        w = int(self.counts.max()).bit_length()
        if w > MAX_COUNT_BITS:
            raise ValueError(
                f"ans stream: a symbol occurs {int(self.counts.max())} times; counts are stored "
                f"in at most {MAX_COUNT_BITS} bits (split the stream)"
            )
        out.append(w)
        out += pack_bits(self.counts, w)
        if np.count_nonzero(self.counts) > 1:
            out += write_uvarint(int(self.words.size))
            out += self.words.astype("<u4").tobytes()
        return bytes(out)

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    @property
    def table_bits(self) -> int:
        return 8 * self.nbytes - self.payload_bits

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, *, max_symbols: int = MAX_SYMBOLS) -> AnsStream:
        """Parse :meth:`to_bytes` output; raises :class:`CodingError` when inconsistent."""
        r = ByteReader(data)
        n = r.varint("ans symbol count", max_symbols)
        if n == 0:
            r.expect_end("ans stream")
            return cls(0, np.zeros(0, np.int64), np.zeros(0, np.uint32))
        A = r.varint("ans alphabet size", MAX_ALPHABET)
        if A == 0:
            raise CodingError("ans alphabet size=0 for a non-empty stream")
        w = r.u8("ans count width")
        if not 1 <= w <= MAX_COUNT_BITS:
            raise CodingError(f"ans count width={w}: must be in [1, {MAX_COUNT_BITS}]")
        counts = r.packed(A, w, "ans counts")
        if int(counts.sum()) != n:
            raise CodingError(f"ans counts sum to {int(counts.sum())}, stream has {n} symbols")
        if counts[A - 1] == 0:
            raise CodingError("ans counts: largest symbol A-1 must be present")
        words = np.zeros(0, np.uint32)
        if np.count_nonzero(counts) > 1:
            m = r.varint("ans word count", r.remaining // 4)
            words = np.frombuffer(bytes(r.take(4 * m, "ans words")), dtype="<u4").astype(np.uint32)
        r.expect_end("ans stream")
        return cls(n, counts.astype(np.int64), words)


def ans_encode(symbols: np.ndarray) -> AnsStream:
    """ANS-encode a 1-D stream of non-negative integer symbols with its empirical model.

    Spends about ``n * H + 32`` bits for the payload (H = empirical entropy), plus the count
    table. Deterministic: the same symbols give the same bytes.
    """
    s = np.asarray(symbols)
    if s.ndim != 1:
        raise ValueError(f"symbols: must be 1-D, got shape {s.shape}")
    n = int(s.size)
    if n == 0:
        return AnsStream(0, np.zeros(0, np.int64), np.zeros(0, np.uint32))
    counts = symbol_counts(s)
    if counts.size > MAX_ALPHABET:
        raise ValueError(f"symbols: largest symbol {counts.size - 1} exceeds {MAX_ALPHABET - 1}")
    present = np.flatnonzero(counts)
    if present.size == 1:
        return AnsStream(n, counts, np.zeros(0, np.uint32))
    import constriction

    rank = np.zeros(counts.size, dtype=np.int32)
    rank[present] = np.arange(present.size, dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(rank[s.astype(np.int64, copy=False)], _model(counts[present]))
    return AnsStream(n, counts, coder.get_compressed().astype(np.uint32))


def ans_decode_chunks(stream: AnsStream, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
    """Decode an :class:`AnsStream` in chunks of at most ``chunk`` int64 symbols (a decoder's
    memory then stays ``O(chunk)`` whatever ``n`` the stream declares).

    Raises :class:`CodingError` (while iterating) if the words are not a valid ANS stream of
    exactly ``n`` symbols under the stored model (constriction's errors are wrapped); the
    check that no coded word is left runs after the last chunk.
    """
    n = stream.n
    if n == 0:
        return
    present = np.flatnonzero(stream.counts)
    if present.size == 1:
        for a in range(0, n, chunk):
            yield np.full(min(chunk, n - a), int(present[0]), dtype=np.int64)
        return
    import constriction

    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(stream.words, np.uint32))
        model = _model(stream.counts[present])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # constriction: ValueError, or a Rust panic (BaseException)
        raise CodingError(f"ans stream corrupt: {exc}") from exc
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        try:
            ranks = np.asarray(coder.decode(model, m), dtype=np.int64)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raise CodingError(f"ans stream corrupt: {exc}") from exc
        if ranks.size != m or ranks.min() < 0 or ranks.max() >= present.size:
            raise CodingError("ans stream corrupt: decoded symbols out of range")
        yield present[ranks]
    if not coder.is_empty():
        raise CodingError("ans stream corrupt: coded words left after the last symbol")


def ans_decode(stream: AnsStream) -> np.ndarray:
    """Decode an :class:`AnsStream` back to its int64 symbols.

    Raises :class:`CodingError` if the words are not a valid ANS stream of exactly ``n``
    symbols under the stored model (constriction's errors are wrapped).
    """
    parts = list(ans_decode_chunks(stream, max(stream.n, 1)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
