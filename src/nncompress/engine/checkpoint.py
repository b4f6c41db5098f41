"""Checkpoints: safetensors weights plus a JSON sidecar, written atomically, loaded without pickle.

``model.safetensors`` holds the tensors (parametrizations such as pruning masks are folded into
the effective weights) and, in its metadata, the SHA-256 of the sidecar. ``model.json`` holds
the architecture (registry name, constructor arguments, structural replacements), dataset and
normalisation, metrics, history of transforms and the nncompress version, plus the SHA-256 of
the tensor data. Loading checks both digests, so a tampered sidecar or weights file is refused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..core.errors import CheckpointError, SpecError
from ..core.files import atomic_write
from ..core.modules import folded_copy
from .modspec import build_architecture, describe_architecture, validate_architecture

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "read_sidecar",
    "save_checkpoint",
    "sidecar_path",
    "validate_sidecar",
]

FORMAT = "nncompress-checkpoint/1"


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape first: a 0-dim tensor (BatchNorm num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sorted_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` keys sorted.

    safetensors 0.8 writes the metadata map in hash order, which changes from one process to
    the next, so two identical checkpoints differed in those bytes (issue 19). The header is
    rewritten (compact JSON padded with spaces to 8 bytes, as safetensors pads it); the tensor
    entries keep their order and offsets, which are relative to the data that follows.
    """
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def _version() -> str:
    from .. import __version__

    return __version__


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
    dataset: dict | None = None,
    metrics: dict | None = None,
    history: list | None = None,
    extra: dict | None = None,
    reference: nn.Module | None = None,
) -> Path:
    """Save ``model`` as ``path`` (.safetensors) plus its JSON sidecar.

    With ``model_name`` (a :mod:`nncompress.models` registry name) the sidecar records only the
    submodules that differ from a fresh model built with ``model_kwargs``. For a custom model,
    pass ``reference`` (a freshly built instance of the original architecture): only the
    differences are recorded and :func:`load_checkpoint` replays them onto a fresh instance the
    caller passes. Without either, the whole model must be describable as a spec (e.g. an
    ``nn.Sequential`` of standard layers).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"path='{path}': a checkpoint must end in .safetensors")
    plain = folded_copy(model)
    try:
        architecture = describe_architecture(
            plain, model_name=model_name, model_kwargs=model_kwargs, reference=reference
        )
    except SpecError as exc:
        raise CheckpointError(f"cannot describe the model's structure: {exc}") from exc
    # tied weights (an embedding and its LM head) are one tensor under two names; safetensors
    # refuses shared memory, so later names get a copy (load_state_dict re-ties them)
    tensors, seen = {}, set()
    for k, v in plain.state_dict().items():
        t = v.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        tensors[k] = t.clone() if ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    sidecar = {
        "format": FORMAT,
        "nncompress_version": _version(),
        "architecture": architecture,
        "dataset": dataset,
        "metrics": metrics or {},
        "history": history or [],
        "extra": extra or {},
        "tensors_sha256": _tensor_digest(tensors),
    }
    blob = json.dumps(sidecar, indent=2, sort_keys=True).encode()
    meta = {"format": FORMAT, "sidecar_sha256": hashlib.sha256(_canonical(sidecar)).hexdigest()}
    data = _sorted_header(save(tensors, metadata=meta))
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_bytes(blob))
    return path


MAX_SIDECAR_BYTES = 64 << 20
MAX_JSON_DEPTH = 200  # nesting of a sidecar's JSON (a module tree is far shallower)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _json_depth_ok(text: str, limit: int) -> bool:
    """Whether ``text`` nests brackets at most ``limit`` deep (outside strings), checked
    before parsing so a hostile nesting never reaches the recursive parser."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _typed(data: dict, key: str, kinds: tuple, where: str, *, required: bool = True) -> None:
    if key not in data:
        if required:
            raise CheckpointError(f"{where}: field '{key}' is missing")
        return
    v = data[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise CheckpointError(f"{where}: field '{key}'={v!r:.60} must be {names}")


def validate_sidecar(data: Any, where: str) -> dict[str, Any]:
    """Check every field of a checkpoint sidecar before anything is built from it: the format,
    the field types (architecture, dataset, metrics, history, extra, digests, version), the
    dataset description (name, sizes, shape) and the architecture
    (:func:`nncompress.engine.modspec.validate_architecture`). Raises :class:`CheckpointError`
    naming the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format must be {FORMAT!r}")
    _typed(data, "architecture", (dict,), where)
    _typed(data, "dataset", (dict, type(None)), where, required=False)
    _typed(data, "metrics", (dict,), where, required=False)
    _typed(data, "history", (list,), where, required=False)
    _typed(data, "extra", (dict,), where, required=False)
    _typed(data, "tensors_sha256", (str,), where)
    _typed(data, "nncompress_version", (str,), where, required=False)
    ds = data.get("dataset")
    if ds is not None:
        dwhere = f"{where}: dataset"
        _typed(ds, "name", (str,), dwhere)
        _typed(ds, "num_classes", (int,), dwhere, required=False)
        _typed(ds, "input_shape", (list,), dwhere, required=False)
        _typed(ds, "mean", (int, float), dwhere, required=False)
        _typed(ds, "std", (int, float), dwhere, required=False)
        _typed(ds, "sizes", (dict,), dwhere, required=False)
        shape = ds.get("input_shape", [1])
        if not 1 <= len(shape) <= 4 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 16 for d in shape
        ):
            raise CheckpointError(f"{dwhere}.input_shape={shape!r:.60}: 1-4 sizes in [1, 65536]")
        if not 1 <= ds.get("num_classes", 1) <= 1 << 20:
            raise CheckpointError(f"{dwhere}.num_classes={ds['num_classes']}: in [1, 2**20]")
    try:
        validate_architecture(data["architecture"])
    except SpecError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return data


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The validated sidecar of checkpoint ``path`` (:func:`validate_sidecar`)."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"checkpoint sidecar '{side}' is missing (it is written beside "
            f"'{Path(path).name}' by save_checkpoint)"
        )
    if side.stat().st_size > MAX_SIDECAR_BYTES:
        raise CheckpointError(
            f"checkpoint sidecar '{side}': {side.stat().st_size} bytes, at most "
            f"{MAX_SIDECAR_BYTES} (not a sidecar nncompress writes)"
        )
    try:
        text = side.read_text()
        if not _json_depth_ok(text, MAX_JSON_DEPTH):
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint sidecar '{side}' is not valid JSON: {exc}") from exc
    return validate_sidecar(data, f"checkpoint sidecar '{side}'")


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`: ``(model, sidecar)``.

    Every field of the sidecar is validated first; the architecture is then built on the
    ``meta`` device and must need exactly the tensors the weights file holds, before the model
    is built for real (so a hostile sidecar cannot make this allocate more than the weights
    file). Rebuilds the architecture from the sidecar (or uses ``model``, with the recorded
    replacements applied) and loads the weights strictly. Never unpickles anything.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    sidecar = read_sidecar(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is not a readable safetensors file: {exc}"
        ) from exc
    if meta.get("sidecar_sha256") != hashlib.sha256(_canonical(sidecar)).hexdigest():
        raise CheckpointError(
            f"checkpoint sidecar '{sidecar_path(path)}' does not match "
            f"'{path.name}': it was modified or belongs to another checkpoint"
        )
    if sidecar.get("tensors_sha256") != _tensor_digest(tensors):
        raise CheckpointError(
            f"checkpoint '{path}': tensor data does not match the digest in its "
            "sidecar (file modified or corrupt)"
        )
    present = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        model = build_architecture(sidecar["architecture"], model, expect=present)
    except (SpecError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}': cannot rebuild the model: {exc}") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{path}': weights do not fit the model: {exc}") from exc
    return model, sidecar
