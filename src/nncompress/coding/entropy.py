"""Empirical entropy of a symbol stream: the lower bound any order-0 coder can reach.

For a stream with symbol counts c_s (sum n), the empirical (order-0 Shannon) entropy is

    H = - sum_s (c_s / n) * log2(c_s / n)      bits per symbol,

and ``n * H`` bits is the least an i.i.d. (memoryless) code spends on the stream, tables not
counted. Huffman coding reaches within 1 bit/symbol of it, arithmetic/ANS coding within a few
bits per stream (Deep Compression, Han et al. ICLR 2016, section 4, uses Huffman).
"""

from __future__ import annotations

import numpy as np

__all__ = ["empirical_entropy", "symbol_counts"]


def symbol_counts(symbols: np.ndarray) -> np.ndarray:
    """Counts of each symbol value 0..max (``np.bincount``); empty array for no symbols."""
    s = np.asarray(symbols)
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    if s.dtype.kind not in "ui" or int(s.min()) < 0:
        raise ValueError("symbols: must be non-negative integers")
    return np.bincount(s.ravel().astype(np.int64, copy=False))


def empirical_entropy(symbols_or_counts: np.ndarray, *, counts: bool = False) -> float:
    """Order-0 empirical entropy in bits per symbol (0.0 for an empty or constant stream).

    Parameters
    ----------
    symbols_or_counts : the symbols (non-negative ints), or their counts when ``counts=True``.
    """
    c = (
        np.asarray(symbols_or_counts, dtype=np.float64)
        if counts
        else symbol_counts(symbols_or_counts).astype(np.float64)
    )
    c = c[c > 0]
    n = c.sum()
    if n == 0:
        return 0.0
    p = c / n
    return float(max(0.0, -(p * np.log2(p)).sum()))
