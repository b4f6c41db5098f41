"""Cascades of whole models: a small model first, a larger one only where it is not confident.

The coarse-to-fine cascade (as in the facial-point cascades of the lecture notes, and the
model-selection networks of Bolukbasi et al. 2017) is the early-exit idea over models: stage
``i`` classifies every sample that reaches it, and a sample stops there when the stage's
confidence reaches ``thresholds[i]``; the last stage takes whatever is left. Thresholds are
calibrated on held-out data exactly as for early exits
(:func:`~nncompress.conditional.calibrate.calibrate_`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.files import atomic_write_json
from ..core.modules import model_device
from .base import ConditionalModel, ExitPrediction, confidence
from .cost import ExitCosts, cascade_costs

__all__ = ["CASCADE_FORMAT", "Cascade", "load_cascade", "save_cascade"]

CASCADE_FORMAT = "nncompress-cascade/1"


class Cascade(ConditionalModel):
    """Run ``models`` in order, each on the samples the previous ones were not confident about.

    Parameters
    ----------
    models : two or more classifiers with the same number of classes, cheapest first (held,
        not copied).
    thresholds : ``len(models) - 1`` values in [0, 1]; 1.0 skips a stage (default: all 1.0,
        i.e. only the last model runs).
    confidence : ``"max-softmax"`` or ``"entropy"``.
    exit_rates : fractions of held-out samples answered by each stage (recorded by calibration).
    input_shape : if given, a probe sample checks now that every model gives the same number of
        classes (otherwise the first forward pass checks it).

    ``forward`` in training mode, and :meth:`forward_all` always, returns every stage's logits
    on the whole batch; in eval mode ``forward`` returns the cascade's answer (:meth:`predict`).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        thresholds: Sequence[float] | None = None,
        confidence: str = "max-softmax",
        exit_rates: Sequence[float] | None = None,
        *,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        models = list(models)
        if len(models) < 2:
            raise ConfigError(f"models: a cascade needs at least 2 models, got {len(models)}")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise ConfigError(f"models[{i}]: expected an nn.Module, got {type(m).__name__}")
        self.stages = nn.ModuleList(models)
        self._init_exits(len(models) - 1, thresholds, confidence, exit_rates)
        if input_shape is not None:
            self.check_classes(input_shape)

    def check_classes(self, input_shape: Sequence[int]) -> int:
        """Run one zero sample through every stage; the common class count (error if they
        differ)."""
        x = torch.zeros(1, *input_shape, device=model_device(self))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                outs = [m(x) for m in self.stages]
        finally:
            self.train(was_training)
        return self._same_classes(outs)

    def _same_classes(self, outs: Sequence[torch.Tensor]) -> int:
        counts = []
        for i, out in enumerate(outs):
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"models[{i}] must return (batch, classes) logits; got {got}")
            counts.append(int(out.shape[1]))
        if len(set(counts)) > 1:
            named = ", ".join(
                f"models[{i}] ({type(m).__name__}): {c}"
                for i, (m, c) in enumerate(zip(self.stages, counts, strict=True))
            )
            raise ConfigError(f"models: a cascade needs one class count; got {named}")
        return counts[0]

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's logits on the whole batch, the last stage last."""
        outs = [m(x) for m in self.stages]
        self._same_classes(outs)
        return outs

    def predict(self, x: torch.Tensor) -> ExitPrediction:
        """Each sample's logits from the first stage confident enough (else the last stage)."""
        batch = x.shape[0]
        remaining = torch.arange(batch, device=x.device)
        exit_index = torch.full((batch,), self.num_exits, dtype=torch.long, device=x.device)
        logits_out: torch.Tensor | None = None
        xs = x
        classes = None
        for i, model in enumerate(self.stages):
            last = i == self.num_exits
            if not last and self.thresholds[i] >= 1.0:
                continue  # closed stage: skipped
            logits = model(xs)  # (b, K)
            if classes is None:
                classes = logits.shape[1]
            elif logits.shape[1] != classes:
                self._same_classes([m(x[:1]) for m in self.stages])
            if logits_out is None:
                logits_out = logits.new_empty(batch, logits.shape[1])
            if last:
                logits_out[remaining] = logits
                break
            leave = confidence(logits, self.confidence) >= self.thresholds[i]  # (b,)
            if bool(leave.any()):
                logits_out[remaining[leave]] = logits[leave]
                exit_index[remaining[leave]] = i
                stay = ~leave
                remaining, xs = remaining[stay], xs[stay]
                if remaining.numel() == 0:
                    break
        assert logits_out is not None
        return ExitPrediction(logits_out, exit_index)

    def exit_costs(self, input_shape: Sequence[int]) -> ExitCosts:
        """MACs of each stage (:func:`~nncompress.conditional.cost.cascade_costs`)."""
        return cascade_costs(list(self.stages), input_shape)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_cascade(cascade: Cascade, path: str | Path, members: Sequence[str | Path]) -> Path:
    """Write a JSON manifest of ``cascade``: its members' checkpoint files (``members``, one per
    stage, as saved by :func:`nncompress.engine.save_checkpoint`) with their SHA-256, and the
    thresholds, confidence and exit rates. Member paths are stored relative to the manifest's
    folder when they lie under it. Written atomically."""
    path = Path(path)
    if len(members) != len(cascade.stages):
        raise ConfigError(
            f"members: {len(members)} checkpoint paths for {len(cascade.stages)} stages"
        )
    entries = []
    for i, member in enumerate(members):
        member = Path(member)
        if not member.is_file():
            raise ConfigError(f"members[{i}]={str(member)!r}: no such checkpoint file")
        rel = os.path.relpath(member.resolve(), path.parent.resolve())
        stored = member.resolve() if rel.startswith("..") else Path(rel)
        entries.append({"path": str(stored), "sha256": _sha256(member)})
    manifest = {
        "format": CASCADE_FORMAT,
        "members": entries,
        "thresholds": list(cascade.thresholds),
        "confidence": cascade.confidence,
        "exit_rates": list(cascade.exit_rates) if cascade.exit_rates is not None else None,
    }
    atomic_write_json(path, manifest, indent=2)
    return path


def load_cascade(path: str | Path) -> tuple[Cascade, dict]:
    """Load a cascade written by :func:`save_cascade`: ``(cascade, manifest)``.

    Every member checkpoint must still have the recorded SHA-256 (a replaced member is
    refused), and is loaded with :func:`nncompress.engine.load_checkpoint` (no pickle).
    """
    from ..engine.checkpoint import load_checkpoint

    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cascade manifest '{path}': cannot read it as JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CASCADE_FORMAT:
        raise ConfigError(f"cascade manifest '{path}': format must be {CASCADE_FORMAT!r}")
    members = manifest.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise ConfigError(f"cascade manifest '{path}': 'members' must list 2+ checkpoints")
    models = []
    for i, entry in enumerate(members):
        member = Path(entry.get("path", "")) if isinstance(entry, dict) else Path()
        if not member.is_absolute():
            member = path.parent / member
        if not member.is_file():
            raise ConfigError(f"cascade manifest '{path}': members[{i}] '{member}' is missing")
        if _sha256(member) != entry.get("sha256"):
            raise ConfigError(
                f"cascade manifest '{path}': members[{i}] '{member}' changed since the "
                "cascade was calibrated (SHA-256 differs)"
            )
        models.append(load_checkpoint(member)[0].eval())
    cascade = Cascade(
        models,
        manifest.get("thresholds"),
        manifest.get("confidence", "max-softmax"),
        manifest.get("exit_rates"),
    )
    return cascade.eval(), manifest
