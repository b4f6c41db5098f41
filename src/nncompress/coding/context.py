"""Context-modelled coding of a pruned, shared weight matrix: its significance map and its
weight codes, entropy-coded with ``constriction``'s ANS coder under semi-static context models.

Why contexts
------------
Deep Compression (Han et al. 2016) stores the positions of the surviving weights as relative
indices and Huffman-codes them as if every gap were independent and identically distributed.
In a pruned layer they are not: whole rows (dead output units) and whole columns (inputs
nobody uses: the border pixels of an image) are empty, and the density of the survivors varies
a lot from row to row and from column to column. DeepCABAC (Wiedemann et al. 2020, the MPEG-7
NNR standard) codes the significance of every weight with a context-adaptive binary
arithmetic coder for that reason. On the magnitude-pruned Fashion-MNIST LeNet-300-100 (fc1,
8% kept), the relative indices cost 4.71 bits per nonzero after Huffman; a significance bit
per position whose probability depends on the (row density class, column density class) of
its position costs 4.12 + 0.13 (class maps) bits.

The model (all of it stored in the stream, so decoding needs nothing else)
-----------------------------------------------------------------------
The weight is viewed as a matrix ``(R, C) = (shape[0], prod(shape[1:]))``: rows are output
units, columns inputs (times kernel positions).

1. *Class maps.* Every row gets a class in ``[0, nr]`` and every column one in ``[0, nc]``;
   class 0 means dead (no nonzero): dead rows and columns are thereby coded once, and none of
   their positions is coded. The live ones are classed by their density (quantiles). Both
   maps are ANS-coded with their class counts as model.
2. *Significance map.* The positions of context ``(a, b)`` (row class, column class) form a
   submatrix (its rows by its columns, row-major). Each row of it is cut into symbols of
   ``g`` consecutive bits (``g`` = 1, 2, 4 or 8; zero-padded at the row end), and the
   symbols of the context are coded with their counts (stored) as model: a semi-static model
   whose cost is the context's empirical entropy plus its table. ``g = 1`` is a binary
   significance flag per position; ``g > 1`` also captures the dependence between
   neighbouring positions and decodes ``g`` positions per coded symbol (the encoder picks
   ``g`` by size: a bigger table pays off on big layers). Contexts with no nonzero cost
   nothing.
3. *Weight codes.* One code per nonzero, in row-major order of the matrix, each group of a
   code context (``none``: one group; ``row`` / ``col``: the row / column class of the
   weight; ``both``) coded with its own code counts (symbols absent from a group cost nothing).

Every part is decoded with one ``constriction`` call per context with a fixed categorical
model (no per-symbol model, no Python step per symbol), so decoding is linear in the matrix
size with the constant of constriction's ANS decoder, whatever the content. Contexts that
depend on already decoded neighbours inside a row at ``g = 1`` (the left neighbour, the
previous code) were measured on the same layer: they save a further 2.3% (map) and 3% (codes,
before the cost of a 16x16 table) but make decoding sequential, so they are not used; ``g >
1`` captures the left-neighbour dependence inside each symbol instead.

The encoder picks the classes, ``g`` and the code context per tensor by the exact model cost
(:func:`best_context_config`), then codes once.

Serialised form (LEB128 varints unless noted)::

    u8 nr, u8 nc, u8 code_context (0 none, 1 row, 2 col, 3 both), u8 g (1, 2, 4, 8)
    row class counts   nr + 1 varints (sum R)
    col class counts   nc + 1 varints (sum C)
    u8 wm, map counts  nr * nc * (2**g - 1) values of wm bits (pack_bits): per context (a, b)
                       in row-major order, the counts of the symbols 1 .. 2**g - 1 (the count
                       of symbol 0 is implied by the context's size)
    u8 wc, code counts G * k values of wc bits, G = code groups (1, nr, nc or nr * nc)
    varint m, words    m little-endian uint32: the ANS stack (decode order: row classes,
                       column classes, map context by context, codes group by group)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bitpack import ByteReader, CodingError, pack_bits, write_uvarint

__all__ = [
    "CODE_CONTEXTS",
    "MAP_BITS",
    "ContextConfig",
    "ContextStream",
    "best_context_config",
    "context_decode",
    "context_encode",
    "matrix_shape",
]

CODE_CONTEXTS = ("none", "row", "col", "both")
MAP_BITS = (1, 2, 4, 8)
MAX_CLASSES = 32
CLASS_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16)
SPEED_TOLERANCE = 0.002  # relative size a faster (wider) map symbol may cost


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(R, C)``: the matrix view of a weight of ``shape`` (rows = ``shape[0]``)."""
    if len(shape) < 2:
        raise ValueError(f"shape={shape}: the context coder needs a weight of 2+ dimensions")
    return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


@dataclass(frozen=True)
class ContextConfig:
    """Model of :func:`context_encode`: ``row_classes`` / ``col_classes`` live density classes
    (1..32), the ``code_context`` of the weight codes (one of ``CODE_CONTEXTS``) and
    ``map_bits``, the significance bits per coded map symbol (one of ``MAP_BITS``)."""

    row_classes: int = 4
    col_classes: int = 4
    code_context: str = "none"
    map_bits: int = 1

    def __post_init__(self) -> None:
        for name in ("row_classes", "col_classes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_CLASSES:
                raise ValueError(f"{name}={v!r}: must be an integer in [1, {MAX_CLASSES}]")
        if self.code_context not in CODE_CONTEXTS:
            raise ValueError(f"code_context={self.code_context!r}: must be one of {CODE_CONTEXTS}")
        if self.map_bits not in MAP_BITS:
            raise ValueError(f"map_bits={self.map_bits!r}: must be one of {MAP_BITS}")


def _info_bits(counts: np.ndarray) -> float:
    """Empirical information content (bits) of symbols with these counts."""
    c = np.asarray(counts)
    c = c[c > 0].astype(np.float64)
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def _binary_info(ones: np.ndarray, sizes: np.ndarray) -> float:
    o = ones.astype(np.float64)
    n = sizes.astype(np.float64)
    z = n - o
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(o > 0, o * np.log2(o / n), 0.0) + np.where(z > 0, z * np.log2(z / n), 0.0)
    return float(-h.sum())


def _packed_bits(values: np.ndarray) -> int:
    w = int(values.max()).bit_length() if values.size else 0
    return 8 + -(-values.size * w // 8) * 8


class _Matrix:
    """Per-matrix statistics shared by every candidate model."""

    def __init__(self, codes: np.ndarray) -> None:
        self.R, self.C = codes.shape
        self.mask = codes >= 0  # (R, C)
        self.rows_nz, self.cols_nz = np.nonzero(self.mask)  # row-major order
        self.vals = codes[self.mask]  # (nnz,)
        self.row_n = np.bincount(self.rows_nz, minlength=self.R)  # (R,)
        self.col_n = np.bincount(self.cols_nz, minlength=self.C)  # (C,)

    def classes(self, n_row: int, n_col: int) -> tuple[np.ndarray, int, np.ndarray, int]:
        rc, nr = _classes(self.row_n / max(self.C, 1), n_row)
        cc, nc = _classes(self.col_n / max(self.R, 1), n_col)
        return rc, nr, cc, nc


def _classes(density: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Class 0 for dead entries (density 0), 1..n' by quantiles of the live densities (classes
    left empty by ties are dropped)."""
    out = np.zeros(density.size, dtype=np.int64)
    live = density > 0
    d = density[live]
    if d.size == 0:
        return out, 1
    edges = np.quantile(d, np.arange(1, n) / n) if n > 1 else np.zeros(0)
    cls = np.searchsorted(edges, d, side="left")  # (live,) in 0..n-1
    used, cls = np.unique(cls, return_inverse=True)
    out[live] = cls.reshape(-1) + 1
    return out, int(used.size)


def _code_groups(ctx: str, rc_nz: np.ndarray, cc_nz: np.ndarray, nr: int, nc: int):
    if ctx == "none":
        return np.zeros(rc_nz.size, dtype=np.int64), 1
    if ctx == "row":
        return rc_nz - 1, nr
    if ctx == "col":
        return cc_nz - 1, nc
    return (rc_nz - 1) * nc + cc_nz - 1, nr * nc


def _group_slices(group: np.ndarray, G: int) -> list[np.ndarray]:
    """Indices of the members of each group 0..G-1, each in increasing order."""
    order = np.argsort(group, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=G))])
    return [order[bounds[g] : bounds[g + 1]] for g in range(G)]


def _map_symbols(sub: np.ndarray, g: int) -> np.ndarray:
    """(rows, cols) bool -> the int64 symbols of ``g`` bits (first bit most significant) of
    each row, rows zero-padded to a multiple of ``g``."""
    if g == 1 or sub.size == 0:
        return sub.reshape(-1).astype(np.int64)
    pad = -sub.shape[1] % g
    if pad:
        sub = np.concatenate([sub, np.zeros((sub.shape[0], pad), dtype=bool)], axis=1)
    weights = 1 << np.arange(g - 1, -1, -1, dtype=np.int64)  # (g,)
    return (sub.reshape(sub.shape[0], -1, g).astype(np.int64) @ weights).reshape(-1)


@dataclass
class _Model:
    """One candidate model of one matrix (what the table stores, and the coded parts)."""

    config: ContextConfig
    rc: np.ndarray  # (R,) row class 0..nr
    cc: np.ndarray  # (C,) column class 0..nc
    nr: int
    nc: int
    row_counts: np.ndarray  # (nr + 1,)
    col_counts: np.ndarray  # (nc + 1,)
    map_counts: np.ndarray  # (nr * nc, 2**g) symbol counts per context
    code_group: np.ndarray  # (nnz,) code group of each nonzero (row-major)
    n_groups: int
    code_counts: np.ndarray  # (G, k)
    map_parts: list[np.ndarray] | None = None  # symbols per context (encoder only)

    def table(self) -> bytes:
        out = bytearray([self.nr, self.nc, CODE_CONTEXTS.index(self.config.code_context)])
        out.append(self.config.map_bits)
        for v in (*self.row_counts.tolist(), *self.col_counts.tolist()):
            out += write_uvarint(int(v))
        for arr in (self.map_counts[:, 1:].ravel(), self.code_counts.ravel()):
            w = int(arr.max()).bit_length() if arr.size else 0
            out.append(w)
            out += pack_bits(arr.astype(np.int64), w)
        return bytes(out)

    def info_bits(self) -> dict[str, float]:
        return {
            "classes": _info_bits(self.row_counts) + _info_bits(self.col_counts),
            "map": float(sum(_info_bits(c) for c in self.map_counts)),
            "codes": float(sum(_info_bits(c) for c in self.code_counts)),
        }


def _model(mx: _Matrix, k: int, config: ContextConfig, with_parts: bool) -> _Model:
    rc, nr, cc, nc = mx.classes(config.row_classes, config.col_classes)
    rc_nz, cc_nz = rc[mx.rows_nz], cc[mx.cols_nz]
    g = config.map_bits
    row_counts = np.bincount(rc, minlength=nr + 1)
    col_counts = np.bincount(cc, minlength=nc + 1)
    parts = None
    if g == 1 and not with_parts:  # counts without building the symbols
        ones = np.bincount((rc_nz - 1) * nc + cc_nz - 1, minlength=nr * nc)
        sizes = np.outer(row_counts[1:], col_counts[1:]).ravel()
        map_counts = np.stack([sizes - ones, ones], axis=1)
    else:
        rows_of = [np.flatnonzero(rc == a) for a in range(1, nr + 1)]
        cols_of = [np.flatnonzero(cc == b) for b in range(1, nc + 1)]
        parts = [_map_symbols(mx.mask[np.ix_(ra, cb)], g) for ra in rows_of for cb in cols_of]
        map_counts = np.stack([np.bincount(p, minlength=1 << g) for p in parts])
    group, G = _code_groups(config.code_context, rc_nz, cc_nz, nr, nc)
    code_counts = np.bincount(group * k + mx.vals, minlength=G * k).reshape(G, k)
    return _Model(
        config, rc, cc, nr, nc, row_counts, col_counts, map_counts, group, G, code_counts, parts
    )


def _estimate_bits(m: _Model) -> float:
    """Model cost in bits: the table plus the information content of every part (the ANS
    coder spends this plus at most ~32 bits)."""
    return 8.0 * len(m.table()) + 32.0 + sum(m.info_bits().values())


def best_context_config(
    codes: np.ndarray, k: int, choices: tuple[int, ...] = CLASS_CHOICES
) -> tuple[ContextConfig, float]:
    """The cheapest :class:`ContextConfig` for ``codes`` (R, C) (-1 = zero): first the row and
    column classes (over ``choices``) with binary significance flags and no code context, then
    the code context and the map symbol width for those classes (the widest width within
    ``SPEED_TOLERANCE`` of the smallest size). Returns it with its estimated size in bits
    (exact up to the ANS rounding, a few bits)."""
    mx = _Matrix(np.asarray(codes, dtype=np.int64))
    best: tuple[float, ContextConfig] | None = None
    for nr in choices:
        for nc in choices:
            cfg = ContextConfig(nr, nc)
            bits = _estimate_bits(_model(mx, k, cfg, False))
            if best is None or bits < best[0]:
                best = (bits, cfg)
    assert best is not None
    nr, nc = best[1].row_classes, best[1].col_classes
    cands = []
    for ctx in CODE_CONTEXTS:
        for g in MAP_BITS:
            cfg = ContextConfig(nr, nc, ctx, g)
            cands.append((_estimate_bits(_model(mx, k, cfg, g > 1)), cfg))
    low = min(bits for bits, _ in cands)
    # within 0.2% of the smallest, prefer the widest map symbols: g positions per decoded
    # symbol make decoding up to g times faster for a negligible size
    near = [(bits, cfg) for bits, cfg in cands if bits <= low * (1 + SPEED_TOLERANCE)]
    bits, cfg = max(near, key=lambda bc: (bc[1].map_bits, -bc[0]))
    return cfg, bits


def _categorical(counts: np.ndarray):
    import constriction

    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


@dataclass(frozen=True)
class ContextStream:
    """A context-coded weight matrix: its table and ANS words, with the size of each part
    (``part_bits``: information content in bits of 'classes', 'map' and 'codes' under the
    coded model; ``part_entropy``: their order-0 empirical entropy in bits per symbol without
    contexts -- a flag per position for the map over the whole matrix, the code histogram for
    the codes; ``part_symbols``: symbols of each part in that order-0 view)."""

    table: bytes = field(repr=False)
    words: np.ndarray = field(repr=False)
    config: ContextConfig | None = None
    part_bits: dict[str, float] = field(default_factory=dict)
    part_entropy: dict[str, float] = field(default_factory=dict)
    part_symbols: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return self.table + write_uvarint(int(self.words.size)) + self.words.astype("<u4").tobytes()

    @property
    def payload_bits(self) -> int:
        return 32 * int(self.words.size)

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


def _report(m: _Model, vals: np.ndarray, k: int, R: int, C: int):
    nnz = int(vals.size)
    p = nnz / (R * C) if R * C else 0.0
    h0 = float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))) if 0 < p < 1 else 0.0
    entropy = {
        "classes": (_info_bits(m.row_counts) + _info_bits(m.col_counts)) / max(R + C, 1),
        "map": h0,
        "codes": _info_bits(np.bincount(vals, minlength=k)) / nnz if nnz else 0.0,
    }
    return m.info_bits(), entropy, {"classes": R + C, "map": R * C, "codes": nnz}


def context_encode(codes: np.ndarray, k: int, config: ContextConfig | None = None) -> ContextStream:
    """Code a weight matrix given as ``codes`` (R, C): -1 for a zero, else its code in
    ``[0, k)``. ``config=None`` picks the cheapest model (:func:`best_context_config`)."""
    import constriction

    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes: must be 2-D (R, C), got shape {codes.shape}")
    if codes.size and (codes.min() < -1 or codes.max() >= k):
        raise ValueError(f"codes: must be -1 (zero) or in [0, {k})")
    if config is None:
        config = best_context_config(codes, k)[0]
    mx = _Matrix(codes)
    m = _model(mx, k, config, True)
    parts: list[tuple[np.ndarray, np.ndarray]] = [(m.rc, m.row_counts), (m.cc, m.col_counts)]
    parts += list(zip(m.map_parts or [], m.map_counts, strict=True))
    for g, sel in enumerate(_group_slices(m.code_group, m.n_groups)):
        parts.append((mx.vals[sel], m.code_counts[g]))
    coder = constriction.stream.stack.AnsCoder()
    for sym, counts in reversed(parts):  # a stack: the last part decoded is encoded first
        present = np.flatnonzero(counts)
        if present.size < 2:
            continue  # deterministic: nothing to code
        rank = np.zeros(counts.size, dtype=np.int32)
        rank[present] = np.arange(present.size, dtype=np.int32)
        coder.encode_reverse(rank[sym], _categorical(counts[present]))
    words = coder.get_compressed().astype(np.uint32)
    bits, entropy, symbols = _report(m, mx.vals, k, *codes.shape)
    used = ContextConfig(m.nr, m.nc, config.code_context, config.map_bits)  # as stored
    return ContextStream(m.table(), words, used, bits, entropy, symbols)


def _decode_part(coder, counts: np.ndarray, n: int, what: str) -> np.ndarray:
    """Decode ``n`` symbols of the model ``counts``; their histogram must equal ``counts``."""
    present = np.flatnonzero(counts)
    if present.size == 0:
        return np.zeros(0, dtype=np.int32)
    if present.size == 1:
        return np.full(n, int(present[0]), dtype=np.int32)
    try:
        # constriction returns ranks in [0, len(present)) (it cannot produce others)
        out = np.asarray(coder.decode(_categorical(counts[present]), n))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # constriction: ValueError, or a Rust panic (BaseException)
        raise CodingError(f"context stream corrupt ({what}): {exc}") from exc
    if present[-1] != present.size - 1:  # absent symbols below the largest: map ranks back
        out = present.astype(np.int32)[out]
    if counts.size == 2:
        ok = out.size == n and int(np.count_nonzero(out)) == int(counts[1])
    else:
        ok = out.size == n and np.array_equal(np.bincount(out, minlength=counts.size), counts)
    if not ok:
        raise CodingError(f"context stream corrupt ({what}): counts do not match the model")
    return out


def _read_table(r: ByteReader, rows: int, cols: int, k: int):
    nr, nc = r.u8("context row classes"), r.u8("context column classes")
    ctx_id, g = r.u8("context code context"), r.u8("context map bits")
    if not (1 <= nr <= MAX_CLASSES and 1 <= nc <= MAX_CLASSES):
        raise CodingError(f"context table: nr={nr}, nc={nc} must be in [1, {MAX_CLASSES}]")
    if ctx_id >= len(CODE_CONTEXTS) or g not in MAP_BITS:
        raise CodingError(f"context table: code context {ctx_id} or map bits {g} unknown")
    row_counts = np.array([r.varint("row class count", rows) for _ in range(nr + 1)])
    col_counts = np.array([r.varint("column class count", cols) for _ in range(nc + 1)])
    if row_counts.sum() != rows or col_counts.sum() != cols:
        raise CodingError("context table: class counts do not add up to the matrix shape")
    wm = r.u8("map count width")
    if wm > 32:
        raise CodingError(f"map count width={wm}: must be <= 32")
    rest = r.packed(nr * nc * ((1 << g) - 1), wm, "map counts").reshape(nr * nc, -1)
    # symbols per context: its rows times ceil(its columns / g)
    n_sym = np.outer(row_counts[1:], -(-col_counts[1:] // g)).ravel()  # (nr * nc,)
    zero = n_sym - rest.sum(1)
    if np.any(zero < 0):
        raise CodingError("context table: map counts exceed the size of their context")
    map_counts = np.concatenate([zero[:, None], rest], axis=1)  # (nr * nc, 2**g)
    G = {"none": 1, "row": nr, "col": nc, "both": nr * nc}[CODE_CONTEXTS[ctx_id]]
    wc = r.u8("code count width")
    if wc > 32:
        raise CodingError(f"code count width={wc}: must be <= 32")
    code_counts = r.packed(G * k, wc, "code counts").reshape(G, k)
    cfg = ContextConfig(nr, nc, CODE_CONTEXTS[ctx_id], g)
    return cfg, row_counts, col_counts, map_counts, n_sym, code_counts


def context_decode(
    data: bytes | memoryview, rows: int, cols: int, k: int, nnz: int
) -> tuple[np.ndarray, np.ndarray, ContextStream]:
    """Decode :meth:`ContextStream.to_bytes` of an ``(rows, cols)`` matrix with ``nnz``
    nonzeros and codes below ``k``: ``(mask, codes, stream)``: ``mask`` (rows, cols) bool,
    ``codes`` (nnz,) int32, the code of each nonzero in row-major order. Every table value is
    checked against the shape before anything is decoded (no part can declare more symbols
    than the matrix holds), each part's decoded histogram must equal its model's counts, and
    padding bits must be zero. Raises :class:`CodingError`."""
    import constriction

    r = ByteReader(data)
    cfg, row_counts, col_counts, map_counts, n_sym, code_counts = _read_table(r, rows, cols, k)
    nr, nc, g = cfg.row_classes, cfg.col_classes, cfg.map_bits
    popcount = np.array([bin(v).count("1") for v in range(1 << g)])  # (2**g,)
    if int((map_counts * popcount).sum()) != nnz or int(code_counts.sum()) != nnz:
        raise CodingError(f"context table: its counts do not describe {nnz} nonzeros")
    table_len = r.pos
    m_words = r.varint("context word count", r.remaining // 4)
    words = np.frombuffer(bytes(r.take(4 * m_words, "context words")), dtype="<u4")
    r.expect_end("context stream")
    coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, np.uint32))
    rc = _decode_part(coder, row_counts, rows, "row classes")
    cc = _decode_part(coder, col_counts, cols, "column classes")
    rows_of = [np.flatnonzero(rc == a) for a in range(1, nr + 1)]
    cols_of = [np.flatnonzero(cc == b) for b in range(1, nc + 1)]
    mask = np.zeros((rows, cols), dtype=bool)
    unpack = ((np.arange(1 << g)[:, None] >> np.arange(g - 1, -1, -1)) & 1).astype(bool)
    for i, (ra, cb) in enumerate((ra, cb) for ra in rows_of for cb in cols_of):
        if map_counts[i, 0] == n_sym[i]:
            continue  # no nonzero in this context
        sym = _decode_part(coder, map_counts[i], int(n_sym[i]), "significance map")
        bits = unpack[sym].reshape(ra.size, -1)  # (rows, padded cols)
        if bits.shape[1] != cb.size:
            if bits[:, cb.size :].any():
                raise CodingError("context stream corrupt: nonzero padding bits in the map")
            bits = bits[:, : cb.size]
        if ra.size == rows and cb.size == cols:
            mask = np.ascontiguousarray(bits)  # one context covering the whole matrix
        else:
            mask[np.ix_(ra, cb)] = bits
    ctx = cfg.code_context
    if ctx == "none":
        group, G = np.zeros(nnz, dtype=np.int64), 1
        vals = _decode_part(coder, code_counts[0], nnz, "codes")
    else:
        rows_nz, cols_nz = np.nonzero(mask)
        group, G = _code_groups(ctx, rc[rows_nz], cc[cols_nz], nr, nc)
        vals = np.empty(nnz, dtype=np.int32)
        for j, sel in enumerate(_group_slices(group, G)):
            if sel.size != int(code_counts[j].sum()):
                raise CodingError(f"context table: code group {j} does not match the map")
            vals[sel] = _decode_part(coder, code_counts[j], sel.size, "codes")
    if not coder.is_empty():
        raise CodingError("context stream corrupt: coded words left after the last symbol")
    m = _Model(cfg, rc, cc, nr, nc, row_counts, col_counts, map_counts, group, G, code_counts)
    bits_, entropy, symbols = _report(m, vals, k, rows, cols)
    stream = ContextStream(
        bytes(data[:table_len]), words.astype(np.uint32), cfg, bits_, entropy, symbols
    )
    return mask, vals, stream
