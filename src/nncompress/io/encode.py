"""Writing ``.ncz`` files: per tensor, the scheme, layout, flattening order and index width
that take the fewest bytes (see :mod:`.format` for the layout)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coding.affine import dequantize_codes
from ..coding.sparse import relative_index_encode
from ..core.errors import ConfigError
from ..core.files import atomic_write
from ..core.modules import folded_copy
from ..core.progress import Progress, progress_task
from .config import EncodeConfig, check_overrides, match_override
from .context_layout import encode_context
from .format import (
    _CODEBOOK_DTYPES,
    _FRAME,
    _PREFIX,
    _TORCH_DTYPES,
    MAGIC,
    MAX_NDIM,
    VERSION,
    _canonical_json,
    _encode_stream,
    _frame,
    _raw_width,
    alias_report,
    nonzero_count,
    written_minor,
)
from .pq_scheme import PQ_MAX_K, find_subvector_codebook, fp16_exact, pq_table
from .report import EncodeReport, TensorReport
from .sparse_values import MAX_DENSITY, sparse_candidates

__all__ = [
    "encode_state_dict",
    "pq_block_hints",
    "round_for_storage_",
    "save_compressed",
    "storage_hints",
]

log = logging.getLogger(__name__)


@dataclass
class _Candidate:
    entry: dict[str, Any]  # header entry; section references are local indices 0..
    sections: list[bytes]
    report: TensorReport

    @property
    def nbytes(self) -> int:
        return sum(len(s) + _FRAME.size for s in self.sections)


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise ValueError(f"dtype={name}: not supported (allowed: {sorted(_TORCH_DTYPES)})")
    return name


def _raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _dense_candidate(name: str, t: torch.Tensor, config: EncodeConfig) -> _Candidate:
    dtype = _dtype_name(t)
    if dtype == "float32" and config.dense_dtype == "fp16":
        store = "float16"
        data = t.detach().cpu().contiguous().numpy().astype("<f2").tobytes()
    else:
        store, data = "raw", _raw_bytes(t)
    entry = {"name": name, "dtype": dtype, "shape": list(t.shape), "scheme": "dense"}
    entry.update(store=store, data=0)
    nnz = nonzero_count(t)
    rep = TensorReport(
        name=name,
        shape=tuple(t.shape),
        dtype=dtype,
        scheme="dense",
        layout=None,
        numel=t.numel(),
        nonzeros=nnz,
        total_bytes=len(data) + _FRAME.size,
        dense_store=store,
        dense_bits=8 * len(data),
    )
    return _Candidate(entry, [data], rep)


def _codebook_values(arr: np.ndarray, config: EncodeConfig):
    """Distinct nonzero bit patterns, the index of each nonzero into them, the zero mask and
    the float type; ``None`` when there are more than 2**max_codebook_bits distinct values."""
    ftype, utype = _CODEBOOK_DTYPES[arr.dtype.name]
    v = arr.astype(np.float16).astype(ftype) if config.codebook_dtype == "fp16" else arr
    bits = np.ascontiguousarray(v).view(utype).ravel()  # (numel,)
    sign = utype(1 << (8 * bits.itemsize - 1))
    is_zero = (bits & ~sign) == 0  # +0.0 and -0.0
    limit = 1 << config.max_codebook_bits
    head = bits[:65536][~is_zero[:65536]]
    if head.size > limit and np.unique(head).size > limit:  # cheap early exit (dense weights)
        return None
    uniq, inv = np.unique(bits[~is_zero], return_inverse=True)  # distinct bit patterns
    return uniq, inv.reshape(-1), is_zero, ftype


def _dense_codes_candidate(base, common, full, codebook, cb_bytes, nnz, config) -> _Candidate:
    """Codebook tensor with a code per element (C order); zero is inserted into the codebook
    at its sorted place when the tensor has zeros."""
    k = int(codebook.size)
    if nnz < full.size:
        zpos = int(np.searchsorted(codebook, 0.0)) if k else 0
        codes = np.where(full < 0, zpos, full + (full >= zpos))
        alphabet = k + 1
    else:
        codes, alphabet = full, k
    codec, data, srep = _encode_stream(
        codes, alphabet, config.codec, config.codec_fallback, "codes"
    )
    entry = dict(base, layout="dense", codes={"sec": 1, "codec": codec})
    rep = TensorReport(
        layout="dense",
        total_bytes=len(cb_bytes) + len(data) + 2 * _FRAME.size,
        weight_bits_pq=int(codes.size) * _raw_width(alphabet),
        weight_bits=8 * len(data),
        streams=(srep,),
        **common,
    )
    return _Candidate(entry, [cb_bytes, data], rep)


def _codebook_candidates(
    name: str, t: torch.Tensor, config: EncodeConfig, index_bits: list[int], forced: bool
) -> list[_Candidate]:
    dtype = _dtype_name(t)
    if dtype not in _CODEBOOK_DTYPES or t.numel() == 0:
        if forced:
            raise ConfigError(
                f"scheme['{name}']='codebook': tensor has dtype {dtype} and {t.numel()} "
                f"elements; the codebook scheme needs a non-empty float32/float16 tensor"
            )
        return []
    arr = t.detach().cpu().contiguous().numpy()
    values = _codebook_values(arr, config)
    k = int(values[0].size) if values is not None else (1 << config.max_codebook_bits) + 1
    if k > (1 << config.max_codebook_bits):
        if forced:
            raise ConfigError(
                f"scheme['{name}']='codebook': the tensor has more than "
                f"2**max_codebook_bits={1 << config.max_codebook_bits} distinct nonzero values"
            )
        return []
    uniq, inv, is_zero, ftype = values
    vals = uniq.view(ftype)  # (k,)
    perm = np.argsort(vals, kind="stable")  # ascending values (NaN last)
    rank = np.empty(k, dtype=np.int64)
    rank[perm] = np.arange(k)
    codebook = vals[perm]  # (k,)
    cb_store = "float16" if config.codebook_dtype == "fp16" else dtype
    cb_bytes = codebook.astype("<f2" if cb_store == "float16" else "<f4").tobytes()
    full = np.full(arr.size, -1, dtype=np.int64)  # (numel,) code per element, -1 = zero
    full[~is_zero] = rank[inv]
    nnz = int(k and (~is_zero).sum())
    base = {"name": name, "dtype": dtype, "shape": list(t.shape), "scheme": "codebook"}
    base.update(k=k, cb=cb_store, nnz=nnz, codebook=0)
    common = dict(
        name=name,
        shape=tuple(t.shape),
        dtype=dtype,
        scheme="codebook",
        numel=int(arr.size),
        nonzeros=nnz,
        codebook_size=k,
        codebook_dtype=cb_store,
        codebook_bits=8 * len(cb_bytes),
    )
    out: list[_Candidate] = []
    # 'context' applies to weights of 2+ dimensions with a nonzero; other tensors fall back to
    # the smallest of the remaining layouts
    can_context = t.dim() >= 2 and nnz > 0
    layout = "auto" if config.layout == "context" and not can_context else config.layout
    if can_context and (layout == "context" or (layout == "auto" and config.codec == "context")):
        out.append(_Candidate(*encode_context(base, common, full, tuple(t.shape), k, cb_bytes)))
    if layout == "context":
        return out
    if layout in ("auto", "dense"):
        out.append(_dense_codes_candidate(base, common, full, codebook, cb_bytes, nnz, config))
    if layout == "dense":
        return out
    # layout 'sparse': relative indices in each flattening order + one code per nonzero
    orders = ["C", "F"] if config.order == "auto" else [config.order]
    if t.dim() < 2:
        orders = orders[:1]
    for order in orders:
        flat = full if order == "C" else full.reshape(arr.shape).ravel(order="F")  # (numel,)
        keep = flat >= 0
        c_codec, c_data, c_rep = _encode_stream(
            flat[keep], max(k, 1), config.codec, config.codec_fallback, "codes"
        )
        for b in index_bits:
            ri = relative_index_encode(keep, b)
            i_codec, i_data, i_rep = _encode_stream(
                ri.entries, 1 << b, config.codec, config.codec_fallback, "index"
            )
            entry = dict(
                base,
                layout="sparse",
                order=order,
                b=b,
                entries=int(ri.entries.size),
                codes={"sec": 1, "codec": c_codec},
                index={"sec": 2, "codec": i_codec},
            )
            rep = TensorReport(
                layout="sparse",
                total_bytes=len(cb_bytes) + len(c_data) + len(i_data) + 3 * _FRAME.size,
                order=order,
                index_bits=b,
                fillers=ri.n_fillers,
                weight_bits_pq=nnz * _raw_width(max(k, 1)),
                weight_bits=8 * len(c_data),
                index_bits_pq=ri.fixed_bits,
                index_bits_coded=8 * len(i_data),
                streams=(c_rep, i_rep),
                **common,
            )
            out.append(_Candidate(entry, [cb_bytes, c_data, i_data], rep))
    return out


def _index_bits_for(name: str, t: torch.Tensor, config: EncodeConfig) -> list[int]:
    """Index bits to try: the per-tensor override, else the conv/FC default, or with
    ``auto_index_bits`` every b in [2, 12] (the smallest file wins)."""
    override = match_override(config.index_bits, name)
    if override is not None:
        return [int(override)]
    if config.auto_index_bits:
        return list(range(2, 13))
    return [config.index_bits_conv if t.dim() >= 3 else config.index_bits_fc]


def _pq_block_sizes(name: str, t: torch.Tensor, config: EncodeConfig, hint: int | None):
    """Block sizes to try for the pq scheme, and whether the scheme is forced."""
    override = match_override(config.pq_block_size, name)
    if t.dim() < 2 and name not in config.pq_block_size:
        return [], False  # a module-name key means the module's weights, not its bias
    if override is not None:
        return [int(override)], True
    ds = set(config.pq_block_sizes) | ({hint} if hint else set())
    return sorted(d for d in ds if t.numel() % d == 0 and t.numel() // d >= 2), False


def _pq_candidate(name: str, arr: np.ndarray, d: int, config: EncodeConfig, forced: bool):
    """The pq scheme with block size ``d``, or ``None`` if it cannot reproduce ``arr``."""
    dtype = arr.dtype.name
    found = find_subvector_codebook(
        arr, d, fp16=config.codebook_dtype == "fp16", give_up_early=not forced
    )
    if found is None:
        if forced:
            raise ConfigError(
                f"pq_block_size['{name}']={d}: the tensor has more than {PQ_MAX_K} distinct "
                f"nonzero {d}-value subvectors (or none)"
            )
        return None
    codebook, codes, zero = found
    k = int(codebook.shape[0])
    exact16 = config.codebook_dtype == "fp16" or dtype == "float16" or fp16_exact(codebook)
    cb_store = "float16" if exact16 else dtype  # fp16 when that is lossless
    cb_bytes = codebook.astype("<f2" if cb_store == "float16" else "<f4").tobytes()
    alphabet = k + int(zero)
    codec, data, srep = _encode_stream(
        codes, alphabet, config.codec, config.codec_fallback, "codes"
    )
    entry = {"name": name, "dtype": dtype, "shape": list(arr.shape), "scheme": "pq"}
    entry.update(d=d, k=k, zero=zero, cb=cb_store, codebook=0, codes={"sec": 1, "codec": codec})
    rep = TensorReport(
        name=name,
        shape=tuple(arr.shape),
        dtype=dtype,
        scheme="pq",
        layout=None,
        numel=int(arr.size),
        nonzeros=int(np.count_nonzero(pq_table(codebook, zero)[codes])),
        total_bytes=len(cb_bytes) + len(data) + 2 * _FRAME.size,
        codebook_size=k,
        codebook_dtype=cb_store,
        codebook_bits=8 * len(cb_bytes),
        weight_bits_pq=int(codes.size) * _raw_width(alphabet),
        weight_bits=8 * len(data),
        streams=(srep,),
        block_size=d,
    )
    return _Candidate(entry, [cb_bytes, data], rep)


def _pq_candidates(
    name: str, t: torch.Tensor, config: EncodeConfig, ds: list[int], forced: bool
) -> list[_Candidate]:
    """The pq scheme for each block size ``d`` that reproduces ``t`` (see :mod:`.pq_scheme`)."""
    dtype = _dtype_name(t)
    if dtype not in _CODEBOOK_DTYPES or t.numel() == 0:
        if forced:
            raise ConfigError(
                f"pq_block_size['{name}']: tensor has dtype {dtype} and {t.numel()} elements; "
                "the pq scheme needs a non-empty float32/float16 tensor"
            )
        return []
    arr = t.detach().cpu().contiguous().numpy()
    out = []
    for d in ds:
        if arr.size % d:
            raise ConfigError(
                f"pq_block_size['{name}']={d}: does not divide the tensor's {arr.size} elements"
            )
        cand = _pq_candidate(name, arr, d, config, forced)
        if cand is not None:
            out.append(cand)
    return out


def _hint_matches(hint: dict[str, Any], t: torch.Tensor) -> bool:
    """Whether a quantized layer's codes reproduce ``t`` bit for bit (else the hint is ignored)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or t.dim() != 2:
        return False
    codes = hint["codes"]
    if tuple(codes.shape) != tuple(t.shape[::-1] if hint["transpose"] else t.shape):
        return False
    zero = None if hint["zero"] is None else hint["zero"].cpu()
    w = dequantize_codes(
        codes.cpu(), hint["scale"].cpu(), zero, hint["bits"], hint["group_size"], t.dtype
    )
    w = w.T if hint["transpose"] else w
    a = w.contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a, t.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def _affine_candidate(name: str, t: torch.Tensor, hint: dict, config: EncodeConfig) -> _Candidate:
    """The ``affine`` scheme (format 1.3): the code stream, float16 scales, the zero-point
    stream (asymmetric codes), as a weight-only quantized layer holds them."""
    bits, g = int(hint["bits"]), int(hint["group_size"])
    rows, cols = hint["codes"].shape
    codes = hint["codes"].detach().cpu().to(torch.int64).numpy().reshape(-1)  # (rows*cols,)
    c_codec, c_data, c_rep = _encode_stream(
        codes, 1 << bits, config.codec, config.codec_fallback, "codes"
    )
    s_data = hint["scale"].detach().cpu().to(torch.float16).contiguous().numpy().astype("<f2")
    sections, streams = [c_data, s_data.tobytes()], [c_rep]
    entry = {"name": name, "dtype": _dtype_name(t), "shape": list(t.shape), "scheme": "affine"}
    entry.update(bits=bits, group=g, rows=int(rows), cols=int(cols))
    entry.update(transpose=bool(hint["transpose"]), codes={"sec": 0, "codec": c_codec}, scale=1)
    if hint["zero"] is not None:
        zero = hint["zero"].detach().cpu().to(torch.int64).numpy().reshape(-1)
        z_codec, z_data, z_rep = _encode_stream(
            zero, 1 << bits, config.codec, config.codec_fallback, "zero"
        )
        entry["zero"] = {"sec": 2, "codec": z_codec}
        sections.append(z_data)
        streams.append(z_rep)
    side = sum(len(x) for x in sections[1:])
    rep = TensorReport(
        name=name,
        shape=tuple(t.shape),
        dtype=entry["dtype"],
        scheme="affine",
        layout=None,
        numel=t.numel(),
        nonzeros=nonzero_count(t),
        total_bytes=sum(len(x) for x in sections) + _FRAME.size * len(sections),
        codebook_size=int(rows) * (int(cols) // g),
        codebook_dtype="float16",
        codebook_bits=8 * side,
        weight_bits_pq=int(codes.size) * bits,
        weight_bits=8 * len(c_data),
        streams=tuple(streams),
    )
    return _Candidate(entry, sections, rep)


def _best_candidate(
    name: str,
    t: torch.Tensor,
    config: EncodeConfig,
    pq_hint: int | None = None,
    hint: dict | None = None,
) -> _Candidate:
    scheme = match_override(config.scheme, name) or "auto"
    if hint is not None and hint.get("scheme") == "codebook":
        # a shared weight with k > 2**max_codebook_bits centroids still takes the codebook
        need = max(1, int(hint["k"]) - 1).bit_length()
        if need > config.max_codebook_bits:
            config = dataclasses.replace(config, max_codebook_bits=min(need, 16))
    ds, pq_forced = _pq_block_sizes(name, t, config, pq_hint)
    if pq_forced and scheme not in ("auto", "pq"):
        raise ConfigError(f"pq_block_size['{name}'] conflicts with scheme['{name}']={scheme!r}")
    if scheme == "pq" and not ds:
        raise ConfigError(f"scheme['{name}']='pq': no block size to try; set pq_block_size")
    b = _index_bits_for(name, t, config)
    cands: list[_Candidate] = []
    if hint is not None and hint.get("scheme") == "affine" and scheme == "auto":
        if _hint_matches(hint, t):
            cands.append(_affine_candidate(name, t, hint, config))
        else:
            log.warning(
                "tensor %s: its quantized codes do not reproduce it; stored otherwise", name
            )
    if scheme in ("auto", "pq"):
        cands += _pq_candidates(name, t, config, ds, forced=pq_forced or scheme == "pq")
    if scheme == "pq" or pq_forced:
        return min(cands, key=lambda c: c.nbytes)
    if scheme in ("auto", "codebook"):
        cands += _codebook_candidates(name, t, config, b, forced=scheme == "codebook")
    if scheme in ("auto", "sparse"):
        sparse = sparse_candidates(name, t, config, b, _Candidate)
        if not sparse and scheme == "sparse":
            raise ConfigError(
                f"scheme['{name}']='sparse': needs a non-empty float32/float16 tensor with at "
                f"most {MAX_DENSITY:.0%} nonzeros"
            )
        cands += sparse
    if scheme in ("auto", "dense"):
        cands.append(_dense_candidate(name, t, config))
    return min(cands, key=lambda c: c.nbytes)  # first of equals wins: deterministic


def pq_block_hints(model: nn.Module) -> dict[str, int]:
    """``{tensor name: d}`` of the model's product-quantized weights (a parametrization with a
    ``pq_block_size``, as :class:`nncompress.quant.PQWeight`), found before folding."""
    from torch.nn.utils import parametrize

    hints = {}
    for mname, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for pname, plist in m.parametrizations.items():
                for p in plist:
                    d = getattr(p, "pq_block_size", None)
                    if isinstance(d, int):
                        hints[f"{mname}.{pname}" if mname else pname] = d
    return hints


def storage_hints(model: nn.Module) -> dict[str, dict]:
    """``{tensor name: hint}`` from parametrizations that know their compact storage (a
    ``storage_hint()`` method: weight-only quantized layers' codes and scales, shared weights'
    codebook size), found before folding."""
    from torch.nn.utils import parametrize

    hints: dict[str, dict] = {}
    for mname, m in model.named_modules():
        if parametrize.is_parametrized(m):
            for pname, plist in m.parametrizations.items():
                if hasattr(plist[-1], "storage_hint"):
                    hints[f"{mname}.{pname}" if mname else pname] = plist[-1].storage_hint()
    return hints


def _alias_key(t: torch.Tensor) -> tuple:
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return (str(t.dtype), tuple(t.shape), zlib.crc32(raw), len(raw))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    fa = a.detach().cpu().contiguous().reshape(-1)
    fb = b.detach().cpu().contiguous().reshape(-1)
    return fa.numel() == 0 or torch.equal(fa.view(torch.uint8), fb.view(torch.uint8))


def _as_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]):
    if isinstance(model_or_state, nn.Module):
        plain = folded_copy(model_or_state)
        return dict(plain.state_dict())
    if not isinstance(model_or_state, Mapping):
        raise ValueError(
            f"model_or_state: expected an nn.Module or a mapping of name -> tensor, got "
            f"{type(model_or_state).__name__}"
        )
    for k, v in model_or_state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry {k!r}: must map a str name to a torch.Tensor")
    return dict(model_or_state)


def _with_architecture(state: Any, metadata: Any) -> Any:
    """Metadata that lets ``nncompress decode`` / ``eval`` rebuild a model saved from Python:
    for an ``nn.Module`` without a ``"checkpoint"`` entry, its architecture
    (:func:`~nncompress.engine.modspec.describe_model`) is added under
    ``{"checkpoint": {"architecture": ...}}``; anything else is kept as given."""
    if not isinstance(state, nn.Module):
        return metadata
    if metadata is not None and (not isinstance(metadata, dict) or "checkpoint" in metadata):
        return metadata
    from .. import __version__
    from ..engine.modspec import describe_model

    info = {"architecture": describe_model(folded_copy(state)), "nncompress_version": __version__}
    return {**(metadata or {}), "checkpoint": info}


def _placed(
    name: str,
    t: torch.Tensor,
    config: EncodeConfig,
    first: int,
    pq_hint: int | None = None,
    hint: dict | None = None,
):
    """The best candidate of one tensor and its header entry, with section references
    shifted to start at section ``first``."""
    cand = _best_candidate(name, t, config, pq_hint, hint)
    entry = copy.deepcopy(cand.entry)
    for key in ("data", "codebook", "scale"):
        if key in entry:
            entry[key] += first
    for key in ("codes", "index", "zero"):  # a pq entry's "zero" is a flag, not a stream
        if isinstance(entry.get(key), dict):
            entry[key]["sec"] += first
    for ref in entry.get("planes", ()):
        ref["sec"] += first
    log.debug("encoded %s: %s, %d bytes", name, entry["scheme"], cand.nbytes)
    return entry, cand


def encode_state_dict(
    state: Mapping[str, torch.Tensor] | nn.Module,
    config: EncodeConfig | None = None,
    metadata: dict[str, Any] | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[bytes, EncodeReport]:
    """Encode a state dict (or a model's, parametrizations folded) into ``.ncz`` bytes.

    Each tensor is stored with the scheme, layout and flattening order that give the fewest
    bytes (see module docstring), its streams coded with ``config.codec``. A tensor
    bit-identical to an earlier one (a tied embedding and LM head) is stored once, as an
    ``alias``; a model's weight-only quantized layers as their codes and scales (``affine``).
    The same inputs
    always produce the same bytes.

    Returns
    -------
    (data, report): the file's bytes and its itemised :class:`EncodeReport`.
    """
    config = config or EncodeConfig()
    if not isinstance(config, EncodeConfig):
        raise ValueError(f"config: expected an EncodeConfig, got {type(config).__name__}")
    sd = _as_state_dict(state)
    metadata = _with_architecture(state, metadata)
    hints = pq_block_hints(state) if isinstance(state, nn.Module) else {}
    stored = storage_hints(state) if isinstance(state, nn.Module) else {}
    names = list(sd)
    check_overrides(config, names)
    for name, t in sd.items():
        _dtype_name(t)  # unsupported dtypes fail before any work
        if t.dim() > MAX_NDIM:
            raise ValueError(f"tensor '{name}': {t.dim()} dims, at most {MAX_NDIM} supported")
    meta_payload = _canonical_json(metadata, "metadata")
    entries, sections, reports = [], [], []
    seen: dict[tuple, list[str]] = {}  # content key -> names stored so far
    with progress_task(progress, "encode", len(names)) as task:
        for name in names:
            t = sd[name]
            ckey = _alias_key(t)
            twin = next((n for n in seen.get(ckey, []) if _same_bits(sd[n], t)), None)
            if twin is not None and (match_override(config.scheme, name) or "auto") == "auto":
                entries.append(
                    {"name": name, "dtype": _dtype_name(t), "shape": list(t.shape)}
                    | {"scheme": "alias", "of": twin}
                )
                reports.append(alias_report(name, t))
                task.advance()
                continue
            seen.setdefault(ckey, []).append(name)
            entry, cand = _placed(
                name, t, config, 2 + len(sections), hints.get(name), stored.get(name)
            )
            entries.append(entry)
            sections += cand.sections
            reports.append(cand.report)
            task.advance()
    header = {"format": "nncompress-ncz", "tensors": entries}
    head_payload = _canonical_json(header, "header")
    payloads = [head_payload, meta_payload, *sections]
    frames = [_frame(p, i) for i, p in enumerate(payloads)]
    # every file this version writes binds its CRCs to the section indices: version 1.2 (it
    # holds whatever scheme 1.1 added), or what its contents need (1.3, 1.4 for 'context')
    prefix = _PREFIX.pack(MAGIC, VERSION[0], written_minor(entries), len(frames))
    data = prefix + b"".join(frames)
    report = EncodeReport(
        tensors=tuple(reports),
        prefix_bytes=_PREFIX.size,
        header_bytes=len(head_payload) + _FRAME.size,
        metadata_bytes=len(meta_payload) + _FRAME.size,
        total_bytes=len(data),
        config=config.to_dict(),
    )
    return data, report


def save_compressed(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    config: EncodeConfig | None = None,
    metadata: dict[str, Any] | None = None,
    *,
    progress: Progress | None = None,
) -> EncodeReport:
    """Encode a model or state dict and write it atomically to ``path`` (``.ncz``)."""
    data, report = encode_state_dict(model_or_state, config, metadata, progress=progress)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return report


def round_for_storage_(model: nn.Module, config: EncodeConfig | None = None) -> dict[str, float]:
    """Round ``model``'s tensors in place exactly as :func:`save_compressed` will store them.

    With ``codebook_dtype='fp16'`` or ``dense_dtype='fp16'`` the container rounds values to
    float16, and in the codebook scheme -0.0 becomes +0.0. Calling this before the final
    evaluation makes the evaluated model and the decoded file identical bit for bit. Each
    tensor is encoded and decoded with the same scheme choice as the file will make.

    Parametrizations that know their storage stay in place: a weight-only quantized layer is
    stored exactly (nothing to round); a shared weight's codebook is rounded as the codebook
    scheme stores it. Other parametrizations (pruning masks alone) must be folded first.

    Returns
    -------
    dict: tensor name -> largest absolute change (0.0 for untouched tensors).
    """
    from torch.nn.utils import parametrize

    from .decode import decode_entry

    config = config or EncodeConfig()
    changes: dict[str, float] = {}
    skip: list[str] = []
    for mname, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            last = plist[-1]
            if not hasattr(last, "storage_hint"):
                raise ValueError(
                    f"round_for_storage_: module '{mname}' is parametrized ({type(last).__name__}"
                    "); fold the parametrizations first (nncompress.engine.strip_parametrizations)"
                )
            key = f"{mname}.{pname}" if mname else pname
            changes[key] = 0.0
            if last.storage_hint()["scheme"] == "codebook":
                with torch.no_grad():
                    cb = last.codebook
                    new = cb.half().to(cb.dtype) if config.codebook_dtype == "fp16" else cb
                    new = new + 0.0  # -0.0 -> +0.0, as the codebook scheme stores zeros
                    changes[key] = float((new - cb).abs().max()) if cb.numel() else 0.0
                    cb.copy_(new)
        skip.append(f"{mname}.parametrizations." if mname else "parametrizations.")
    live = {
        k: v
        for k, v in model.state_dict(keep_vars=True).items()
        if not any(k.startswith(p) for p in skip)
    }
    check_overrides(config, list(live) + list(changes))
    for name, t in live.items():
        cand = _best_candidate(name, t.detach(), config)
        secs = [memoryview(s) for s in cand.sections]
        decoded = decode_entry(cand.entry, secs, with_report=False)[0]
        diff = (decoded.to(torch.float64) - t.detach().cpu().to(torch.float64)).abs()
        changes[name] = float(diff.max()) if diff.numel() and t.is_floating_point() else 0.0
        with torch.no_grad():
            t.copy_(decoded.to(t.device))
    return changes
