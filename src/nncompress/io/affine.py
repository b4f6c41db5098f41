"""The ``.ncz`` schemes added in format 1.1: ``affine`` (group-wise integer codes of a
weight-only quantized matrix) and ``alias`` (a tensor identical to an earlier one, stored once).

``affine`` entry fields: ``bits`` (2..8), ``group`` (columns per scale group), ``rows`` and
``cols`` of the quantized matrix (out x in), ``transpose`` (the tensor is that matrix
transposed: Hugging Face ``Conv1D``), ``codes`` (stream of ``rows*cols`` symbols below
``2**bits``, row-major), ``scale`` (section: ``rows * cols/group`` float16 values), and for
asymmetric codes ``zero`` (stream of ``rows * cols/group`` symbols below ``2**bits``; absent:
symmetric, zero point ``2**(bits-1)``). Decoding computes
:func:`nncompress.coding.affine.dequantize_codes`, the formula the model computed with.

``alias`` entry fields: ``of``, the name of an earlier non-alias entry with the same dtype and
shape whose values this tensor has, bit for bit (tied embedding and LM head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..coding.affine import dequantize_codes
from .errors import FormatError
from .report import StreamReport, TensorReport

__all__ = ["affine_candidate", "check_affine", "decode_affine", "hint_matches"]

_FRAME = 8


def hint_matches(hint: dict[str, Any], t: torch.Tensor) -> bool:
    """Whether the hinted codes reproduce ``t`` bit for bit (else the hint is ignored)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or t.dim() != 2:
        return False
    codes = hint["codes"]
    expect = t.shape[::-1] if hint["transpose"] else t.shape
    if tuple(codes.shape) != tuple(expect):
        return False
    w = dequantize_codes(
        codes.cpu(),
        hint["scale"].cpu(),
        None if hint["zero"] is None else hint["zero"].cpu(),
        hint["bits"],
        hint["group_size"],
        t.dtype,
    )
    if hint["transpose"]:
        w = w.T
    a = w.contiguous().reshape(-1).view(torch.uint8)
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


def affine_candidate(
    name: str,
    t: torch.Tensor,
    hint: dict[str, Any],
    encode_stream: Callable,
    codec: str,
    fallback: bool,
    dtype_name: str,
) -> tuple[dict[str, Any], list[bytes], TensorReport]:
    """Header entry (section references local: codes 0, scale 1, zero 2), sections, report."""
    bits, g = int(hint["bits"]), int(hint["group_size"])
    codes = hint["codes"].detach().cpu().to(torch.int64).numpy().reshape(-1)  # (out*in,)
    rows, cols = hint["codes"].shape
    c_codec, c_data, c_rep = encode_stream(codes, 1 << bits, codec, fallback, "codes")
    scale = hint["scale"].detach().cpu().to(torch.float16).contiguous().numpy()
    s_data = scale.astype("<f2").tobytes()
    entry = {
        "name": name,
        "dtype": dtype_name,
        "shape": list(t.shape),
        "scheme": "affine",
        "bits": bits,
        "group": g,
        "rows": int(rows),
        "cols": int(cols),
        "transpose": bool(hint["transpose"]),
        "codes": {"sec": 0, "codec": c_codec},
        "scale": 1,
    }
    sections = [c_data, s_data]
    streams = [c_rep]
    side = len(s_data)
    if hint["zero"] is not None:
        zero = hint["zero"].detach().cpu().to(torch.int64).numpy().reshape(-1)
        z_codec, z_data, z_rep = encode_stream(zero, 1 << bits, codec, fallback, "zero")
        entry["zero"] = {"sec": 2, "codec": z_codec}
        sections.append(z_data)
        streams.append(z_rep)
        side += len(z_data)
    rep = TensorReport(
        name=name,
        shape=tuple(t.shape),
        dtype=dtype_name,
        scheme="affine",
        layout=None,
        numel=t.numel(),
        nonzeros=int(torch.count_nonzero(t.detach())),
        total_bytes=sum(len(s) for s in sections) + _FRAME * len(sections),
        codebook_size=int(rows) * (int(cols) // g),
        codebook_dtype="float16",
        codebook_bits=8 * side,
        weight_bits_pq=int(codes.size) * bits,
        weight_bits=8 * len(c_data),
        streams=tuple(streams),
    )
    return entry, sections, rep


def check_affine(e: dict, where: str, numel: int, req_int, req, refs: list[int], n_sec: int):
    """Validate an affine entry's fields (``req_int``/``req`` raise FormatError)."""
    req_int(e, "bits", 2, 8, where)
    rows = req_int(e, "rows", 1, numel, where)
    cols = req_int(e, "cols", 1, numel, where)
    g = req_int(e, "group", 1, cols, where)
    if rows * cols != numel or cols % g:
        raise FormatError(f"{where}: rows={rows} x cols={cols} (group {g}) does not fit {numel}")
    if not isinstance(req(e, "transpose", bool, where), bool):
        raise FormatError(f"{where}: transpose must be a boolean")
    shape = e["shape"]
    want = [cols, rows] if e["transpose"] else [rows, cols]
    if shape != want:
        raise FormatError(f"{where}: shape {shape} is not the {want} of its codes")
    if e["dtype"] not in ("float32", "float16", "bfloat16"):
        raise FormatError(f"{where}: affine scheme for dtype {e['dtype']}")
    for s in ("codes", "zero"):
        if s == "zero" and s not in e:
            continue
        ref = req(e, s, dict, where)
        if req(ref, "codec", str, f"{where} {s}") not in ("raw", "huffman", "ans"):
            raise FormatError(f"{where}: {s} codec={ref['codec']!r} unknown")
        refs.append(req_int(ref, "sec", 2, n_sec - 1, f"{where} {s}"))
    refs.append(req_int(e, "scale", 2, n_sec - 1, where))


def decode_affine(
    e: dict, secs: list, decode_stream: Callable, dtype: torch.dtype, with_report: bool
) -> tuple[torch.Tensor, TensorReport | None]:
    where = f"tensor '{e['name']}'"
    bits, g, rows, cols = e["bits"], e["group"], e["rows"], e["cols"]
    n_groups = rows * (cols // g)
    c_ref = e["codes"]
    codes, c_pay = decode_stream(
        c_ref["codec"], secs[c_ref["sec"]], rows * cols, 1 << bits, f"{where} codes"
    )
    s_data = secs[e["scale"]]
    if len(s_data) != 2 * n_groups:
        raise FormatError(
            f"{where}: scale section has {len(s_data)} bytes, expected {2 * n_groups}"
        )
    scale = torch.from_numpy(
        np.frombuffer(s_data, dtype="<f2").astype(np.float16).reshape(rows, -1)
    )
    zero = None
    streams = []
    side = len(s_data)
    if "zero" in e:
        z_ref = e["zero"]
        zs, z_pay = decode_stream(
            z_ref["codec"], secs[z_ref["sec"]], n_groups, 1 << bits, f"{where} zero"
        )
        zero = torch.from_numpy(zs.astype(np.uint8).reshape(rows, -1))
        side += len(secs[z_ref["sec"]])
    q = torch.from_numpy(codes.astype(np.uint8).reshape(rows, cols))
    w = dequantize_codes(q, scale, zero, bits, g, dtype)
    if e["transpose"]:
        w = w.T.contiguous()
    rep = None
    if with_report:
        from ..coding.entropy import empirical_entropy

        def srep(role, codec, sym, sec, payload):
            return StreamReport(
                role,
                codec,
                int(sym.size),
                1 << bits,
                empirical_entropy(sym),
                payload,
                8 * len(secs[sec]) - payload,
            )

        streams.append(srep("codes", c_ref["codec"], codes, c_ref["sec"], c_pay))
        if "zero" in e:
            streams.append(srep("zero", e["zero"]["codec"], zs, e["zero"]["sec"], z_pay))
        total = len(secs[c_ref["sec"]]) + side
        n_sections = 3 if "zero" in e else 2
        rep = TensorReport(
            name=e["name"],
            shape=tuple(e["shape"]),
            dtype=e["dtype"],
            scheme="affine",
            layout=None,
            numel=rows * cols,
            nonzeros=int(torch.count_nonzero(w)),
            total_bytes=total + _FRAME * n_sections,
            codebook_size=n_groups,
            codebook_dtype="float16",
            codebook_bits=8 * side,
            weight_bits_pq=rows * cols * bits,
            weight_bits=8 * len(secs[c_ref["sec"]]),
            streams=tuple(streams),
        )
    return w, rep
