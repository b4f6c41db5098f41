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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import CheckpointError, SpecError
from ..core.files import atomic_write
from ..core.modules import folded_copy
from .modspec import build_architecture, describe_architecture

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "read_sidecar",
    "save_checkpoint",
    "sidecar_path",
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
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_bytes(blob))
    return path


def read_sidecar(path: str | Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"checkpoint sidecar '{side}' is missing (it is written beside "
            f"'{Path(path).name}' by save_checkpoint)"
        )
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar '{side}' is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint sidecar '{side}': format must be {FORMAT!r}")
    return data


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_checkpoint`: ``(model, sidecar)``.

    Rebuilds the architecture from the sidecar (or uses ``model``, with the recorded
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
    except (SafetensorError, OSError, ValueError) as exc:
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
    try:
        model = build_architecture(sidecar["architecture"], model)
    except (SpecError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{path}': cannot rebuild the model: {exc}") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{path}': weights do not fit the model: {exc}") from exc
    return model, sidecar
