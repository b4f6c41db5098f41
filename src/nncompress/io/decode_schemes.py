"""Decoding one validated ``.ncz`` entry by its scheme (:data:`_DECODERS`): streams are decoded
in chunks straight into the output."""

from __future__ import annotations

import math

import numpy as np
import torch

from .context_layout import context_streams, decode_context
from .decode_checks import _ITEMSIZE, _NP_RAW
from .format import (
    _CODEBOOK_DTYPES,
    _FRAME,
    _STORE_BYTES,
    _TORCH_DTYPES,
    CHUNK,
    _fail,
    _raw_width,
    nonzero_count,
    open_stream,
    stream_report,
)
from .pq_scheme import pq_table
from .reading import _Taker, entry_report, relative_positions
from .report import TensorReport
from .sparse_values import decode_sparse


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
        rep = entry_report(
            e,
            "dense",
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


def _codes_sparse(e, secs, codebook, ftype, with_report):
    """``layout='sparse'``: relative-index positions of the nonzeros and their codes, both
    decoded chunk by chunk and scattered straight into the (zeroed) output."""
    where, shape, k, nnz = f"tensor '{e['name']}'", tuple(e["shape"]), e["k"], e["nnz"]
    numel = math.prod(shape)
    codes_ref, idx_ref = e["codes"], e["index"]
    b, n_entries, order = e["b"], e["entries"], e["order"]
    index = open_stream(idx_ref["codec"], secs[idx_ref["sec"]], n_entries, 1 << b, f"{where} index")
    codes = open_stream(
        codes_ref["codec"], secs[codes_ref["sec"]], nnz, max(k, 1), f"{where} codes"
    )
    taker = _Taker(codes.chunks(count=with_report))
    out = np.zeros(numel, dtype=ftype)  # (numel,) the output, C order
    for pos in relative_positions(index, shape, nnz, b, order, with_report, where):
        out[pos] = codebook[taker.take(pos.size, f"{where} codes")]
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
    dtype, k, nnz, cb = e["dtype"], e["k"], e["nnz"], e["cb"]
    ftype = _CODEBOOK_DTYPES[dtype][0]
    codebook = _codebook(e, secs, ftype)
    layouts = {"dense": _codes_dense, "sparse": _codes_sparse, "context": _codes_context}
    arr, fields, streams = layouts[e["layout"]](e, secs, codebook, ftype, with_report)
    t = torch.from_numpy(arr)  # already the tensor's dtype: no copy
    rep = None
    if with_report:
        rep = entry_report(
            e,
            "codebook",
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
        rep = entry_report(
            e,
            "pq",
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
        rep = entry_report(
            e,
            "affine",
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
