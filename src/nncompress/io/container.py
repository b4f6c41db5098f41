"""The ``.ncz`` container: a state dict stored with Deep Compression's stage-3 coding.

Byte layout (all integers little-endian; full description in docs/format.md)::

    prefix   16 bytes: magic b"\\x89NCZ\\r\\n\\x1a\\n", u16 major=1, u16 minor=0, u32 sections S
    S sections, each framed as: u32 length, u32 CRC32 (zlib.crc32 of the payload), payload
      section 0   header: zlib-deflated canonical JSON (tensor names, shapes, dtypes, schemes,
                  codecs, references to the sections below)
      section 1   metadata: zlib-deflated canonical JSON chosen by the caller (e.g. the
                  checkpoint sidecar: architecture, dataset, metrics), or null
      section 2.. tensor data: codebooks, weight-code streams, relative-index streams, dense
                  tensors -- one section each, in header order

Schemes (chosen per tensor to minimise bytes unless overridden, see :class:`EncodeConfig`):

* ``dense``: the tensor's raw bytes (any dtype, exact), or float16 for float32 tensors when
  ``dense_dtype='fp16'``.
* ``codebook`` (floating tensors with at most ``2**max_codebook_bits`` distinct nonzero
  values: shared weights after k-means, or any tensor with few values): a codebook of the
  distinct nonzero values sorted ascending, then either
  ``layout='sparse'``: the relative-index stream of the nonzero positions (with fillers, see
  :mod:`nncompress.coding.sparse`) and one code per nonzero; or ``layout='dense'``: one code per
  element (zero being a codebook value). Both streams are Huffman-, ANS- or fixed-width-coded.

Zeros: in the codebook scheme both +0.0 and -0.0 count as zero and decode to +0.0 (a masked
weight ``w * 0`` is -0.0 when ``w < 0``; keeping the sign would make every pruned negative weight
a nonzero). ``round_for_storage_`` applies the same rule, so decoded == evaluated bit for bit.
Every other value, NaN payloads included, is kept bit-exactly.

Decoding validates every length, count and shape against the remaining bytes and sane limits
before allocating, checks each section's CRC32, and raises :class:`FormatError` (a
``ValueError``) for any damage -- never another exception.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coding.ans import AnsStream, ans_decode, ans_encode
from ..coding.bitpack import ByteReader, CodingError, pack_bits, write_uvarint
from ..coding.entropy import empirical_entropy
from ..coding.huffman import HuffmanStream, huffman_decode, huffman_encode
from ..coding.sparse import MAX_INDEX_BITS, relative_index_decode, relative_index_encode
from ..core.errors import ConfigError
from ..core.files import atomic_write
from ..core.modules import folded_copy
from ..core.progress import Progress, progress_task
from .affine import affine_candidate, check_affine, decode_affine, hint_matches
from .config import EncodeConfig, check_overrides, match_override
from .errors import FormatError
from .report import EncodeReport, StreamReport, TensorReport

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "MAGIC",
    "VERSION",
    "decode_bytes",
    "decode_file",
    "encode_state_dict",
    "inspect_bytes",
    "inspect_file",
    "load_compressed",
    "round_for_storage_",
    "save_compressed",
]

log = logging.getLogger(__name__)

MAGIC = b"\x89NCZ\r\n\x1a\n"
VERSION = (1, 1)  # 1.1 adds the 'affine' and 'alias' schemes (io/affine.py)
_PREFIX = struct.Struct("<8sHHI")
_FRAME = struct.Struct("<II")
MAX_HEADER_BYTES = 16 << 20  # decompressed header / metadata JSON
MAX_SECTIONS = 1 << 22
MAX_NDIM = 16
DEFAULT_MAX_ELEMENTS = 1 << 28  # total tensor elements a file may declare (1 GiB of fp32)
# beyond 2**24 elements a file must hold at least one byte per 65536 elements (a crafted
# 100-byte file must not make the decoder allocate gigabytes)
PLAUSIBLE_FREE_ELEMENTS = 1 << 24
PLAUSIBLE_ELEMENTS_PER_BYTE = 1 << 16

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    # format 1.1: every other fixed-size dtype a state dict may hold, stored raw
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# floating dtypes that may use the codebook scheme: numpy float type and same-size uint view
_CODEBOOK_DTYPES = {"float32": (np.float32, np.uint32), "float16": (np.float16, np.uint16)}
_STORE_BYTES = {"float16": 2, "float32": 4}


# ----------------------------------------------------------------------------- streams


def _raw_width(alphabet: int) -> int:
    return max(0, alphabet - 1).bit_length()


def _encode_stream(
    symbols: np.ndarray, alphabet: int, codec: str, fallback: bool, role: str
) -> tuple[str, bytes, StreamReport]:
    """Code one symbol stream; returns (codec used, bytes, report)."""
    n = int(symbols.size)
    width = _raw_width(alphabet)
    raw = write_uvarint(n) + bytes([width]) + pack_bits(symbols.astype(np.int64), width)
    raw_payload = n * width
    used, data, payload = "raw", raw, raw_payload
    if codec == "huffman":
        hs = huffman_encode(symbols)
        used, data, payload = "huffman", hs.to_bytes(), hs.payload_bits
    elif codec == "ans":
        a = ans_encode(symbols)
        used, data, payload = "ans", a.to_bytes(), a.payload_bits
    if used != "raw" and fallback and len(raw) < len(data):
        used, data, payload = "raw", raw, raw_payload
    rep = StreamReport(
        role=role,
        codec=used,
        symbols=n,
        alphabet=alphabet,
        entropy=empirical_entropy(symbols),
        payload_bits=payload,
        table_bits=8 * len(data) - payload,
    )
    return used, data, rep


def _decode_stream(
    codec: str, data: memoryview, n: int, alphabet: int, what: str
) -> tuple[np.ndarray, int]:
    """Decode a stream of exactly ``n`` symbols below ``alphabet``: (symbols, payload bits)."""
    try:
        if codec == "raw":
            r = ByteReader(data)
            got = r.varint(f"{what}: symbol count", n)
            width = r.u8(f"{what}: width")
            if got != n or width != _raw_width(alphabet):
                raise CodingError(
                    f"raw stream header (n={got}, width={width}) does not match the "
                    f"expected n={n}, width={_raw_width(alphabet)}"
                )
            sym = r.packed(n, width, "raw symbols")
            r.expect_end("raw stream")
            payload = n * width
        elif codec == "huffman":
            hs = HuffmanStream.from_bytes(data, max_symbols=n)
            if hs.n != n or hs.alphabet_size > alphabet:
                raise CodingError(
                    f"huffman stream has {hs.n} symbols over {hs.alphabet_size} values; expected "
                    f"{n} symbols below {alphabet}"
                )
            sym, payload = huffman_decode(hs), hs.payload_bits
        elif codec == "ans":
            a = AnsStream.from_bytes(data, max_symbols=n)
            if a.n != n or a.alphabet_size > alphabet:
                raise CodingError(
                    f"ans stream has {a.n} symbols over {a.alphabet_size} values; expected "
                    f"{n} symbols below {alphabet}"
                )
            sym, payload = ans_decode(a), a.payload_bits
        else:
            raise CodingError(f"codec={codec!r}: must be one of raw, huffman, ans")
    except CodingError as exc:
        raise FormatError(f"{what}: {exc}") from exc
    if sym.size and (int(sym.max()) >= alphabet or int(sym.min()) < 0):
        raise FormatError(f"{what}: symbol out of range [0, {alphabet})")
    return sym, payload


# ----------------------------------------------------------------------------- encoding


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


def _nnz(t: torch.Tensor) -> int:
    """Nonzero elements (dtypes without ``count_nonzero``, e.g. uint16 or float8, count the
    elements with any nonzero byte)."""
    if t.numel() == 0:
        return 0
    try:
        return int(torch.count_nonzero(t.detach()))
    except (NotImplementedError, RuntimeError):
        size = t.element_size()
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).reshape(-1, size)
        return int(raw.any(dim=1).sum())


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
    nnz = _nnz(t)
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
    if config.layout != "sparse":
        out.append(_dense_codes_candidate(base, common, full, codebook, cb_bytes, nnz, config))
    if config.layout == "dense":
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


def _best_candidate(
    name: str, t: torch.Tensor, config: EncodeConfig, hint: dict | None = None
) -> _Candidate:
    scheme = match_override(config.scheme, name) or "auto"
    b = _index_bits_for(name, t, config)
    cands: list[_Candidate] = []
    if hint is not None and hint.get("scheme") == "affine" and scheme == "auto":
        if hint_matches(hint, t):
            entry, secs, rep = affine_candidate(
                name, t, hint, _encode_stream, config.codec, config.codec_fallback, _dtype_name(t)
            )
            cands.append(_Candidate(entry, secs, rep))
        else:
            log.warning(
                "tensor %s: its quantized codes do not reproduce it; stored otherwise", name
            )
    if hint is not None and hint.get("scheme") == "codebook":
        # a shared weight with k > 2**max_codebook_bits centroids still takes the codebook
        need = max(1, int(hint["k"]) - 1).bit_length()
        if need > config.max_codebook_bits:
            config = dataclasses.replace(config, max_codebook_bits=min(need, 16))
    if scheme in ("auto", "codebook"):
        cands += _codebook_candidates(name, t, config, b, forced=scheme == "codebook")
    if scheme in ("auto", "dense"):
        cands.append(_dense_candidate(name, t, config))
    return min(cands, key=lambda c: c.nbytes)  # first of equals wins: deterministic


def _alias_report(name: str, t: torch.Tensor, twin: str) -> TensorReport:
    nnz = _nnz(t)
    return TensorReport(
        name=name,
        shape=tuple(t.shape),
        dtype=_dtype_name(t),
        scheme="alias",
        layout=None,
        numel=t.numel(),
        nonzeros=nnz,
        total_bytes=0,
    )


def _canonical_json(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: must be JSON-serialisable ({exc})") from exc
    return zlib.compress(text.encode("ascii"), 9)


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _storage_hints(model: nn.Module) -> dict[str, dict]:
    """``{state-dict key: hint}`` from parametrizations that know their compact storage (a
    ``storage_hint()`` method, e.g. weight-only quantized layers' codes and scales)."""
    from torch.nn.utils import parametrize

    hints: dict[str, dict] = {}
    for mname, m in model.named_modules():
        if not parametrize.is_parametrized(m):
            continue
        for pname, plist in m.parametrizations.items():
            last = plist[-1]
            if hasattr(last, "storage_hint"):
                hints[f"{mname}.{pname}" if mname else pname] = last.storage_hint()
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
    return _state_and_hints(model_or_state)[0]


def _state_and_hints(model_or_state: nn.Module | Mapping[str, torch.Tensor]):
    if isinstance(model_or_state, nn.Module):
        hints = _storage_hints(model_or_state)
        plain = folded_copy(model_or_state)
        return dict(plain.state_dict()), hints
    if not isinstance(model_or_state, Mapping):
        raise ValueError(
            f"model_or_state: expected an nn.Module or a mapping of name -> tensor, got "
            f"{type(model_or_state).__name__}"
        )
    for k, v in model_or_state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry {k!r}: must map a str name to a torch.Tensor")
    return dict(model_or_state), {}


def _placed(name: str, t: torch.Tensor, config: EncodeConfig, first: int, hint=None):
    """The best candidate of one tensor and its header entry, with section references
    shifted to start at section ``first``."""
    cand = _best_candidate(name, t, config, hint)
    entry = copy.deepcopy(cand.entry)
    for key in ("data", "codebook", "scale"):
        if key in entry:
            entry[key] += first
    for key in ("codes", "index", "zero"):
        if key in entry:
            entry[key]["sec"] += first
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
    bytes (see module docstring), its streams coded with ``config.codec``. A tensor bit-identical
    to an earlier one (a tied embedding and LM head) is stored once, as an ``alias``. A model's
    weight-only quantized layers are stored as their codes and scales (``affine``). The same
    inputs always produce the same bytes.

    Returns
    -------
    (data, report): the file's bytes and its itemised :class:`EncodeReport`.
    """
    config = config or EncodeConfig()
    if not isinstance(config, EncodeConfig):
        raise ValueError(f"config: expected an EncodeConfig, got {type(config).__name__}")
    sd, hints = _state_and_hints(state)
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
                reports.append(_alias_report(name, t, twin))
                task.advance()
                continue
            seen.setdefault(ckey, []).append(name)
            entry, cand = _placed(name, t, config, 2 + len(sections), hints.get(name))
            entries.append(entry)
            sections += cand.sections
            reports.append(cand.report)
            task.advance()
    header = {"format": "nncompress-ncz", "tensors": entries}
    head_payload = _canonical_json(header, "header")
    frames = [_frame(head_payload), _frame(meta_payload)] + [_frame(s) for s in sections]
    prefix = _PREFIX.pack(MAGIC, VERSION[0], VERSION[1], len(frames))
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
        decoded = _decode_entry(cand.entry, secs, with_report=False)[0]
        diff = (decoded.to(torch.float64) - t.detach().cpu().to(torch.float64)).abs()
        changes[name] = float(diff.max()) if diff.numel() and t.is_floating_point() else 0.0
        with torch.no_grad():
            t.copy_(decoded.to(t.device))
    return changes


# ----------------------------------------------------------------------------- decoding


def _fail(msg: str) -> FormatError:
    return FormatError(msg)


def _inflate(payload: memoryview, what: str) -> Any:
    d = zlib.decompressobj()
    try:
        text = d.decompress(payload, MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise _fail(f"{what}: not valid deflate data ({exc})") from exc
    if d.unconsumed_tail:
        raise _fail(f"{what}: larger than {MAX_HEADER_BYTES} bytes once inflated")
    if not d.eof or d.unused_data:
        raise _fail(f"{what}: deflate stream truncated or followed by extra bytes")
    try:
        return json.loads(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _fail(f"{what}: not valid JSON ({exc})") from exc


def _split_sections(data: bytes | memoryview) -> list[memoryview]:
    buf = memoryview(data)
    if len(buf) < _PREFIX.size:
        raise _fail(f"file too short ({len(buf)} bytes) to be an .ncz file")
    magic, major, minor, count = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _fail(f"bad magic {bytes(magic)!r}: not an nncompress .ncz file")
    if major != VERSION[0] or minor > VERSION[1]:
        raise _fail(
            f"format version {major}.{minor} is not supported (this reader handles "
            f"{VERSION[0]}.0 to {VERSION[0]}.{VERSION[1]}; a newer minor version comes from a "
            "newer nncompress)"
        )
    if not 2 <= count <= MAX_SECTIONS or count * _FRAME.size > len(buf) - _PREFIX.size:
        raise _fail(f"section count={count}: impossible for a file of {len(buf)} bytes")
    pos = _PREFIX.size
    out = []
    for i in range(count):
        if len(buf) - pos < _FRAME.size:
            raise _fail(f"section {i}: frame truncated at byte {pos}")
        length, crc = _FRAME.unpack_from(buf, pos)
        pos += _FRAME.size
        if length > len(buf) - pos:
            raise _fail(
                f"section {i}: length {length} exceeds the {len(buf) - pos} bytes left "
                "(file truncated?)"
            )
        payload = buf[pos : pos + length]
        if zlib.crc32(payload) != crc:
            raise _fail(f"section {i}: CRC32 mismatch (file corrupted)")
        out.append(payload)
        pos += length
    if pos != len(buf):
        raise _fail(f"{len(buf) - pos} unexpected bytes after the last section")
    return out


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


def _check_header(header: Any, n_sections: int, max_elements: int, file_bytes: int) -> list[dict]:
    if not isinstance(header, dict) or header.get("format") != "nncompress-ncz":
        raise _fail("header: not an nncompress-ncz header")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise _fail("header: 'tensors' must be a list")
    used: set[int] = set()
    total = 0
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
            raise _fail(f"{where}: shape={shape!r} is not a list of <= {MAX_NDIM} sizes")
        numel = math.prod(shape)
        total += numel
        if total > max_elements:
            raise _fail(
                f"{where}: the file declares more than max_elements={max_elements} elements"
            )
        scheme = _req(e, "scheme", str, where)
        refs: list[int] = []
        if scheme == "alias":
            of = _req(e, "of", str, where)
            target = next((x for x in entries[:i] if x.get("name") == of), None)
            if target is None or target.get("scheme") == "alias":
                raise _fail(f"{where}: alias of {of!r}, which is not an earlier stored tensor")
            if target.get("dtype") != dtype or target.get("shape") != shape:
                raise _fail(f"{where}: alias of {of!r} with a different dtype or shape")
            total -= numel  # stored once
        elif scheme == "affine":
            check_affine(e, where, numel, _req_int, _req, refs, n_sections)
        elif scheme == "dense":
            store = _req(e, "store", str, where)
            if store not in ("raw", "float16") or (store == "float16" and dtype != "float32"):
                raise _fail(f"{where}: store={store!r} not valid for dtype {dtype}")
            refs.append(_req_int(e, "data", 2, n_sections - 1, where))
        elif scheme == "codebook":
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
            refs.append(_req_int(e, "codebook", 2, n_sections - 1, where))
            layout = _req(e, "layout", str, where)
            streams = ["codes"]
            if layout == "sparse":
                _req_int(e, "b", 1, MAX_INDEX_BITS, where)
                _req_int(e, "entries", nnz, numel, where)
                if _req(e, "order", str, where) not in ("C", "F"):
                    raise _fail(f"{where}: order={e['order']!r} must be 'C' or 'F'")
                streams.append("index")
            elif layout != "dense":
                raise _fail(f"{where}: layout={layout!r} must be 'sparse' or 'dense'")
            for s in streams:
                ref = _req(e, s, dict, where)
                if _req(ref, "codec", str, f"{where} {s}") not in ("raw", "huffman", "ans"):
                    raise _fail(f"{where}: {s} codec={ref['codec']!r} unknown")
                refs.append(_req_int(ref, "sec", 2, n_sections - 1, f"{where} {s}"))
        else:
            raise _fail(
                f"{where}: scheme={scheme!r} must be 'dense', 'codebook', 'affine' or 'alias'"
            )
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


def _decode_entry(
    e: dict, secs: list[memoryview], *, with_report: bool
) -> tuple[torch.Tensor, TensorReport | None]:
    """Decode one validated header entry; ``secs`` indexed by the entry's references."""
    name, dtype, shape = e["name"], e["dtype"], tuple(e["shape"])
    numel = math.prod(shape)
    tdtype = _TORCH_DTYPES[dtype]
    where = f"tensor '{name}'"
    if e["scheme"] == "affine":
        return decode_affine(e, secs, _decode_stream, tdtype, with_report)
    if e["scheme"] == "dense":
        data = secs[e["data"]]
        store = e["store"]
        item = 2 if store == "float16" else torch.empty(0, dtype=tdtype).element_size()
        if len(data) != numel * item:
            raise _fail(f"{where}: dense data has {len(data)} bytes, expected {numel * item}")
        if numel == 0:
            t = torch.empty(shape, dtype=tdtype)
        elif store == "float16":
            arr = np.frombuffer(data, dtype="<f2").astype(np.float32)
            t = torch.from_numpy(arr).reshape(shape)
        else:
            t = torch.frombuffer(bytearray(data), dtype=tdtype).reshape(shape).clone()
        rep = None
        if with_report:
            rep = TensorReport(
                name=name,
                shape=shape,
                dtype=dtype,
                scheme="dense",
                layout=None,
                numel=numel,
                nonzeros=_nnz(t),
                total_bytes=len(data) + _FRAME.size,
                dense_store=store,
                dense_bits=8 * len(data),
            )
        return t, rep
    k, nnz, cb = e["k"], e["nnz"], e["cb"]
    ftype = _CODEBOOK_DTYPES[dtype][0]
    cb_data = secs[e["codebook"]]
    if len(cb_data) != k * _STORE_BYTES[cb]:
        raise _fail(f"{where}: codebook has {len(cb_data)} bytes, expected {k} x {cb}")
    codebook = np.frombuffer(cb_data, dtype="<f2" if cb == "float16" else "<f4").astype(ftype)
    codes_ref = e["codes"]
    streams: list[StreamReport] = []
    if e["layout"] == "dense":
        alphabet = k + 1 if nnz < numel else k
        codes, payload = _decode_stream(
            codes_ref["codec"], secs[codes_ref["sec"]], numel, alphabet, f"{where} codes"
        )
        if nnz < numel:
            zpos = int(np.searchsorted(codebook, 0.0)) if k else 0
            table = np.insert(codebook, zpos, ftype(0.0))  # (k+1,)
            if int(np.count_nonzero(codes != zpos)) != nnz:
                raise _fail(f"{where}: nnz={nnz} does not match the decoded codes")
        else:
            table = codebook
        flat = table[codes]  # (numel,)
        arr = flat.reshape(shape)
        if with_report:
            streams.append(
                _stream_report(
                    "codes", codes_ref["codec"], codes, alphabet, secs, codes_ref["sec"], payload
                )
            )
        fields = dict(
            layout="dense",
            weight_bits_pq=numel * _raw_width(alphabet),
            weight_bits=8 * len(secs[codes_ref["sec"]]),
            total_bytes=len(cb_data) + len(secs[codes_ref["sec"]]) + 2 * _FRAME.size,
        )
    else:
        b, n_entries, order = e["b"], e["entries"], e["order"]
        idx_ref = e["index"]
        entries, i_payload = _decode_stream(
            idx_ref["codec"], secs[idx_ref["sec"]], n_entries, 1 << b, f"{where} index"
        )
        try:
            pos = relative_index_decode(entries, b, numel)
        except CodingError as exc:
            raise _fail(f"{where} index: {exc}") from exc
        if pos.size != nnz:
            raise _fail(f"{where}: index stream holds {pos.size} nonzeros, header says {nnz}")
        codes, c_payload = _decode_stream(
            codes_ref["codec"], secs[codes_ref["sec"]], nnz, max(k, 1), f"{where} codes"
        )
        flat = np.zeros(numel, dtype=ftype)
        if nnz:
            flat[pos] = codebook[codes]
        arr = np.ascontiguousarray(flat.reshape(shape, order=order))
        if with_report:
            streams.append(
                _stream_report(
                    "codes", codes_ref["codec"], codes, max(k, 1), secs, codes_ref["sec"], c_payload
                )
            )
            streams.append(
                _stream_report(
                    "index", idx_ref["codec"], entries, 1 << b, secs, idx_ref["sec"], i_payload
                )
            )
        fields = dict(
            layout="sparse",
            order=order,
            index_bits=b,
            fillers=int(entries.size - nnz),
            weight_bits_pq=nnz * _raw_width(max(k, 1)),
            weight_bits=8 * len(secs[codes_ref["sec"]]),
            index_bits_pq=int(entries.size) * b,
            index_bits_coded=8 * len(secs[idx_ref["sec"]]),
            total_bytes=len(cb_data)
            + len(secs[codes_ref["sec"]])
            + len(secs[idx_ref["sec"]])
            + 3 * _FRAME.size,
        )
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(tdtype)
    rep = None
    if with_report:
        rep = TensorReport(
            name=name,
            shape=shape,
            dtype=dtype,
            scheme="codebook",
            numel=numel,
            nonzeros=nnz,
            codebook_size=k,
            codebook_dtype=cb,
            codebook_bits=8 * len(cb_data),
            streams=tuple(streams),
            **fields,
        )
    return t, rep


def _stream_report(role, codec, symbols, alphabet, secs, sec, payload) -> StreamReport:
    return StreamReport(
        role=role,
        codec=codec,
        symbols=int(symbols.size),
        alphabet=alphabet,
        entropy=empirical_entropy(symbols),
        payload_bits=payload,
        table_bits=8 * len(secs[sec]) - payload,
    )


def _decode(
    data: bytes | memoryview, *, max_elements: int, with_report: bool
) -> tuple[dict[str, torch.Tensor], Any, EncodeReport | None]:
    try:
        with np.errstate(all="ignore"):  # damaged codebooks may hold NaN/inf: not an error here
            return _decode_checked(data, max_elements=max_elements, with_report=with_report)
    except FormatError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError as exc:
        raise FormatError(f"file declares sizes too large to decode: {exc}") from exc
    except Exception as exc:  # safety net: any other failure on damaged input is a FormatError
        raise FormatError(f"malformed .ncz file: {type(exc).__name__}: {exc}") from exc


def _decode_checked(
    data: bytes | memoryview, *, max_elements: int, with_report: bool
) -> tuple[dict[str, torch.Tensor], Any, EncodeReport | None]:
    secs = _split_sections(data)
    header = _inflate(secs[0], "header")
    metadata = _inflate(secs[1], "metadata")
    entries = _check_header(header, len(secs), max_elements, len(data))
    state: dict[str, torch.Tensor] = {}
    reports = []
    for e in entries:
        if e["scheme"] == "alias":  # stored once: a copy of the earlier tensor
            t = state[e["of"]].clone()
            rep = _alias_report(e["name"], t, e["of"]) if with_report else None
        else:
            t, rep = _decode_entry(e, secs, with_report=with_report)
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
    data: bytes | memoryview, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[dict[str, torch.Tensor], Any]:
    """Decode ``.ncz`` bytes: ``(state_dict, metadata)``; :class:`FormatError` if damaged."""
    state, metadata, _ = _decode(data, max_elements=max_elements, with_report=False)
    return state, metadata


def _read(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed file '{path}' does not exist")
    return path.read_bytes()


def decode_file(
    path: str | Path, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read and decode a ``.ncz`` file: ``(state_dict, metadata)``.

    ``max_elements`` bounds the total number of tensor elements the file may declare (raise
    it for models beyond ~268M parameters).
    """
    return decode_bytes(_read(path), max_elements=max_elements)


def inspect_bytes(data: bytes | memoryview, *, max_elements: int = DEFAULT_MAX_ELEMENTS):
    """Itemised :class:`EncodeReport` of ``.ncz`` bytes (decodes every stream)."""
    _, _, report = _decode(data, max_elements=max_elements, with_report=True)
    return report


def inspect_file(path: str | Path, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> EncodeReport:
    """Itemised :class:`EncodeReport` of a ``.ncz`` file: per-tensor scheme, codebook, code
    and index bits (fixed "P+Q" and coded), fillers, entropies, and totals."""
    return inspect_bytes(_read(path), max_elements=max_elements)


def load_compressed(model: nn.Module, path: str | Path) -> Any:
    """Fill ``model`` (strictly, by name) from a ``.ncz`` file; returns the file's metadata."""
    state, metadata = decode_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"'{path}': the decoded tensors do not fit the model: {exc}") from exc
    return metadata
