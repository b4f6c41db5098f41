"""Reading ``.ncz`` files: every length, count and shape is validated against the remaining
bytes and the caller's limits (``max_elements``, ``max_bytes``) before anything is allocated,
each section's CRC32 is checked, streams are decoded in chunks straight into the output (so
decoding allocates the declared tensors plus O(file size)), and any damage raises
:class:`~nncompress.io.FormatError` (never another exception)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coding.sparse import MAX_INDEX_BITS
from .context_layout import context_streams, decode_context
from .errors import FormatError
from .format import (
    _CODEBOOK_DTYPES,
    _FRAME,
    _PREFIX,
    _STORE_BYTES,
    _TORCH_DTYPES,
    BOUND_CRC_MINOR,
    CHUNK,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    MAX_NDIM,
    PLAUSIBLE_ELEMENTS_PER_BYTE,
    PLAUSIBLE_FREE_ELEMENTS,
    SCHEME_MINOR,
    _fail,
    _inflate,
    _raw_width,
    _split_sections,
    alias_report,
    needed_minor,
    nonzero_count,
    open_stream,
    stream_report,
)
from .pq_scheme import PQ_MAX_D, PQ_MAX_K, pq_table
from .report import EncodeReport, TensorReport
from .sparse_values import check_sparse, decode_sparse

__all__ = [
    "decode_bytes",
    "decode_entry",
    "decode_file",
    "inspect_bytes",
    "inspect_file",
    "load_compressed",
]


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


def _decode_dense(e: dict, secs: list[memoryview], with_report: bool):
    """A ``dense`` entry: the raw bytes, or float16 widened to float32."""
    name, dtype, shape = e["name"], e["dtype"], tuple(e["shape"])
    numel = math.prod(shape)
    data = secs[e["data"]]
    store = e["store"]
    item = 2 if store == "float16" else _ITEMSIZE[dtype]
    if len(data) != numel * item:
        raise _fail(f"tensor '{name}': dense data has {len(data)} bytes, expected {numel * item}")
    if store == "float16":
        arr = np.frombuffer(data, dtype="<f2").astype(np.float32)  # (numel,) the output
    else:
        arr = np.frombuffer(data, dtype=_NP_RAW[dtype]).copy()  # (numel,) the output
        if dtype == "bool" and arr.size and int(arr.max()) > 1:
            raise _fail(f"tensor '{name}': bool bytes must be 0 or 1, found {int(arr.max())}")
    t = torch.from_numpy(arr.reshape(shape))
    if dtype in ("bfloat16", "bool", "float8_e4m3fn", "float8_e5m2"):
        t = t.view(_TORCH_DTYPES[dtype])  # same item size: reinterpret the bits
    rep = None
    if with_report:
        rep = TensorReport(
            name=name,
            shape=shape,
            dtype=dtype,
            scheme="dense",
            layout=None,
            numel=numel,
            nonzeros=int(np.count_nonzero(arr)),
            total_bytes=len(data) + _FRAME.size,
            dense_store=store,
            dense_bits=8 * len(data),
        )
    return t, rep


def _codes_dense(e, secs, codebook, ftype, with_report):
    """``layout='dense'``: a code per element, zero inserted into the codebook if present;
    decoded chunk by chunk straight into the output."""
    where, shape, k, nnz = f"tensor '{e['name']}'", tuple(e["shape"]), e["k"], e["nnz"]
    numel = math.prod(shape)
    codes_ref = e["codes"]
    alphabet = k + 1 if nnz < numel else k
    stream = open_stream(
        codes_ref["codec"], secs[codes_ref["sec"]], numel, alphabet, f"{where} codes"
    )
    zpos = -1
    table = codebook
    if nnz < numel:
        zpos = int(np.searchsorted(codebook, 0.0)) if k else 0
        table = np.insert(codebook, zpos, ftype(0.0))  # (k+1,)
    out = np.empty(numel, dtype=ftype)  # (numel,) the output
    pos = zeros = 0
    for chunk in stream.chunks(count=with_report):
        out[pos : pos + chunk.size] = table[chunk]
        zeros += int(np.count_nonzero(chunk == zpos))
        pos += chunk.size
    if numel - zeros != nnz:
        raise _fail(f"{where}: nnz={nnz} does not match the decoded codes")
    streams = [stream_report("codes", stream)] if with_report else []
    fields = dict(
        layout="dense",
        weight_bits_pq=numel * _raw_width(alphabet),
        weight_bits=8 * len(secs[codes_ref["sec"]]),
        total_bytes=len(secs[e["codebook"]]) + len(secs[codes_ref["sec"]]) + 2 * _FRAME.size,
    )
    return out.reshape(shape), fields, streams


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


def _codes_sparse(e, secs, codebook, ftype, with_report):
    """``layout='sparse'``: relative-index positions of the nonzeros and their codes, both
    decoded chunk by chunk and scattered straight into the (zeroed) output."""
    where, shape, k, nnz = f"tensor '{e['name']}'", tuple(e["shape"]), e["k"], e["nnz"]
    numel = math.prod(shape)
    codes_ref, idx_ref = e["codes"], e["index"]
    b, n_entries, order = e["b"], e["entries"], e["order"]
    M = (1 << b) - 1  # the filler
    index = open_stream(idx_ref["codec"], secs[idx_ref["sec"]], n_entries, 1 << b, f"{where} index")
    codes = open_stream(
        codes_ref["codec"], secs[codes_ref["sec"]], nnz, max(k, 1), f"{where} codes"
    )
    taker = _Taker(codes.chunks(count=with_report))
    out = np.zeros(numel, dtype=ftype)  # (numel,) the output, C order
    base = found = 0  # base: position after the last entry's run
    ends_with_filler = False
    for ent in index.chunks(count=with_report):
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
        values = codebook[taker.take(pos.size, f"{where} codes")]
        if order == "F" and len(shape) > 1:  # column-major position -> row-major position
            pos = np.ravel_multi_index(np.unravel_index(pos, shape, order="F"), shape)
        out[pos] = values
    if ends_with_filler:
        raise _fail(f"{where} index: ends with a filler (an encoder never writes one)")
    if found != nnz:
        raise _fail(f"{where}: index stream holds {found} nonzeros, header says {nnz}")
    taker.finish(f"{where} codes")
    streams = [stream_report("codes", codes), stream_report("index", index)] if with_report else []
    fields = dict(
        layout="sparse",
        order=order,
        index_bits=b,
        fillers=n_entries - nnz,
        weight_bits_pq=nnz * _raw_width(max(k, 1)),
        weight_bits=8 * len(secs[codes_ref["sec"]]),
        index_bits_pq=n_entries * b,
        index_bits_coded=8 * len(secs[idx_ref["sec"]]),
        total_bytes=len(secs[e["codebook"]])
        + len(secs[codes_ref["sec"]])
        + len(secs[idx_ref["sec"]])
        + 3 * _FRAME.size,
    )
    return out.reshape(shape), fields, streams


def _codes_context(e, secs, codebook, ftype, with_report):
    """``layout='context'`` (format 1.4): significance map and codes of the matrix view,
    coded together (:mod:`nncompress.io.context_layout`)."""
    shape, where = tuple(e["shape"]), f"tensor '{e['name']}'"
    data = secs[e["codes"]["sec"]]
    pos, codes, cstream = decode_context(data, shape, e["k"], e["nnz"], where)
    flat = np.zeros(math.prod(shape), dtype=ftype)
    flat[pos] = codebook[codes]
    parts = context_streams(cstream, len(data), max(e["k"], 1))
    fields = dict(
        layout="context",
        weight_bits=parts[2].payload_bits,
        index_bits_coded=8 * len(data) - parts[2].payload_bits,
        total_bytes=len(secs[e["codebook"]]) + len(data) + 2 * _FRAME.size,
    )
    return flat.reshape(shape), fields, list(parts) if with_report else []


def _codebook(e: dict, secs: list[memoryview], ftype) -> np.ndarray:
    """The codebook section as ``ftype`` values, checked as the spec says: ``k`` values, all
    nonzero, sorted ascending with NaNs last, no value twice."""
    where, k, cb = f"tensor '{e['name']}'", e["k"], e["cb"]
    data = secs[e["codebook"]]
    if len(data) != k * _STORE_BYTES[cb]:
        raise _fail(f"{where}: codebook has {len(data)} bytes, expected {k} x {cb}")
    raw = np.frombuffer(data, dtype="<f2" if cb == "float16" else "<f4")  # (k,)
    nan = np.isnan(raw)
    n_real = k - int(nan.sum())
    real = raw[:n_real]
    if nan[:n_real].any():
        raise _fail(f"{where}: codebook has a NaN before a number (NaNs must come last)")
    if np.any(real == 0):
        raise _fail(f"{where}: codebook holds a zero (zeros are never codebook values)")
    if np.any(real[1:] <= real[:-1]):
        raise _fail(f"{where}: codebook values are not sorted ascending and distinct")
    bits = raw[n_real:].view(np.uint16 if cb == "float16" else np.uint32)
    if np.unique(bits).size != bits.size:
        raise _fail(f"{where}: codebook holds the same NaN twice")
    return raw.astype(ftype)


def _decode_codebook(e: dict, secs: list[memoryview], with_report: bool):
    """A ``codebook`` entry: the codebook, then the codes in their layout."""
    name, dtype, shape = e["name"], e["dtype"], tuple(e["shape"])
    k, nnz, cb = e["k"], e["nnz"], e["cb"]
    ftype = _CODEBOOK_DTYPES[dtype][0]
    codebook = _codebook(e, secs, ftype)
    layouts = {"dense": _codes_dense, "sparse": _codes_sparse, "context": _codes_context}
    arr, fields, streams = layouts[e["layout"]](e, secs, codebook, ftype, with_report)
    t = torch.from_numpy(arr)  # already the tensor's dtype: no copy
    rep = None
    if with_report:
        rep = TensorReport(
            name=name,
            shape=shape,
            dtype=dtype,
            scheme="codebook",
            numel=math.prod(shape),
            nonzeros=nnz,
            codebook_size=k,
            codebook_dtype=cb,
            codebook_bits=8 * len(secs[e["codebook"]]),
            streams=tuple(streams),
            **fields,
        )
    return t, rep


def _decode_pq(e: dict, secs: list[memoryview], with_report: bool):
    """A ``pq`` entry: ``table[codes]`` reshaped, the table being the codebook plus an all-zero
    row when ``zero``."""
    name, dtype, shape = e["name"], e["dtype"], tuple(e["shape"])
    numel = math.prod(shape)
    d, k, zero, cb = e["d"], e["k"], e["zero"], e["cb"]
    where = f"tensor '{name}'"
    cb_data = secs[e["codebook"]]
    if len(cb_data) != k * d * _STORE_BYTES[cb]:
        raise _fail(f"{where}: codebook has {len(cb_data)} bytes, expected {k} x {d} x {cb}")
    codebook = np.frombuffer(cb_data, dtype="<f2" if cb == "float16" else "<f4")
    codebook = codebook.astype(_CODEBOOK_DTYPES[dtype][0]).reshape(k, d)  # (k, d)
    ref = e["codes"]
    alphabet = k + int(zero)
    stream = open_stream(ref["codec"], secs[ref["sec"]], numel // d, alphabet, f"{where} codes")
    table = pq_table(codebook, zero)  # (k [+ 1], d)
    out = np.empty((numel // d, d), dtype=codebook.dtype)  # the output, chunk by chunk
    pos = 0
    for chunk in stream.chunks(count=with_report):
        out[pos : pos + chunk.size] = table[chunk]
        pos += chunk.size
    t = torch.from_numpy(out.reshape(shape))  # already the tensor's dtype: no copy
    rep = None
    if with_report:
        rep = TensorReport(
            name=name,
            shape=shape,
            dtype=dtype,
            scheme="pq",
            layout=None,
            numel=numel,
            nonzeros=int(np.count_nonzero(out)),
            total_bytes=len(cb_data) + len(secs[ref["sec"]]) + 2 * _FRAME.size,
            codebook_size=k,
            codebook_dtype=cb,
            codebook_bits=8 * len(cb_data),
            weight_bits_pq=(numel // d) * _raw_width(alphabet),
            weight_bits=8 * len(secs[ref["sec"]]),
            streams=(stream_report("codes", stream),),
            block_size=d,
        )
    return t, rep


def _dequantize_chunked(q, scale, zero, bits, g, rows, cols, e) -> torch.Tensor:
    """:func:`dequantize_codes` computed ``CHUNK`` elements at a time straight into the output
    (transposed in place for Conv1D-layout tensors): the same float32 ``(q - z) * s`` per element
    and the same cast, so the result is bit for bit the whole-tensor one, but the temporaries
    stay O(CHUNK) instead of three float32 copies of the tensor."""
    dtype = _TORCH_DTYPES[e["dtype"]]
    out = torch.empty((cols, rows) if e["transpose"] else (rows, cols), dtype=dtype)
    flat_out = out.view(-1)
    codes = torch.from_numpy(q)  # (rows * cols,) uint8
    s_flat = scale.reshape(-1).to(torch.float32)  # (groups,)
    z_flat = None if zero is None else zero.reshape(-1).to(torch.float32)
    mid = float(2 ** (bits - 1))
    n = rows * cols
    for a in range(0, n, CHUNK):
        i = torch.arange(a, min(n, a + CHUNK))  # flat (row, col) positions of this chunk
        grp = i // g
        qf = codes[a : a + i.numel()].to(torch.float32)
        centered = qf - (mid if z_flat is None else z_flat[grp])
        values = (centered * s_flat[grp]).to(dtype)
        if e["transpose"]:  # element (r, c) of the codes is element (c, r) of the tensor
            flat_out[(i % cols) * rows + i // cols] = values
        else:
            flat_out[a : a + i.numel()] = values
    return out


def _decode_affine(e: dict, secs: list[memoryview], with_report: bool):
    """An ``affine`` entry: ``(q - z) * s`` per group (:func:`dequantize_codes`, the formula the
    quantized model computes with), transposed back for Conv1D-layout tensors."""
    where = f"tensor '{e['name']}'"
    bits, g, rows, cols = e["bits"], e["group"], e["rows"], e["cols"]
    n_groups = rows * (cols // g)
    c_ref = e["codes"]
    stream = open_stream(
        c_ref["codec"], secs[c_ref["sec"]], rows * cols, 1 << bits, f"{where} codes"
    )
    q = np.empty(rows * cols, dtype=np.uint8)
    pos = 0
    for chunk in stream.chunks(count=with_report):
        q[pos : pos + chunk.size] = chunk
        pos += chunk.size
    s_data = secs[e["scale"]]
    if len(s_data) != 2 * n_groups:
        raise _fail(f"{where}: scale section has {len(s_data)} bytes, expected {2 * n_groups}")
    scale = torch.from_numpy(np.frombuffer(s_data, dtype="<f2").astype(np.float16)).reshape(
        rows, -1
    )
    zero = z_stream = None
    if "zero" in e:
        z_ref = e["zero"]
        z_stream = open_stream(
            z_ref["codec"], secs[z_ref["sec"]], n_groups, 1 << bits, f"{where} zero"
        )
        zs = np.concatenate([c for c in z_stream.chunks(count=with_report)] or [np.zeros(0)])
        zero = torch.from_numpy(zs.astype(np.uint8)).reshape(rows, -1)
    w = _dequantize_chunked(q, scale, zero, bits, g, rows, cols, e)
    rep = None
    if with_report:
        streams = [stream_report("codes", stream)]
        side = len(s_data)
        if z_stream is not None:
            streams.append(stream_report("zero", z_stream))
            side += len(secs[e["zero"]["sec"]])
        rep = TensorReport(
            name=e["name"],
            shape=tuple(e["shape"]),
            dtype=e["dtype"],
            scheme="affine",
            layout=None,
            numel=rows * cols,
            nonzeros=nonzero_count(w),
            total_bytes=len(secs[c_ref["sec"]]) + side + _FRAME.size * (len(streams) + 1),
            codebook_size=n_groups,
            codebook_dtype="float16",
            codebook_bits=8 * side,
            weight_bits_pq=rows * cols * bits,
            weight_bits=8 * len(secs[c_ref["sec"]]),
            streams=tuple(streams),
        )
    return w, rep


_DECODERS = {
    "dense": _decode_dense,
    "codebook": _decode_codebook,
    "pq": _decode_pq,
    "affine": _decode_affine,
    "sparse": decode_sparse,
}


def decode_entry(
    e: dict, secs: list[memoryview], *, with_report: bool
) -> tuple[torch.Tensor, TensorReport | None]:
    """Decode one validated header entry (by its scheme); ``secs`` indexed by the entry's
    references."""
    return _DECODERS[e["scheme"]](e, secs, with_report)


def _check_limits(max_elements: Any, max_bytes: Any) -> None:
    for name, v in (("max_elements", max_elements), ("max_bytes", max_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}={v!r}: must be an integer >= 0")


def _decode(
    data: bytes | memoryview, *, max_elements: int, max_bytes: int, with_report: bool
) -> tuple[dict[str, torch.Tensor], Any, EncodeReport | None]:
    _check_limits(max_elements, max_bytes)
    try:
        with np.errstate(all="ignore"):  # damaged codebooks may hold NaN/inf: not an error here
            return _decode_checked(
                data, max_elements=max_elements, max_bytes=max_bytes, with_report=with_report
            )
    except FormatError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError as exc:
        raise FormatError(f"file declares sizes too large to decode: {exc}") from exc
    except Exception as exc:  # safety net: any other failure on damaged input is a FormatError
        raise FormatError(f"malformed .ncz file: {type(exc).__name__}: {exc}") from exc


def _check_minor(minor: int, entries: list[dict]) -> None:
    """The minor version is exactly the one a writer puts there (like ZIP's "version needed to
    extract"): for 1.0 / 1.1 files what their schemes need (1.1 exactly when a tensor uses the
    pq scheme); from 1.2 on (CRCs bound to section indices) 1.2, or 1.3 when a tensor uses a
    scheme or dtype of 1.3 (:func:`~.format.written_minor`). A damaged version field is refused
    in either direction."""
    needed = needed_minor(entries)
    expect = needed if minor < BOUND_CRC_MINOR else max(BOUND_CRC_MINOR, needed)
    if minor != expect:
        raise _fail(
            f"format version 1.{minor} does not match the file's contents, which need 1.{needed} "
            f"(a scheme needs the version that added it: {SCHEME_MINOR}; files before "
            f"1.{BOUND_CRC_MINOR} carry exactly the version their schemes need, later ones "
            f"1.{BOUND_CRC_MINOR} or the version their schemes need if newer)"
        )


def _decode_checked(
    data: bytes | memoryview, *, max_elements: int, max_bytes: int, with_report: bool
) -> tuple[dict[str, torch.Tensor], Any, EncodeReport | None]:
    secs, minor = _split_sections(data)
    header = _inflate(secs[0], "header")
    metadata = _inflate(secs[1], "metadata")
    entries = _check_header(header, len(secs), max_elements, len(data), max_bytes)
    _check_minor(minor, entries)
    state: dict[str, torch.Tensor] = {}
    reports = []
    for e in entries:
        if e["scheme"] == "alias":  # stored once: a copy of the earlier tensor
            t = state[e["of"]].clone()
            rep = alias_report(e["name"], t) if with_report else None
        else:
            t, rep = decode_entry(e, secs, with_report=with_report)
        state[e["name"]] = t
        reports.append(rep)
    report = None
    if with_report:
        report = EncodeReport(
            tensors=tuple(reports),
            prefix_bytes=_PREFIX.size,
            header_bytes=len(secs[0]) + _FRAME.size,
            metadata_bytes=len(secs[1]) + _FRAME.size,
            total_bytes=len(data),
        )
    return state, metadata, report


def decode_bytes(
    data: bytes | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Decode ``.ncz`` bytes: ``(state_dict, metadata)``; :class:`FormatError` if damaged.

    ``max_elements`` and ``max_bytes`` bound the tensor elements and decoded bytes the file
    may declare; both are checked before anything is allocated, and decoding allocates the
    declared tensors plus ``O(file size)`` (streams are decoded in chunks).
    """
    state, metadata, _ = _decode(
        data, max_elements=max_elements, max_bytes=max_bytes, with_report=False
    )
    return state, metadata


def _read(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed file '{path}' does not exist")
    return path.read_bytes()


def decode_file(
    path: str | Path,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read and decode a ``.ncz`` file: ``(state_dict, metadata)``.

    ``max_elements`` (default 2**28) and ``max_bytes`` (default 2 GiB) bound what the file may
    declare: the total number of tensor elements and of decoded bytes (raise them for larger
    models). A file declaring more is refused before anything is allocated.
    """
    try:
        return decode_bytes(_read(path), max_elements=max_elements, max_bytes=max_bytes)
    except FormatError as exc:
        raise FormatError(f"'{path}': {exc}") from exc


def inspect_bytes(
    data: bytes | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
):
    """Itemised :class:`EncodeReport` of ``.ncz`` bytes (decodes every stream)."""
    _, _, report = _decode(data, max_elements=max_elements, max_bytes=max_bytes, with_report=True)
    return report


def inspect_file(
    path: str | Path,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> EncodeReport:
    """Itemised :class:`EncodeReport` of a ``.ncz`` file: per-tensor scheme, codebook, code
    and index bits (fixed "P+Q" and coded), fillers, entropies, and totals."""
    try:
        return inspect_bytes(_read(path), max_elements=max_elements, max_bytes=max_bytes)
    except FormatError as exc:
        raise FormatError(f"'{path}': {exc}") from exc


def load_compressed(model: nn.Module, path: str | Path, **limits: int) -> Any:
    """Fill ``model`` (strictly, by name) from a ``.ncz`` file; returns the file's metadata.
    ``limits``: ``max_elements`` / ``max_bytes`` of :func:`decode_file`."""
    state, metadata = decode_file(path, **limits)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"'{path}': the decoded tensors do not fit the model: {exc}") from exc
    return metadata
