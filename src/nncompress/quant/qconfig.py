"""Configs of linear integer quantization (PTQ, QAT) and the per-layer precision rule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..core.errors import ConfigError
from ..core.validate import check as _check
from .observers import OBSERVERS

__all__ = [
    "ACT_DTYPES",
    "KEEP",
    "PTQConfig",
    "QATConfig",
    "WEIGHT_DTYPES",
    "config_from_dict",
    "resolve_precisions",
]

WEIGHT_DTYPES = ("int8", "int4", "fp32")
ACT_DTYPES = ("int8", "uint8")
KEEP = (None, "int8", "fp32")


def _check_layer_entry(name: str, entry: Any) -> None:
    _check(isinstance(entry, Mapping), f"per_layer[{name!r}]", entry, "must be a mapping")
    for k, v in entry.items():
        if k == "weights":
            _check(
                v in WEIGHT_DTYPES,
                f"per_layer[{name!r}].weights",
                v,
                f"must be one of {list(WEIGHT_DTYPES)}",
            )
        elif k == "activations":
            _check(
                v in (*ACT_DTYPES, None),
                f"per_layer[{name!r}].activations",
                v,
                f"must be one of {[*ACT_DTYPES, None]}",
            )
        else:
            raise ConfigError(
                f"per_layer[{name!r}] has key {k!r}: allowed keys are 'weights', 'activations'"
            )


@dataclass(frozen=True)
class PTQConfig:
    """Post-training linear quantization.

    Attributes
    ----------
    weights : 'int8' | 'int4' - weight format of quantized layers (symmetric, zero point 0).
    activations : 'int8' | 'uint8' | None - activation format (asymmetric; ``None`` =
        weight-only quantization, float activations).
    per_channel : one weight scale per output channel (else one per tensor).
    observer : activation range estimator: 'minmax' | 'moving_average' | 'percentile' | 'kl'.
    percentile : for ``observer='percentile'``.
    keep_first_last : None (treat like the others) | 'int8' (first/last layers at 8-bit weights
        even when ``weights='int4'``) | 'fp32' (first/last layers left in float).
    per_layer : mixed precision, ``{layer_name: {'weights': 'int8'|'int4'|'fp32',
        'activations': 'int8'|'uint8'|None}}``; overrides the rest. A layer with fp32 weights runs
        in float.
    fold_bn : fold Conv-BatchNorm pairs before quantizing.
    keep_zeros : keep weights that are exactly zero (pruned) at zero, also during QAT.
    reduce_range : 7-bit weight grid ([-63, 63] for int8). x86 CPUs without VNNI multiply
        uint8 x int8 pairs with 16-bit saturating adds (``vpmaddubsw``); 7-bit weights keep the
        integer kernels exact, as ONNX Runtime's documentation recommends.
    """

    weights: str = "int8"
    activations: str | None = "int8"
    per_channel: bool = True
    observer: str = "minmax"
    percentile: float = 99.99
    keep_first_last: str | None = None
    per_layer: dict = field(default_factory=dict)
    fold_bn: bool = True
    keep_zeros: bool = True
    reduce_range: bool = True

    def __post_init__(self) -> None:
        _check(
            self.weights in ("int8", "int4"), "weights", self.weights, "must be 'int8' or 'int4'"
        )
        _check(
            self.activations in (*ACT_DTYPES, None),
            "activations",
            self.activations,
            "must be 'int8', 'uint8' or None",
        )
        _check(
            self.observer in OBSERVERS,
            "observer",
            self.observer,
            f"must be one of {sorted(OBSERVERS)}",
        )
        _check(0 < self.percentile <= 100, "percentile", self.percentile, "must be in (0, 100]")
        _check(
            self.keep_first_last in KEEP,
            "keep_first_last",
            self.keep_first_last,
            "must be None, 'int8' or 'fp32'",
        )
        _check(
            isinstance(self.per_layer, Mapping),
            "per_layer",
            self.per_layer,
            "must be a mapping of layer name -> {'weights': ..., 'activations': ...}",
        )
        for name, entry in self.per_layer.items():
            _check_layer_entry(name, entry)


@dataclass(frozen=True)
class QATConfig(PTQConfig):
    """Quantization-aware training: :class:`PTQConfig` plus how ranges are learned.

    Attributes
    ----------
    lsq : learn weight and activation step sizes (LSQ, Esser et al. 2020) instead of
        min/max (weights) and moving-average ranges (activations).
    averaging_constant : moving-average rate of the activation observers while training.
    """

    observer: str = "moving_average"
    lsq: bool = False
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            0 < self.averaging_constant <= 1,
            "averaging_constant",
            self.averaging_constant,
            "must be in (0, 1]",
        )


def config_from_dict(data: Mapping[str, Any], qat: bool = False) -> PTQConfig:
    """Build a :class:`PTQConfig` (or :class:`QATConfig`) from a JSON/YAML mapping."""
    cls = QATConfig if qat else PTQConfig
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}: allowed {sorted(names)}")
    return cls(**dict(data))


def resolve_precisions(layers: list[str], config: PTQConfig) -> dict[str, tuple[str, str | None]]:
    """``{layer: (weights, activations)}`` after keep_first_last and per_layer overrides."""
    unknown = sorted(set(config.per_layer) - set(layers))
    if unknown:
        raise ConfigError(
            f"per_layer names {unknown} are not Conv/Linear layers of the model; allowed: {layers}"
        )
    out: dict[str, tuple[str, str | None]] = {}
    for i, name in enumerate(layers):
        w, a = config.weights, config.activations
        if config.keep_first_last and i in (0, len(layers) - 1):
            w = config.keep_first_last
            if w == "fp32":
                a = None
        entry = config.per_layer.get(name, {})
        w = entry.get("weights", w)
        a = entry.get("activations", a) if w != "fp32" else None
        out[name] = (w, a)
    return out
