"""Finding the code boundaries of a canonical Huffman bitstream in linear time with numpy,
whatever the stream's block layout.

Why this exists
---------------
A prefix-code bitstream is sequential: where code ``i + 1`` starts depends on the lengths of
all the codes before it. One symbol per Python step costs ~1 us per symbol; decoding the
stream's recorded blocks in lock step (one numpy step per symbol position, over all blocks)
is fast only when the writer cut the stream into many blocks. A valid file whose single block
holds every symbol made that decoder take one numpy step per symbol (173 s for a 524 KB file,
issue 19). The decoder here never trusts the block layout (the block table is only checked).

Algorithm
---------
1. **Virtual blocks by self-synchronisation.** The payload's ``T`` bits are cut into ``V``
   regions of ``S ~ sqrt(T)`` bits (1024 to 32768). From the first bit of every region but the first, a
   speculative parse runs ``W`` codes (all regions in lock step); Huffman codes
   self-synchronise (a parse started at a wrong bit soon falls onto the true code boundaries,
   Ferguson & Rabinowitz 1984), so the position ``v_k`` it reaches is almost always a true
   code start. Lane ``k`` then parses from ``v_k`` until it reaches ``v_{k+1}`` (all lanes in
   lock step, ``~S / mean code length`` numpy steps over ``V`` lanes, the same work as the old
   block decoder). A lane whose start is a true boundary and which lands *exactly* on
   ``v_{k+1}`` proves ``v_{k+1}`` true; chaining from ``v_0 = 0`` verifies the lanes.
2. **Guaranteed fallback: segmented all-offsets parse.** Where a link fails (the speculative
   parse had not synchronised; an adversary can build codes that never do), the true parse
   continues from the last proven position with :func:`parse_span`: for every bit position
   ``p`` the code that would start there has a length ``len[p]`` (a ``2**K``-entry table
   lookup, vectorised over all positions); the true starts are the path
   ``p -> p + len[p]`` from the proven position. Cutting the bits into chunks of ``C >= L``
   bits, a parse enters a chunk at one of the offsets ``[0, L)``; ``C`` lock-step numpy steps
   over all chunks propagate a bit mask over those entry offsets
   (``reach[o + len[o]] |= reach[o]``), which gives every chunk's exit for every entry; a
   scalar walk of ``T / C`` steps chains them, and the starts are the positions whose mask
   has the chunk's true entry bit. ``O(T)`` work, ``O(C + T / C)`` steps.

Both parts are ``O(T)``: step 1 costs at most ``V * (S + L)`` lane-steps and the fallback
about 15 array operations per bit (3-5x step 1 per symbol); the span of a fallback call
doubles with every failed link, so a stream that never synchronises costs ``O(log V)``
fallback calls covering the stream once, and one with rare failures a few short ones. Temporaries stay ``O(T)`` (``parse_span`` works in segments of
``SEGMENT_BITS``). This is the classic parallel decoding of prefix codes by
self-synchronisation (Klein & Wiseman 2003, "Parallel Huffman decoding with applications to
JPEG files") with an exact verification and a worst-case linear fallback, written so every
step is a numpy array operation; the package ships no compiled code.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from .bitpack import CodingError

__all__ = ["SEGMENT_BITS", "Tables", "decode_codes", "length_table", "parse_span", "payload_words"]

SEGMENT_BITS = 1 << 22  # bits per parse_span segment (bounds its temporaries at ~40 MB)
MAX_TABLE_BITS = 16
WARMUP_CODES = 32  # codes a speculative parse runs before its position is taken as a start


def payload_words(payload: bytes | memoryview, pad_bytes: int = 4) -> np.ndarray:
    """(nbytes + pad_bytes - 3,) int64: ``words[i]`` = payload bytes i..i+3, big-endian, zero
    past the end. A window of ``k <= 25`` bits at bit ``p`` is
    ``(words[p >> 3] >> (32 - k - (p & 7))) & (2**k - 1)``."""
    buf = np.frombuffer(payload, dtype=np.uint8).astype(np.int64)
    buf = np.concatenate([buf, np.zeros(max(4, pad_bytes), dtype=np.int64)])
    return (buf[:-3] << 24) | (buf[1:-2] << 16) | (buf[2:-1] << 8) | buf[3:]


class Tables:
    """Canonical Huffman decoding tables for the code lengths ``lengths`` (RFC 1951 3.2.2).

    ``first[l-1]``, ``rank0[l-1]``: first code and first canonical rank of length ``l``;
    ``limit[l-1]``: ``(first + count) << (L - l)`` (an ``L``-bit window ``w`` starts a code of
    length ``l`` for the first ``l`` with ``w < limit[l-1]``); ``syms``: the symbols in
    canonical order. ``t_len`` / ``t_sym``: length and symbol for every ``K``-bit prefix
    (``K = min(L, 16)``; ``t_len == 0`` where a code longer than ``K`` bits starts).
    """

    def __init__(self, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        L = self.L = int(lengths.max())
        bl_count = np.bincount(lengths, minlength=L + 1)[1 : L + 1]  # (L,) codes per length
        first = np.zeros(L, dtype=np.int64)
        code = 0
        for i in range(1, L):
            code = (code + int(bl_count[i - 1])) << 1
            first[i] = code
        self.first = first
        self.rank0 = np.concatenate([[0], np.cumsum(bl_count)[:-1]]).astype(np.int64)  # (L,)
        self.shift = L - np.arange(1, L + 1, dtype=np.int64)  # (L,)
        self.limit = (first + bl_count) << self.shift  # (L,) nondecreasing
        order = np.lexsort((np.arange(lengths.size), lengths))
        self.syms = order[lengths[order] > 0]  # (present,) symbols in canonical order
        self.K, self.t_len = length_table(self.limit, L)
        win = np.arange(1 << self.K, dtype=np.int64) << (L - self.K)  # (2**K,)
        A = int(self.syms.max()) + 1
        sym_dtype = np.uint8 if A <= 256 else np.uint16 if A <= 65536 else np.int32
        self.t_sym = self._symbols(win).astype(sym_dtype)

    def _symbols(self, win: np.ndarray) -> np.ndarray:
        """Symbol of the code at the start of each left-aligned ``L``-bit window."""
        li = np.minimum(np.searchsorted(self.limit, win, side="right"), self.L - 1)
        r = np.minimum(
            self.rank0[li] + (win >> self.shift[li]) - self.first[li], self.syms.size - 1
        )
        return self.syms[r]

    def lengths_at(self, words: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Length of the code starting at each bit position ``p`` (int64)."""
        K, L = self.K, self.L
        ln = self.t_len[(words[p >> 3] >> ((32 - K) - (p & 7))) & ((1 << K) - 1)].astype(np.int64)
        if K < L:
            long = np.flatnonzero(ln == 0)
            if long.size:
                q = p[long]
                win = (words[q >> 3] >> ((32 - L) - (q & 7))) & ((1 << L) - 1)
                ln[long] = np.minimum(np.searchsorted(self.limit, win, side="right"), L - 1) + 1
        return ln

    def step(self, words: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(length, symbol)`` of the code starting at each bit position ``p``."""
        K, L = self.K, self.L
        w = (words[p >> 3] >> ((32 - K) - (p & 7))) & ((1 << K) - 1)
        ln = self.t_len[w]
        sy = self.t_sym[w]
        if K < L:
            long = np.flatnonzero(ln == 0)
            if long.size:
                q = p[long]
                win = (words[q >> 3] >> ((32 - L) - (q & 7))) & ((1 << L) - 1)
                ln = ln.copy()
                ln[long] = np.minimum(np.searchsorted(self.limit, win, side="right"), L - 1) + 1
                sy = sy.copy()
                sy[long] = self._symbols(win)
        return ln, sy

    def symbols_at(self, words: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Symbols of the codes starting at the bit positions ``p`` (in chunks)."""
        out = np.empty(p.size, dtype=self.t_sym.dtype)
        for a in range(0, p.size, 1 << 18):
            out[a : a + (1 << 18)] = self.step(words, p[a : a + (1 << 18)])[1]
        return out


def length_table(limit: np.ndarray, L: int) -> tuple[int, np.ndarray]:
    """``(K, t_len)``: the code length for every ``K``-bit prefix (``K = min(L, 16)``);
    0 where the prefix starts a code longer than ``K`` bits. ``limit`` (L,) holds the canonical
    left-justified limits (an ``L``-bit window ``w`` starts a code of length ``l`` for the
    first ``l`` with ``w < limit[l - 1]``)."""
    K = min(L, MAX_TABLE_BITS)
    win = np.arange(1 << K, dtype=np.int64) << (L - K)  # (2**K,) left-aligned to L bits
    li = np.minimum(np.searchsorted(limit, win, side="right"), L - 1)
    return K, np.where(li < K, li + 1, 0).astype(np.uint8)


# ------------------------------------------------------------------ all-offsets parse


def _lengths_of_range(words: np.ndarray, lo: int, hi: int, tab: Tables) -> np.ndarray:
    """(hi - lo,) uint8 length of the code that would start at each bit of [lo, hi); ``lo`` a
    multiple of 8."""
    K, L = tab.K, tab.L
    b0, b1 = lo >> 3, (hi + 7) >> 3
    w = words[b0:b1]  # (nbytes,)
    out = np.empty((b1 - b0, 8), dtype=np.uint8)
    for r in range(8):  # bit offset inside the byte
        out[:, r] = tab.t_len[(w >> (32 - K - r)) & ((1 << K) - 1)]
    lens = out.reshape(-1)[: hi - lo]
    if K < L:
        long = np.flatnonzero(lens == 0)
        if long.size:
            lens[long] = tab.lengths_at(words, long + lo).astype(np.uint8)
    return lens


def _chunk_bits(total: int, L: int) -> int:
    c = 1 << max(6, math.ceil(math.log2(max(1.0, math.sqrt(total / 16)))))
    return max(c, 1 << math.ceil(math.log2(L)))


def _segment(lens: np.ndarray, entry: int, C: int, L: int) -> tuple[np.ndarray, int]:
    """Code starts (offsets into ``lens``) of the path entering at offset ``entry`` and the
    offset where it leaves the segment (>= len(lens)). ``len(lens)`` is a multiple of ``C``;
    ``entry < E = max(L, 8)`` (a segment starts on the byte holding its first code)."""
    E = max(L, 8)
    nch = lens.size // C
    offs = np.arange(C, dtype=np.int64)[:, None]
    # (C, nch) flat index of (offset + len, chunk) in `reach`
    tgt = (lens.reshape(nch, C).T.astype(np.int64) + offs) * nch + np.arange(nch)
    reach = np.zeros((C + L, nch), dtype=np.uint32)  # (offset, chunk): mask over entries
    reach[:E] = (np.uint32(1) << np.arange(E, dtype=np.uint32))[:, None]
    flat = reach.reshape(-1)
    for o in range(C):  # C lock-step numpy steps over all chunks
        t = tgt[o]
        flat[t] |= reach[o]
    # where the parse from each entry offset leaves each chunk: the row C + e' with its bit
    exits = np.zeros((nch, E), dtype=np.int64)
    bits = np.arange(E, dtype=np.uint32)
    for e2 in range(L):
        exits[((reach[C + e2][:, None] >> bits[None, :]) & 1).astype(bool)] = e2
    ex = exits.tolist()
    ent = [0] * nch
    e = entry
    for j in range(nch):  # one scalar step per chunk: T / C of them
        ent[j] = e
        e = ex[j][e]
    sel = np.uint32(1) << np.asarray(ent, dtype=np.uint32)  # (nch,)
    member = (reach[:C] & sel) != 0  # (C, nch)
    return np.flatnonzero(member.T), nch * C + e


def parse_span(
    words: np.ndarray, start: int, stop: int, total_bits: int, tab: Tables, max_codes: int
) -> tuple[np.ndarray, int]:
    """True code starts from the proven start ``start`` up to the first one ``>= stop``.

    Returns ``(starts, exit)``: the int64 starts in ``[start, exit)`` (``start`` first) and
    ``exit``, the first code start ``>= stop``. Bits past ``total_bits`` count as 1-bit codes
    (so a stream ends exactly at ``total_bits`` iff ``exit == total_bits`` for
    ``stop = total_bits``). Raises :class:`CodingError` past ``max_codes`` starts. ``O(stop -
    start)`` work, in segments of ``SEGMENT_BITS``.
    """
    L = tab.L
    C = _chunk_bits(min(stop - start, SEGMENT_BITS), L)
    seg = max(C, (SEGMENT_BITS // C) * C)
    parts: list[np.ndarray] = []
    found = 0
    pos = start
    while True:
        base = (pos // 8) * 8  # segments start on the byte holding their first code
        span = min(seg, -(-(stop - base) // C) * C)
        lens = np.ones(span, dtype=np.uint8)  # bits past the payload: 1-bit codes
        real = max(0, min(total_bits, base + span) - base)
        if real:
            lens[:real] = _lengths_of_range(words, base, base + real, tab)
        starts, leave = _segment(lens, pos - base, C, L)
        starts += base
        leave += base
        if leave >= stop:  # this segment reaches stop: cut at the first start >= stop
            i = int(np.searchsorted(starts, stop))
            if i < starts.size:
                leave = int(starts[i])
                starts = starts[:i]
        found += starts.size
        if found > max_codes:
            raise CodingError(f"huffman stream corrupt: more than {max_codes} codes")
        parts.append(starts)
        if leave >= stop:
            return np.concatenate(parts), leave
        pos = leave


# ------------------------------------------------------------------ lock-step lanes


def _lanes(
    words: np.ndarray, start: np.ndarray, end: np.ndarray, tab: Tables
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse every lane from ``start[k]`` until its position reaches ``end[k]``, all lanes in
    lock step (a lane that is done stays where it is until all are done).

    Returns ``(symbols, counts, exits)``: ``symbols[k, :counts[k]]`` are lane ``k``'s codes
    before its end, ``exits[k]`` its first position ``>= end[k]``.
    """
    p = start.copy()
    counts = np.zeros(start.size, dtype=np.int64)
    rows: list[np.ndarray] = []
    alive = p < end  # (V,)
    while alive.any():
        for _ in range(8):  # check for the end every 8 steps
            ln, sy = tab.step(words, p)
            rows.append(sy)
            p = np.where(alive, p + ln, p)
            counts += alive
            alive = p < end
    sym = np.ascontiguousarray(np.stack(rows).T) if rows else np.zeros((start.size, 0))
    return sym, counts, p


def _warmup(words: np.ndarray, start: np.ndarray, codes: int, cap: int, tab: Tables) -> np.ndarray:
    p = start.copy()
    for _ in range(codes):
        p = np.minimum(p + tab.lengths_at(words, p), cap)
    return p


def _region_bits(total: int) -> int:
    return int(min(1 << 15, max(1 << 10, 1 << round(math.log2(math.sqrt(max(total, 1)))))))


SMALL_BITS = 1 << 17  # streams this short are parsed by parse_span alone (measured faster)


def decode_codes(payload: bytes | memoryview, total_bits: int, n: int, tab: Tables) -> np.ndarray:
    """The ``n`` symbols of a canonical Huffman stream of ``total_bits`` payload bits. Raises
    :class:`CodingError` unless exactly ``n`` codes tile ``[0, total_bits)``.
    ``O(total_bits)`` work and memory, whatever the stream's block layout."""
    words = payload_words(payload, pad_bytes=8)
    if total_bits <= SMALL_BITS:
        starts, cur = parse_span(words, 0, total_bits, total_bits, tab, n)
        if starts.size != n or cur != total_bits:
            raise CodingError(
                f"huffman stream corrupt: {starts.size} codes ending at bit {cur}, expected "
                f"{n} codes tiling {total_bits} payload bits"
            )
        return tab.symbols_at(words, starts)
    S = _region_bits(total_bits)
    V = -(-total_bits // S)
    cand = np.arange(V, dtype=np.int64) * S  # (V,) region starts
    v = cand.copy()
    # speculative parses; W * L < S keeps v increasing
    v[1:] = _warmup(words, cand[1:], WARMUP_CODES, total_bits, tab)
    v = v[np.concatenate([[True], v[1:] < total_bits])]
    end = np.concatenate([v[1:], [total_bits]])  # (V,)
    lane_s, counts, exit_ = _lanes(words, v, end, tab)
    exit_l, end_l, v_l, count_l = exit_.tolist(), end.tolist(), v.tolist(), counts.tolist()
    parts: list[np.ndarray] = []
    found = cur = k = 0  # cur: the last proven code start, in lane k's region
    span = 1  # regions per fallback parse: doubles with every failed link, never resets
    while cur < total_bits:
        if cur == v_l[k]:  # lane k starts on a proven code start: all its codes are true
            part = lane_s[k, : count_l[k]]
            cur = exit_l[k]
        else:  # the link failed: parse the true path over the next `span` regions
            stop = end_l[min(k + span, len(v_l)) - 1]
            starts, cur = parse_span(words, cur, stop, total_bits, tab, n - found)
            part = tab.symbols_at(words, starts)
            span *= 2
        found += part.size
        if found > n:
            raise CodingError(f"huffman stream corrupt: more than {n} codes in the payload")
        parts.append(part)
        k = bisect.bisect_right(v_l, cur) - 1  # the region holding cur
    if found != n or cur != total_bits:
        raise CodingError(
            f"huffman stream corrupt: {found} codes ending at bit {cur}, expected {n} codes "
            f"tiling {total_bits} payload bits"
        )
    return np.concatenate(parts)
