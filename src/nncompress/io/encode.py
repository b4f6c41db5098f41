"""Writing ``.ncz`` files: per tensor, the scheme, layout, flattening order and index width
that take the fewest bytes (see :mod:`.format` for the layout)."""

from __future__ import annotations

import copy
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.files import atomic_write
from ..core.modules import folded_copy
from ..core.progress import Progress, progress_task
from .candidates import _best_candidate, _dtype_name
from .config import EncodeConfig, check_overrides, match_override
from .format import (
    _FRAME,
    _PREFIX,
    MAGIC,
    MAX_NDIM,
    VERSION,
    _canonical_json,
    _frame,
    alias_report,
    written_minor,
)
from .report import EncodeReport

__all__ = [
    "encode_state_dict",
    "pq_block_hints",
    "round_for_storage_",
    "save_compressed",
    "storage_hints",
]

log = logging.getLogger(__name__)


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
