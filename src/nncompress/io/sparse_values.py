"""The ``sparse`` scheme of the ``.ncz`` format (version 1.5): a pruned float tensor whose
surviving weights are *not* shared, stored as relative-index positions plus the values.

Deep Compression's storage (Han et al., ICLR 2016, section 2) keeps the positions of a pruned
layer's nonzeros as relative indices (zeros skipped since the previous nonzero, with filler
entries for long gaps, :mod:`nncompress.coding.sparse`) and only the nonzero values. Without
weight sharing the values are arbitrary floats; they are stored exactly (float32, or float16
when that is lossless or the writer asked for fp16 storage) as **byte planes**: the ``i``-th
byte of every value (most significant first) forms one stream of symbols below 256, coded
with the file's codec (canonical Huffman, ANS, or fixed width when that is smaller). The top
plane (sign and exponent) of trained weights is far from uniform (a few exponents cover the
survivors of magnitude pruning), the low mantissa planes are nearly uniform and fall back to
raw bytes. As in the codebook scheme, +0.0 and -0.0 both count as zero and decode to +0.0.

This module holds the scheme's three parts (docs/format.md, scheme ``sparse``): the writer's
candidates (:func:`sparse_candidates`), the header check (:func:`check_sparse`) and the
decoder (:func:`decode_sparse`); ``encode.py`` / ``decode.py`` register them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..coding.sparse import MAX_INDEX_BITS, relative_index_encode
from .format import (
    _CODEBOOK_DTYPES,
    _FRAME,
    _TORCH_DTYPES,
    _encode_stream,
    _fail,
    open_stream,
    stream_report,
)
from .report import TensorReport

__all__ = ["MAX_DENSITY", "check_sparse", "decode_sparse", "sparse_candidates"]

#: the writer tries the scheme only below this fraction of nonzeros: above it the index
#: stream and the frames cost more than the zeros they save (dense fp32 wins)
MAX_DENSITY = 0.75
_VALS = {"float32": (np.dtype("<f4"), np.uint32), "float16": (np.dtype("<f2"), np.uint16)}


def _planes(values: np.ndarray) -> list[np.ndarray]:
    """The byte planes of ``values`` (float32 or float16), most significant byte first."""
    utype = _VALS[values.dtype.name][1]
    bits = np.ascontiguousarray(values).view(utype).astype(np.int64)  # (nnz,)
    n = values.dtype.itemsize
    return [(bits >> (8 * (n - 1 - i))) & 0xFF for i in range(n)]


def _value_store(values: np.ndarray, dtype: str, fp16: bool) -> tuple[str, np.ndarray]:
    """Storage dtype of the nonzero values: float16 for float16 tensors, for fp16 storage,
    or when every value survives float16 exactly; else float32."""
    if dtype == "float16":
        return "float16", values
    half = values.astype(np.float16)
    if fp16:
        return "float16", half
    back = half.astype(np.float32)
    if np.array_equal(back.view(np.uint32), values.view(np.uint32)):
        return "float16", half
    return "float32", values


def sparse_candidates(
    name: str, t: torch.Tensor, config: Any, index_bits: list[int], candidate: Any
) -> list[Any]:
    """The ``sparse`` scheme for each flattening order and index width (empty when the tensor
    is not a float32/float16 tensor with at most :data:`MAX_DENSITY` nonzeros).

    ``candidate`` is the writer's candidate class ``(entry, sections, report)``.
    """
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _CODEBOOK_DTYPES or t.numel() == 0:
        return []
    arr = t.detach().cpu().contiguous().numpy()
    utype = _CODEBOOK_DTYPES[dtype][1]
    sign = utype(1 << (8 * arr.itemsize - 1))
    nonzero = (arr.view(utype) & ~sign) != 0  # (shape) +0.0 and -0.0 are zeros
    nnz = int(nonzero.sum())
    if nnz > MAX_DENSITY * arr.size:
        return []
    orders = ["C", "F"] if config.order == "auto" and t.dim() >= 2 else [config.order]
    if t.dim() < 2:
        orders = ["C"]
    out = []
    for order in orders:
        keep = nonzero.ravel(order=order)  # (numel,)
        values = arr.ravel(order=order)[keep]  # (nnz,)
        store, stored = _value_store(values, dtype, config.dense_dtype == "fp16")
        planes = [
            _encode_stream(p, 256, config.codec, config.codec_fallback, f"values[{i}]")
            for i, p in enumerate(_planes(stored))
        ]
        for b in index_bits:
            ri = relative_index_encode(keep, b)
            i_codec, i_data, i_rep = _encode_stream(
                ri.entries, 1 << b, config.codec, config.codec_fallback, "index"
            )
            entry = {
                "name": name,
                "dtype": dtype,
                "shape": list(t.shape),
                "scheme": "sparse",
                "nnz": nnz,
                "order": order,
                "b": b,
                "entries": int(ri.entries.size),
                "index": {"sec": 0, "codec": i_codec},
                "vals": store,
                "planes": [{"sec": 1 + i, "codec": c} for i, (c, _, _) in enumerate(planes)],
            }
            sections = [i_data] + [d for _, d, _ in planes]
            value_bits = sum(8 * len(d) for _, d, _ in planes)
            rep = TensorReport(
                name=name,
                shape=tuple(t.shape),
                dtype=dtype,
                scheme="sparse",
                layout="sparse",
                numel=int(arr.size),
                nonzeros=nnz,
                total_bytes=sum(len(s) + _FRAME.size for s in sections),
                dense_store=store,
                order=order,
                index_bits=b,
                fillers=ri.n_fillers,
                weight_bits_pq=nnz * 8 * np.dtype(_VALS[store][0]).itemsize,
                weight_bits=value_bits,
                index_bits_pq=ri.fixed_bits,
                index_bits_coded=8 * len(i_data),
                streams=(i_rep, *(r for _, _, r in planes)),
            )
            out.append(candidate(entry, sections, rep))
    return out


def check_sparse(e: dict, dtype: str, numel: int, n_sections: int, where: str) -> list[int]:
    """Fields of a ``sparse`` entry; returns its section references."""
    from .decode import _req, _req_int

    if dtype not in _CODEBOOK_DTYPES:
        raise _fail(f"{where}: sparse scheme for dtype {dtype}")
    if numel == 0:
        raise _fail(f"{where}: sparse scheme for an empty tensor")
    nnz = _req_int(e, "nnz", 0, numel, where)
    _req_int(e, "b", 1, MAX_INDEX_BITS, where)
    _req_int(e, "entries", nnz, numel, where)
    if _req(e, "order", str, where) not in ("C", "F"):
        raise _fail(f"{where}: order={e['order']!r} must be 'C' or 'F'")
    vals = _req(e, "vals", str, where)
    if vals not in _VALS or (dtype == "float16" and vals != "float16"):
        raise _fail(f"{where}: vals={vals!r} not valid for dtype {dtype}")
    planes = _req(e, "planes", list, where)
    if len(planes) != _VALS[vals][0].itemsize:
        raise _fail(f"{where}: {len(planes)} value planes, {vals} needs {_VALS[vals][0].itemsize}")
    refs = []
    for i, ref in enumerate([_req(e, "index", dict, where), *planes]):
        what = f"{where} {'index' if i == 0 else f'plane {i - 1}'}"
        if not isinstance(ref, dict):
            raise _fail(f"{what}: must be an object")
        if _req(ref, "codec", str, what) not in ("raw", "huffman", "ans"):
            raise _fail(f"{what}: codec={ref['codec']!r} unknown")
        refs.append(_req_int(ref, "sec", 2, n_sections - 1, what))
    return refs


def decode_sparse(e: dict, secs: list[memoryview], with_report: bool):
    """A ``sparse`` entry: positions from the relative indices, values from the byte planes,
    decoded chunk by chunk (as the codebook scheme's sparse layout) and scattered straight into
    the zeroed output."""
    from .decode import _Taker

    name, dtype, shape = e["name"], e["dtype"], tuple(e["shape"])
    where = f"tensor '{name}'"
    numel, nnz, b, order = math.prod(shape), e["nnz"], e["b"], e["order"]
    M = (1 << b) - 1  # the filler
    idx = e["index"]
    index = open_stream(idx["codec"], secs[idx["sec"]], e["entries"], 1 << b, f"{where} index")
    planes = [
        open_stream(r["codec"], secs[r["sec"]], nnz, 256, f"{where} values plane {i}")
        for i, r in enumerate(e["planes"])
    ]
    takers = [_Taker(p.chunks(count=with_report)) for p in planes]
    vtype, utype = _VALS[e["vals"]]
    sign = utype(1 << (8 * vtype.itemsize - 1))
    out = np.zeros(numel, dtype=_CODEBOOK_DTYPES[dtype][0])  # (numel,) C order
    base = found = 0
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
        bits = np.zeros(pos.size, dtype=np.int64)
        for i, t in enumerate(takers):
            bits = (bits << 8) | t.take(pos.size, f"{where} values plane {i}")
        values = bits.astype(utype)  # (r,) bit patterns
        if not np.all((values & ~sign) != 0):
            raise _fail(f"{where}: a stored value is zero (zeros are positions, not values)")
        if order == "F" and len(shape) > 1:  # column-major position -> row-major position
            pos = np.ravel_multi_index(np.unravel_index(pos, shape, order="F"), shape)
        out[pos] = values.view(vtype).astype(out.dtype)
    if ends_with_filler:
        raise _fail(f"{where} index: ends with a filler (an encoder never writes one)")
    if found != nnz:
        raise _fail(f"{where}: index stream holds {found} nonzeros, header says {nnz}")
    for i, t in enumerate(takers):
        t.finish(f"{where} values plane {i}")
    t = torch.from_numpy(out.reshape(shape)).to(_TORCH_DTYPES[dtype])
    rep = None
    if with_report:
        streams = [stream_report("index", index)]
        streams += [stream_report(f"values[{i}]", p) for i, p in enumerate(planes)]
        refs = [idx, *e["planes"]]
        rep = TensorReport(
            name=name,
            shape=shape,
            dtype=dtype,
            scheme="sparse",
            layout="sparse",
            numel=numel,
            nonzeros=nnz,
            total_bytes=sum(len(secs[r["sec"]]) + _FRAME.size for r in refs),
            dense_store=e["vals"],
            order=order,
            index_bits=b,
            fillers=e["entries"] - nnz,
            weight_bits_pq=nnz * 8 * vtype.itemsize,
            weight_bits=sum(8 * len(secs[r["sec"]]) for r in e["planes"]),
            index_bits_pq=e["entries"] * b,
            index_bits_coded=8 * len(secs[idx["sec"]]),
            streams=tuple(streams),
        )
    return t, rep
