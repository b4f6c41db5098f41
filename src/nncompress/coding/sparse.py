"""Relative-index sparse storage of a pruned layer (Deep Compression, Han et al. ICLR 2016, 3).

A pruned layer is stored as its nonzeros in a flattening order (CSR-like row-major or CSC-like
column-major), and for each nonzero the *relative* index: the number of zeros skipped since
the previous nonzero (``gap_i = p_i - p_{i-1} - 1`` with ``p_{-1} = -1``), stored in ``b``
bits (8 for conv and 5 for FC layers in the paper).

Fillers. A gap can exceed what ``b`` bits hold. We reserve the largest ``b``-bit value
``M = 2**b - 1`` as the *filler*: an index entry equal to ``M`` means "skip M zeros, no weight
here". Real gaps are therefore stored as values in ``[0, M-1]``, and a gap ``g`` becomes
``g // M`` fillers followed by one real entry ``g % M``. Han et al. instead store a filler as
an ordinary entry whose weight is zero, which costs a weight code too; with a reserved index
value the weight-code stream holds exactly one code per nonzero and never a filler, so the
weight codes need only ``ceil(log2 k)`` bits for ``k`` shared values (no extra zero code).
Trailing zeros after the last nonzero need no entry: the decoder knows the layer's size.

Decoding: with ``step_j = e_j + 1`` for a real entry and ``step_j = M`` for a filler, the
position of real entry ``j`` is ``cumsum(step)_j - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bitpack import CodingError

__all__ = [
    "MAX_INDEX_BITS",
    "RelativeIndex",
    "flatten_order",
    "relative_index_decode",
    "relative_index_encode",
    "unflatten_order",
]

MAX_INDEX_BITS = 16
ORDERS = ("C", "F")


@dataclass(frozen=True)
class RelativeIndex:
    """Relative-index entries of one flattened layer.

    Attributes
    ----------
    entries : (n_nonzero + n_fillers,) values in [0, 2**index_bits - 1]; the top value is a filler.
    index_bits : b, bits per entry.
    numel : length of the flattened layer.
    n_nonzero : number of real entries (= nonzeros).
    n_fillers : number of filler entries.
    """

    entries: np.ndarray = field(repr=False)
    index_bits: int
    numel: int
    n_nonzero: int
    n_fillers: int

    @property
    def fixed_bits(self) -> int:
        """Bits with every entry stored in ``index_bits`` bits ("after P+Q" in the paper)."""
        return int(self.entries.size) * self.index_bits


def _check_bits(index_bits: int) -> int:
    if not isinstance(index_bits, int | np.integer) or not 1 <= index_bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits={index_bits!r}: must be an integer in [1, {MAX_INDEX_BITS}]")
    return int(index_bits)


def relative_index_encode(
    mask_or_positions: np.ndarray, index_bits: int, numel: int | None = None
) -> RelativeIndex:
    """Relative indices (zeros skipped before each nonzero) with filler entries.

    Parameters
    ----------
    mask_or_positions : a flat boolean mask (True = nonzero kept), or the strictly increasing
        integer positions of the nonzeros.
    index_bits : b in [1, 16]; entries are in [0, 2**b - 1], the top value being a filler.
    numel : length of the flattened layer (required for positions; the mask's length otherwise).
    """
    b = _check_bits(index_bits)
    a = np.asarray(mask_or_positions)
    if a.ndim != 1:
        raise ValueError(f"mask_or_positions: must be 1-D, got shape {a.shape}")
    if a.dtype == np.bool_:
        if numel is not None and numel != a.size:
            raise ValueError(f"numel={numel}: the mask has {a.size} entries")
        numel = a.size
        pos = np.flatnonzero(a)
    else:
        if numel is None:
            raise ValueError("numel: required when positions are given")
        if a.size and a.dtype.kind not in "ui":
            raise ValueError(f"positions: must be integers, got dtype {a.dtype}")
        pos = a.astype(np.int64)
        if pos.size and (pos[0] < 0 or pos[-1] >= numel or np.any(np.diff(pos) <= 0)):
            raise ValueError(f"positions: must be strictly increasing in [0, {numel})")
    M = (1 << b) - 1
    gaps = np.diff(pos, prepend=-1) - 1  # (nnz,) zeros skipped before each nonzero
    fill = gaps // M  # (nnz,)
    per = fill + 1
    entries = np.full(int(per.sum()), M, dtype=np.int64)
    entries[np.cumsum(per) - 1] = gaps - fill * M  # real entries in [0, M-1]
    return RelativeIndex(entries, b, int(numel), int(pos.size), int(fill.sum()))


def relative_index_decode(entries: np.ndarray, index_bits: int, numel: int) -> np.ndarray:
    """Positions (int64, increasing) of the nonzeros from relative-index ``entries``.

    Raises :class:`CodingError` if an entry is out of range or a position falls outside
    ``[0, numel)``.
    """
    b = _check_bits(index_bits)
    M = (1 << b) - 1
    e = np.asarray(entries, dtype=np.int64)
    if e.size and (e.min() < 0 or e.max() > M):
        raise CodingError(f"relative index entries must be in [0, {M}] for {b} index bits")
    real = e < M
    steps = np.where(real, e + 1, M)  # (n_entries,)
    ends = np.cumsum(steps) - 1
    if e.size and not real[-1]:
        raise CodingError("relative index ends with a filler (an encoder never writes one)")
    if e.size and ends[-1] >= numel:
        raise CodingError(f"relative index runs past the end of the layer ({numel} elements)")
    return ends[real]


def flatten_order(shape: tuple[int, ...], order: str) -> np.ndarray | None:
    """Permutation used to flatten a tensor of ``shape`` ('C' row-major = CSR-like, 'F'
    column-major = CSC-like for a matrix). Returns ``None`` for 'C' (identity)."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: must be one of {ORDERS}")
    return None if order == "C" else tuple(range(len(shape) - 1, -1, -1))


def flatten(a: np.ndarray, order: str) -> np.ndarray:
    """Flatten ``a`` in ``order`` ('C' or 'F')."""
    flatten_order(a.shape, order)
    return a.ravel(order=order)


def unflatten_order(flat: np.ndarray, shape: tuple[int, ...], order: str) -> np.ndarray:
    """Inverse of :func:`flatten`: a C-contiguous array of ``shape``."""
    flatten_order(shape, order)
    return np.ascontiguousarray(flat.reshape(shape, order=order))
