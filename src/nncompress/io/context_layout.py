"""The ``context`` layout of the codebook scheme (format 1.4): a weight of 2+ dimensions whose
significance map and weight codes are coded together by :mod:`nncompress.coding.context`
(dead rows and columns once, density-class contexts, semi-static models, ANS).

Header entry (besides the codebook fields ``k``, ``cb``, ``codebook``, ``nnz``)::

    "layout": "context", "codes": {"sec": S, "codec": "context"}

Section ``S`` is :meth:`nncompress.coding.context.ContextStream.to_bytes` of the weight viewed
as a ``(shape[0], prod(shape[1:]))`` matrix, codes in row-major (C) order of that matrix.
Kept apart from the container so the layout can move with the container's split.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..coding.bitpack import CodingError
from ..coding.context import ContextStream, context_decode, context_encode, matrix_shape
from .errors import FormatError
from .report import StreamReport, TensorReport

__all__ = ["LAYOUT", "context_streams", "decode_context", "encode_context"]

LAYOUT = "context"
FRAME_BYTES = 8


def context_streams(stream: ContextStream, section_bytes: int, k: int) -> tuple[StreamReport, ...]:
    """Per-part stream reports: 'classes', 'map' (significance of every position), 'codes'
    with their order-0 entropy and the bits the context model spends on them (information
    content), and 'tables' (the model tables and the coder's rounding)."""
    parts = []
    spent = 0
    alphabets = {"classes": 0, "map": 2, "codes": k}
    for role in ("classes", "map", "codes"):
        bits = int(round(stream.part_bits.get(role, 0.0)))
        spent += bits
        parts.append(
            StreamReport(
                role=role,
                codec="context",
                symbols=int(stream.part_symbols.get(role, 0)),
                alphabet=alphabets[role],
                entropy=float(stream.part_entropy.get(role, 0.0)),
                payload_bits=bits,
                table_bits=0,
            )
        )
    rest = 8 * section_bytes - spent
    parts.append(StreamReport("tables", "context", 0, 0, 0.0, 0, rest))
    return tuple(parts)


def encode_context(
    base: dict[str, Any],
    common: dict[str, Any],
    full: np.ndarray,
    shape: tuple[int, ...],
    k: int,
    cb_bytes: bytes,
) -> tuple[dict[str, Any], list[bytes], TensorReport]:
    """Entry, sections (codebook, context stream) and report of the context layout.

    ``full`` (numel,) holds the code of each element in C order, -1 for zeros."""
    R, C = matrix_shape(shape)
    stream = context_encode(full.reshape(R, C), max(k, 1))
    data = stream.to_bytes()
    entry = dict(base, layout=LAYOUT, codes={"sec": 1, "codec": LAYOUT})
    streams = context_streams(stream, len(data), max(k, 1))
    rep = TensorReport(
        layout=LAYOUT,
        total_bytes=len(cb_bytes) + len(data) + 2 * FRAME_BYTES,
        weight_bits=streams[2].payload_bits,
        index_bits_coded=8 * len(data) - streams[2].payload_bits,
        streams=streams,
        **common,
    )
    return entry, [cb_bytes, data], rep


def decode_context(
    data: memoryview, shape: tuple[int, ...], k: int, nnz: int, where: str
) -> tuple[np.ndarray, np.ndarray, ContextStream]:
    """``(positions, codes, stream)``: the C-order flat positions of the nonzeros and their
    codes. Raises :class:`FormatError`."""
    try:
        R, C = matrix_shape(shape)
        mask, codes, stream = context_decode(data, R, C, max(k, 1), nnz)
    except (CodingError, ValueError) as exc:
        raise FormatError(f"{where} codes: {exc}") from exc
    return np.flatnonzero(mask.reshape(-1)), codes, stream
