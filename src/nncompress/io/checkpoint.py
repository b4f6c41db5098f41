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

__all__ = ["CHECKPOINT_KEY", "checkpoint_metadata", "decode_to_checkpoint", "model_from_metadata"]

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


def model_from_metadata(
    metadata: Any, state: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the (untrained) model described by a ``.ncz``'s checkpoint metadata.

    Every field of the description is validated first (as a checkpoint sidecar's); with
    ``state`` (the decoded tensors), the architecture must need exactly those tensors, checked
    on the ``meta`` device before the model is built. Returns ``(model, checkpoint_info)``;
    raises ``ValueError`` naming what is missing or wrong.
    """
    from ..engine.checkpoint import FORMAT, validate_sidecar
    from ..engine.modspec import build_architecture

    info = metadata.get(CHECKPOINT_KEY) if isinstance(metadata, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("architecture"), dict):
        raise ValueError(
            "the file's metadata has no 'checkpoint.architecture' (it was not written from a "
            "checkpoint); decode it with decode_file() and load the tensors into your model"
        )
    validate_sidecar({**info, "format": FORMAT, "tensors_sha256": ""}, "the file's metadata")
    expect = None if state is None else {k: tuple(v.shape) for k, v in state.items()}
    try:
        model = build_architecture(info["architecture"], expect=expect)
    except (ValueError, TypeError, KeyError) as exc:  # SpecError is a ValueError
        raise ValueError(f"cannot rebuild the model from the file's metadata: {exc}") from exc
    return model, info


def decode_to_checkpoint(path: str | Path, out: str | Path, **limits: int) -> Path:
    """Decode ``path`` (.ncz) into a checkpoint ``out`` (.safetensors + .json sidecar).
    ``limits``: ``max_elements`` / ``max_bytes`` of :func:`decode_file`."""
    from ..engine.checkpoint import save_checkpoint

    state, metadata = decode_file(path, **limits)
    model, info = model_from_metadata(metadata, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"'{path}': decoded tensors do not fit the recorded model: {exc}") from exc
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
    )
