"""Activation-aware pruning of matrix layers: Wanda and N:M (2:4) semi-structured sparsity.

Wanda (Sun, Liu, Bair & Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024) scores each weight by its magnitude times the norm of the input feature
it multiplies,

    S_ij = |W_ij| * ||X_j||_2,

(X: calibration inputs of the layer, n x in) and removes the lowest scores *per output row*,
so no neuron loses all its inputs. Magnitude pruning (Han et al. 2015) is ``||X_j|| = 1``.
N:M sparsity keeps the ``N`` highest-scoring weights in every group of ``M`` consecutive
inputs of a row (NVIDIA's 2:4 pattern, Mishra et al. 2021, which sparse tensor cores run at
twice the dense rate); with Wanda scores it is Wanda's N:M variant, with ``activation_aware
=False`` the magnitude one.

Masks are :class:`~nncompress.prune.magnitude.PruningMask` parametrizations (exact zeros,
zero gradients), on ``nn.Linear``, Hugging Face ``Conv1D`` (weight in x out) and, unless
excluded, any other matrix layer the selector picks; layers sharing one weight share a mask.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import ProgressEvent
from ..engine.batches import take_batches
from ..engine.layers import layer_kind, matrix_layers, record_inputs, weight_matrix
from .magnitude import apply_mask_

__all__ = ["LayerWanda", "WandaConfig", "nm_mask", "prune_wanda_", "wanda_scores"]

log = logging.getLogger(__name__)


def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor | None) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` for an (out x in) matrix and the (in,) input-feature norms
    (plain magnitude when ``input_norm`` is None)."""
    s = w.detach().abs().to(torch.float32)  # (out, in)
    if input_norm is not None:
        s = s * input_norm.to(s)[None, :]
    return s


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` consecutive columns of each row
    of an (out x in) score matrix (``in`` divisible by ``m``). Ties go to the lower index."""
    out, inp = scores.shape
    if not 0 < n < m or inp % m:
        raise ValueError(f"N:M = {n}:{m}: needs 0 < N < M and M dividing the input width {inp}")
    groups = scores.reshape(out, inp // m, m)  # (out, G, m)
    top = torch.topk(groups, n, dim=2, sorted=False).indices  # (out, G, n)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, top, True)
    return keep.reshape(out, inp)


def _row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    out, inp = scores.shape
    n_prune = int(round(sparsity * inp))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]  # (out, n_prune)
        keep.scatter_(1, idx, False)
    return keep


@dataclass(frozen=True)
class WandaConfig:
    """Settings of :func:`prune_wanda_`.

    Attributes
    ----------
    sparsity : fraction of each row's weights removed, in [0, 1) (ignored with ``nm``).
    nm : ``(N, M)`` semi-structured pattern, e.g. ``(2, 4)``; None for unstructured.
    activation_aware : Wanda scores (True) or plain magnitude (False).
    per_layer : ``{name or fnmatch pattern: sparsity}`` overrides (unstructured only).
    include, exclude : fnmatch patterns over module names; embeddings are never pruned here
        and the default excludes nothing else (exclude an LM head with ``('lm_head',)``).
    calibration_batches : batches used for the input norms (None: all).
    """

    sparsity: float = 0.5
    nm: tuple[int, int] | None = None
    activation_aware: bool = True
    per_layer: dict[str, float] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    calibration_batches: int | None = 16

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity={self.sparsity!r}: must be in [0, 1)")
        if self.nm is not None:
            nm = tuple(self.nm)
            if len(nm) != 2 or not all(isinstance(v, int) for v in nm) or not 0 < nm[0] < nm[1]:
                raise ConfigError(f"nm={self.nm!r}: must be (N, M) with 0 < N < M, e.g. (2, 4)")
            object.__setattr__(self, "nm", nm)
        for key, v in self.per_layer.items():
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"per_layer['{key}']={v!r}: sparsity must be in [0, 1)")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(isinstance(p, str) for p in v):
                raise ConfigError(f"{name}={v!r}: must be a list of fnmatch patterns")
            object.__setattr__(self, name, tuple(v))
        if self.calibration_batches is not None and (
            not isinstance(self.calibration_batches, int) or self.calibration_batches < 1
        ):
            raise ConfigError(
                f"calibration_batches={self.calibration_batches!r}: must be >= 1 or null"
            )

    def sparsity_for(self, name: str) -> float:
        if name in self.per_layer:
            return self.per_layer[name]
        for pattern, v in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return v
        return self.sparsity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerWanda:
    name: str
    shape: tuple[int, int]
    kept: int
    sparsity: float
    pattern: str


def prune_wanda_(
    model: nn.Module,
    config: WandaConfig | None = None,
    calibration: Iterable | None = None,
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> list[LayerWanda]:
    """Prune the selected Linear / Conv1D layers in place by Wanda (or magnitude) scores.

    Input norms come from one pass over ``calibration`` (tensors, tuples or keyword dicts) on
    the unpruned model, as in the paper. Returns one :class:`LayerWanda` per pruned weight.
    """
    cfg = config or WandaConfig()
    layers = matrix_layers(model, cfg.include, cfg.exclude, ("linear", "conv1d"), filter)
    names = [n for n, _ in layers]
    for key in cfg.per_layer:
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            raise ConfigError(f"per_layer['{key}']: matches no prunable layer ({names[:8]}...)")
    if cfg.nm is not None:
        for n, m in layers:
            inp = weight_matrix(m).shape[1]
            if inp % cfg.nm[1]:
                raise ConfigError(
                    f"nm={cfg.nm} for layer '{n}': its input width {inp} is not a multiple of "
                    f"M={cfg.nm[1]} (exclude it)"
                )
    norms: dict[str, torch.Tensor] = {}
    if cfg.activation_aware:
        if calibration is None:
            raise ConfigError("activation_aware=True: needs calibration batches")
        batches = take_batches(calibration, cfg.calibration_batches, "calibration")
        sq: dict[str, torch.Tensor] = {}

        def on_input(name: str, x: torch.Tensor) -> None:
            rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            sq[name] = sq.get(name, 0) + rows.pow(2).sum(0).cpu()

        record_inputs(model, dict(layers), batches, on_input, model_device(model))
        for n in names:
            if n not in sq:
                raise ValueError(f"layer '{n}' was not called on the calibration batches")
            norms[n] = sq[n].sqrt()
    out: list[LayerWanda] = []
    if progress:
        progress(ProgressEvent("start", "wanda", total=len(layers)))
    try:
        for i, (name, m) in enumerate(layers):
            mat = weight_matrix(m)  # (out, in)
            scores = wanda_scores(mat, norms.get(name))
            if cfg.nm is not None:
                keep = nm_mask(scores, *cfg.nm)
                pattern = f"{cfg.nm[0]}:{cfg.nm[1]}"
            else:
                keep = _row_mask(scores, cfg.sparsity_for(name))
                pattern = "row"
            mask = keep.T if layer_kind(m) == "conv1d" else keep
            apply_mask_(m, mask.contiguous())
            kept = int(keep.sum())
            out.append(LayerWanda(name, tuple(mat.shape), kept, 1 - kept / keep.numel(), pattern))
            log.info("wanda %s: kept %d of %d (%s)", name, kept, keep.numel(), pattern)
            if progress:
                progress(ProgressEvent("advance", "wanda", total=len(layers), completed=i + 1))
    finally:
        if progress:
            progress(ProgressEvent("end", "wanda"))
    return out
