"""Bridge between ``.ncz`` files and nncompress checkpoints (safetensors + JSON sidecar).

Convention: a ``.ncz`` made from a checkpoint stores the checkpoint's sidecar under the
metadata key ``"checkpoint"`` (architecture, dataset, metrics, history, extra). Decoding
rebuilds the model from that architecture (registry name + kwargs + recorded replacements,
or a module spec), loads the decoded tensors strictly and writes a checkpoint with
:func:`nncompress.engine.save_checkpoint`, so :func:`nncompress.engine.load_checkpoint` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .decode import decode_file

__all__ = [
    "CHECKPOINT_KEY",
    "ArchitectureMissing",
    "checkpoint_metadata",
    "decode_to_checkpoint",
    "load_model_file",
    "model_from_metadata",
]

CHECKPOINT_KEY = "checkpoint"
_KEEP = ("architecture", "dataset", "metrics", "extra", "nncompress_version")


def checkpoint_metadata(
    sidecar: dict[str, Any], *, history: bool = False, **extra: Any
) -> dict[str, Any]:
    """Metadata for :func:`save_compressed` from a checkpoint sidecar.

    Keeps the architecture, dataset, metrics, extra and version; drops the digests and, unless
    ``history=True``, the per-epoch training history (often larger than a compressed LeNet's
    weights). ``extra`` keyword arguments are added at the top level of the metadata.
    """
    keep = _KEEP + ("history",) if history else _KEEP
    meta: dict[str, Any] = {CHECKPOINT_KEY: {k: sidecar.get(k) for k in keep if k in sidecar}}
    meta.update(extra)
    return meta


class ArchitectureMissing(ValueError):
    """A file whose model cannot be rebuilt without a fresh instance of a custom architecture
    (``model=`` in Python, ``--model-factory`` on the command line); ``class_name`` names the
    class the file was saved from, when known."""

    def __init__(self, message: str, class_name: str | None = None) -> None:
        super().__init__(message)
        self.class_name = class_name


def model_from_metadata(
    metadata: Any, state: dict[str, Any] | None = None, model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the (untrained) model described by a ``.ncz``'s checkpoint metadata.

    Every field of the description is validated first (as a checkpoint sidecar's); with
    ``state`` (the decoded tensors), the architecture must need exactly those tensors, checked
    on the ``meta`` device before the model is built. ``model``: a freshly built instance of a
    custom architecture; the recorded replacements are applied to it (needed when the file
    records a custom model; a file with no architecture at all is loaded into it as it is).
    Returns ``(model, checkpoint_info)``; raises :class:`ArchitectureMissing` (a
    ``ValueError``) when a fresh instance is needed, ``ValueError`` naming what is wrong.
    """
    from ..engine.checkpoint import FORMAT, validate_sidecar
    from ..engine.modspec import build_architecture

    info = metadata.get(CHECKPOINT_KEY) if isinstance(metadata, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("architecture"), dict):
        if model is not None:  # the caller's architecture, as given
            return model, {"architecture": {"model": None, "replacements": {}}}
        raise ArchitectureMissing(
            "the file's metadata has no 'checkpoint.architecture' (saved by an nncompress "
            "before 0.2 or with metadata of your own): pass a freshly built model (model= in "
            "Python, --model-factory package.module:function on the command line)"
        )
    validate_sidecar({**info, "format": FORMAT, "tensors_sha256": ""}, "the file's metadata")
    arch = info["architecture"]
    if model is None and arch.get("model") is None and "spec" not in arch:
        cls = arch.get("class") if isinstance(arch.get("class"), str) else None
        raise ArchitectureMissing(
            "the file records a custom architecture"
            + (f" ({cls})" if cls else "")
            + ": pass a freshly built instance (model= in Python, --model-factory "
            "package.module:function on the command line)",
            cls,
        )
    expect = None if state is None else {k: tuple(v.shape) for k, v in state.items()}
    try:
        model = build_architecture(arch, model, expect=expect)
    except (ValueError, TypeError, KeyError) as exc:  # SpecError is a ValueError
        raise ValueError(f"cannot rebuild the model from the file's metadata: {exc}") from exc
    return model, info


def load_model_file(
    path: str | Path, model: nn.Module | None = None, **limits: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Open a model file: a checkpoint (``.safetensors`` + sidecar) or a ``.ncz`` file.

    Returns ``(model, sidecar)``; for a ``.ncz`` the sidecar is its checkpoint metadata
    (architecture, dataset, metrics, extra; empty fields when the file has none). ``model``: a
    fresh instance of a custom architecture (see :func:`model_from_metadata`); ``limits``:
    ``max_elements`` / ``max_bytes`` of :func:`decode_file`.
    """
    from ..engine.checkpoint import load_checkpoint

    path = Path(path)
    if path.suffix == ".safetensors":
        return load_checkpoint(path, model)
    return _load_ncz(path, model, **limits)


def _load_ncz(path: Path, model: nn.Module | None, **limits: int):
    state, metadata = decode_file(path, **limits)
    model, info = model_from_metadata(metadata, state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"'{path}': the decoded tensors do not fit the model: {exc}") from exc
    sidecar = {k: info.get(k) for k in ("architecture", "dataset", "metrics", "extra", "history")}
    sidecar["metrics"] = sidecar["metrics"] or {}
    sidecar["extra"] = sidecar["extra"] or {}
    return model, sidecar


def decode_to_checkpoint(
    path: str | Path, out: str | Path, *, model: nn.Module | None = None, **limits: int
) -> Path:
    """Decode ``path`` (.ncz) into a checkpoint ``out`` (.safetensors + .json sidecar).

    ``model``: a fresh instance of a custom architecture the file records (or of the model,
    when the file records none); the checkpoint then records its changes against another fresh
    copy. ``limits``: ``max_elements`` / ``max_bytes`` of :func:`decode_file`.
    """
    import copy

    from ..engine.checkpoint import save_checkpoint

    reference = copy.deepcopy(model) if model is not None else None
    model, info = _load_ncz(Path(path), model, **limits)
    arch = info["architecture"]
    history = list(info.get("history") or [])
    history.append({"transform": "decode", "source": Path(path).name})
    return save_checkpoint(
        model,
        out,
        model_name=arch.get("model"),
        model_kwargs=arch.get("kwargs"),
        dataset=info.get("dataset"),
        metrics=info.get("metrics"),
        history=history,
        extra=info.get("extra"),
        reference=reference if arch.get("model") is None and "spec" not in arch else None,
    )
