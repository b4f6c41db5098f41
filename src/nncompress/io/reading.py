"""Pieces every ``.ncz`` scheme's reader shares: header field readers (each failure a
:class:`~nncompress.io.FormatError` naming the field), a taker of exact symbol counts from a
chunked stream, and the walk over a relative-index stream (Han et al., ICLR 2016, section 2:
zeros skipped since the previous nonzero, filler entries for long gaps)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .format import _fail
from .report import TensorReport


def _req(entry: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in entry:
        raise _fail(f"{where}: field '{key}' missing")
    v = entry[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise _fail(f"{where}: field '{key}'={v!r} has the wrong type")
    return v


def _req_int(entry: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = _req(entry, key, int, where)
    if not lo <= v <= hi:
        raise _fail(f"{where}: {key}={v} outside [{lo}, {hi}]")
    return v


class _Taker:
    """Takes exactly ``r`` symbols at a time from a stream's chunks."""

    def __init__(self, chunks) -> None:
        self._it = iter(chunks)
        self._buf = np.zeros(0, dtype=np.int64)

    def take(self, r: int, what: str) -> np.ndarray:
        parts, have = [self._buf], self._buf.size
        while have < r:
            nxt = next(self._it, None)
            if nxt is None:
                raise _fail(f"{what}: stream ended early")
            parts.append(nxt)
            have += nxt.size
        cat = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._buf = cat[r:]
        return cat[:r]

    def finish(self, what: str) -> None:
        """Exhaust the stream (runs its end checks); nothing may be left."""
        left = self._buf.size + sum(c.size for c in self._it)
        if left:
            raise _fail(f"{what}: {left} symbols left over")


def relative_positions(
    index: Any, shape: tuple, nnz: int, b: int, order: str, with_report: bool, where: str
) -> Iterator[np.ndarray]:
    """Row-major positions of the nonzeros, a chunk of the ``index`` stream at a time.

    Each entry ``v < 2**b - 1`` ends a run of ``v`` zeros and a nonzero; the filler
    ``2**b - 1`` skips ``2**b - 1`` zeros. Positions count in ``order`` ("C" or "F") and are
    returned in C order. Raises when the runs pass the end of the tensor, the stream ends with
    a filler (an encoder never writes one) or the count of nonzeros differs from ``nnz``.
    """
    numel = math.prod(shape)
    M = (1 << b) - 1  # the filler
    base = found = 0  # base: position after the last entry's run
    ends_with_filler = False
    for ent in index.chunks(count=with_report):
        if not ent.size:
            continue
        real = ent < M
        ends = np.cumsum(np.where(real, ent + 1, M)) + (base - 1)  # (m,) last position of each
        base = int(ends[-1]) + 1
        ends_with_filler = not bool(real[-1])
        if base > numel:
            raise _fail(f"{where} index: runs past the end of the tensor ({numel} elements)")
        pos = ends[real]  # (r,) positions in `order`
        found += pos.size
        if found > nnz:
            raise _fail(f"{where}: index stream holds more than the header's nnz={nnz} nonzeros")
        if order == "F" and len(shape) > 1:  # column-major position -> row-major position
            pos = np.ravel_multi_index(np.unravel_index(pos, shape, order="F"), shape)
        yield pos
    if ends_with_filler:
        raise _fail(f"{where} index: ends with a filler (an encoder never writes one)")
    if found != nnz:
        raise _fail(f"{where}: index stream holds {found} nonzeros, header says {nnz}")


def entry_report(e: dict, scheme: str, **fields: Any) -> TensorReport:
    """The :class:`TensorReport` of a decoded header entry: name, shape, dtype and element
    count from the entry, the rest (``layout``, ``nonzeros``, bits...) from ``fields``."""
    shape = tuple(e["shape"])
    fields.setdefault("layout", None)
    return TensorReport(
        name=e["name"],
        shape=shape,
        dtype=e["dtype"],
        scheme=scheme,
        numel=math.prod(shape),
        **fields,
    )
