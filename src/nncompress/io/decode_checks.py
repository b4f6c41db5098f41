"""Checking a ``.ncz`` header before anything is decoded: every entry's fields by its scheme
(:data:`_ENTRY_CHECKS`), the section references, and the declared output against the limits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..coding.sparse import MAX_INDEX_BITS
from .format import (
    _CODEBOOK_DTYPES,
    _TORCH_DTYPES,
    DEFAULT_MAX_BYTES,
    MAX_NDIM,
    PLAUSIBLE_ELEMENTS_PER_BYTE,
    PLAUSIBLE_FREE_ELEMENTS,
    _fail,
)
from .pq_scheme import PQ_MAX_D, PQ_MAX_K
from .reading import _req, _req_int
from .sparse_values import check_sparse

# little-endian numpy dtype each tensor dtype is read as (bfloat16 as its uint16 bits, bool as
# bytes that must be 0 or 1)
_NP_RAW = {
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "complex64": "<c8",
    "complex128": "<c16",
    "float8_e4m3fn": "u1",
    "float8_e5m2": "u1",
}
_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in _NP_RAW.items()}


def _check_dense(e: dict, dtype: str, numel: int, n_sections: int, where: str) -> list[int]:
    """Fields of a ``dense`` entry; returns its section references."""
    store = _req(e, "store", str, where)
    if store not in ("raw", "float16") or (store == "float16" and dtype != "float32"):
        raise _fail(f"{where}: store={store!r} not valid for dtype {dtype}")
    return [_req_int(e, "data", 2, n_sections - 1, where)]


def _check_codebook(e: dict, dtype: str, numel: int, n_sections: int, where: str) -> list[int]:
    """Fields of a ``codebook`` entry (and of its layout); returns its section references."""
    if dtype not in _CODEBOOK_DTYPES:
        raise _fail(f"{where}: codebook scheme for dtype {dtype}")
    if numel == 0:
        raise _fail(f"{where}: codebook scheme for an empty tensor")
    k = _req_int(e, "k", 0, 1 << 16, where)
    nnz = _req_int(e, "nnz", 0, numel, where)
    if (k == 0) != (nnz == 0):
        raise _fail(f"{where}: k={k} inconsistent with nnz={nnz}")
    cb = _req(e, "cb", str, where)
    if cb not in ("float16", dtype):
        raise _fail(f"{where}: codebook dtype {cb!r} not valid for {dtype}")
    refs = [_req_int(e, "codebook", 2, n_sections - 1, where)]
    layout = _req(e, "layout", str, where)
    streams = ["codes"]
    if layout == "context":
        if len(e["shape"]) < 2 or nnz == 0:
            raise _fail(
                f"{where}: layout 'context' needs 2+ dimensions and a nonzero (shape "
                f"{e['shape']}, nnz {nnz})"
            )
    elif layout == "sparse":
        _req_int(e, "b", 1, MAX_INDEX_BITS, where)
        _req_int(e, "entries", nnz, numel, where)
        if _req(e, "order", str, where) not in ("C", "F"):
            raise _fail(f"{where}: order={e['order']!r} must be 'C' or 'F'")
        streams.append("index")
    elif layout != "dense":
        raise _fail(f"{where}: layout={layout!r} must be 'sparse', 'dense' or 'context'")
    codecs = ("context",) if layout == "context" else ("raw", "huffman", "ans")
    for s in streams:
        ref = _req(e, s, dict, where)
        if _req(ref, "codec", str, f"{where} {s}") not in codecs:
            raise _fail(f"{where}: {s} codec={ref['codec']!r} unknown")
        refs.append(_req_int(ref, "sec", 2, n_sections - 1, f"{where} {s}"))
    return refs


def _check_pq(e: dict, dtype: str, numel: int, n_sections: int, where: str) -> list[int]:
    """Fields of a ``pq`` entry (docs/format.md); returns its section references."""
    if dtype not in _CODEBOOK_DTYPES:
        raise _fail(f"{where}: pq scheme for dtype {dtype}")
    d = _req_int(e, "d", 1, PQ_MAX_D, where)
    if numel == 0 or numel % d:
        raise _fail(f"{where}: d={d} does not divide the {numel} elements")
    _req_int(e, "k", 1, PQ_MAX_K, where)
    _req(e, "zero", bool, where)
    cb = _req(e, "cb", str, where)
    if cb not in ("float16", dtype):
        raise _fail(f"{where}: codebook dtype {cb!r} not valid for {dtype}")
    ref = _req(e, "codes", dict, where)
    if _req(ref, "codec", str, f"{where} codes") not in ("raw", "huffman", "ans"):
        raise _fail(f"{where}: codes codec={ref['codec']!r} unknown")
    return [
        _req_int(e, "codebook", 2, n_sections - 1, where),
        _req_int(ref, "sec", 2, n_sections - 1, f"{where} codes"),
    ]


def _check_affine(e: dict, dtype: str, numel: int, n_sections: int, where: str) -> list[int]:
    """Fields of an ``affine`` entry (format 1.3, docs/format.md); its section references."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise _fail(f"{where}: affine scheme for dtype {dtype}")
    _req_int(e, "bits", 2, 8, where)
    rows = _req_int(e, "rows", 1, max(numel, 1), where)
    cols = _req_int(e, "cols", 1, max(numel, 1), where)
    g = _req_int(e, "group", 1, cols, where)
    if rows * cols != numel or cols % g:
        raise _fail(f"{where}: rows={rows} x cols={cols} (group {g}) does not fit {numel}")
    transpose = _req(e, "transpose", bool, where)
    want = [cols, rows] if transpose else [rows, cols]
    if e["shape"] != want:
        raise _fail(f"{where}: shape {e['shape']} is not the {want} of its codes")
    refs = []
    for s in ("codes", "zero"):
        if s == "zero" and s not in e:
            continue
        ref = _req(e, s, dict, where)
        if _req(ref, "codec", str, f"{where} {s}") not in ("raw", "huffman", "ans"):
            raise _fail(f"{where}: {s} codec={ref['codec']!r} unknown")
        refs.append(_req_int(ref, "sec", 2, n_sections - 1, f"{where} {s}"))
    refs.append(_req_int(e, "scale", 2, n_sections - 1, where))
    return refs


def _check_alias(e: dict, dtype: str, numel: int, n_sections: int, where: str) -> list[int]:
    """An ``alias`` entry names its target; :func:`_check_header` checks the target."""
    _req(e, "of", str, where)
    return []


_ENTRY_CHECKS = {
    "dense": _check_dense,
    "codebook": _check_codebook,
    "pq": _check_pq,
    "affine": _check_affine,
    "alias": _check_alias,
    "sparse": check_sparse,
}


#: working memory of the context-layout decoder per tensor element, an upper bound of the
#: 6.25 x float32 (25 bytes) measured on a dense tensor (docs/format.md)
CONTEXT_WORK_BYTES = 32


def _check_header(
    header: Any, n_sections: int, max_elements: int, file_bytes: int, max_bytes: int | None = None
) -> list[dict]:
    """Every entry's fields (by its scheme), the section references, and the declared output
    (elements and bytes) against the limits, before anything is allocated."""
    if max_bytes is None:
        max_bytes = DEFAULT_MAX_BYTES
    if not isinstance(header, dict) or header.get("format") != "nncompress-ncz":
        raise _fail("header: not an nncompress-ncz header")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise _fail("header: 'tensors' must be a list")
    used: set[int] = set()
    total = total_bytes = 0
    names: set[str] = set()
    for i, e in enumerate(entries):
        where = f"header tensor {i}"
        if not isinstance(e, dict):
            raise _fail(f"{where}: must be an object")
        name = _req(e, "name", str, where)
        where = f"tensor '{name}'"
        if name in names:
            raise _fail(f"{where}: duplicate name")
        names.add(name)
        dtype = _req(e, "dtype", str, where)
        if dtype not in _TORCH_DTYPES:
            raise _fail(f"{where}: dtype={dtype!r} not one of {sorted(_TORCH_DTYPES)}")
        shape = _req(e, "shape", list, where)
        if len(shape) > MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max_elements for d in shape
        ):
            raise _fail(
                f"{where}: shape={shape!r}: must be a list of at most {MAX_NDIM} integer sizes "
                f"in [0, max_elements={max_elements}]"
            )
        numel = math.prod(shape)
        total += numel
        total_bytes += numel * _ITEMSIZE[dtype]
        if total > max_elements:
            raise _fail(
                f"{where}: the file declares more than max_elements={max_elements} elements"
            )
        if total_bytes > max_bytes:
            raise _fail(
                f"{where}: the file declares more than max_bytes={max_bytes} bytes of tensors "
                "(refused before allocating; raise max_bytes for a larger model)"
            )
        if e.get("layout") == "context":
            # the context decoder holds whole-tensor intermediates (significance map, row /
            # column indices, context groups: 25 bytes per element measured for a dense
            # float32 tensor); count them against max_bytes before anything is allocated
            work = total_bytes - numel * _ITEMSIZE[dtype] + numel * CONTEXT_WORK_BYTES
            if work > max_bytes:
                raise _fail(
                    f"{where}: decoding its context layout needs up to {work} bytes "
                    f"(output so far + {CONTEXT_WORK_BYTES} bytes per element of working "
                    f"memory), more than max_bytes={max_bytes} (refused before allocating)"
                )
        scheme = _req(e, "scheme", str, where)
        if scheme not in _ENTRY_CHECKS:
            raise _fail(f"{where}: scheme={scheme!r} must be one of {sorted(_ENTRY_CHECKS)}")
        refs = _ENTRY_CHECKS[scheme](e, dtype, numel, n_sections, where)
        if scheme == "alias":  # an earlier stored tensor of the same dtype and shape
            target = next((x for x in entries[:i] if x.get("name") == e["of"]), None)
            if target is None or target.get("scheme") == "alias":
                raise _fail(f"{where}: alias of {e['of']!r}, which is not an earlier stored tensor")
            if target.get("dtype") != dtype or target.get("shape") != shape:
                raise _fail(f"{where}: alias of {e['of']!r} with a different dtype or shape")
        for r in refs:
            if r in used:
                raise _fail(f"{where}: section {r} referenced twice")
            used.add(r)
    if len(used) != n_sections - 2:
        raise _fail(f"header references {len(used)} of the {n_sections - 2} data sections")
    if total > PLAUSIBLE_FREE_ELEMENTS and total > PLAUSIBLE_ELEMENTS_PER_BYTE * file_bytes:
        raise _fail(
            f"the file declares {total} elements in only {file_bytes} bytes: implausible "
            "(refused before allocating)"
        )
    return entries
