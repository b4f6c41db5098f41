"""Per-layer compression ratios as one JSON-able object (what a policy search produces).

A :class:`Policy` holds what every agent of :mod:`nncompress.policy` (DDPG, sensitivity-greedy,
random) produces and what the transforms of several families consume, which is why it lives
here (families never import each other):

- ``filter``: ``{producer: fraction of its coupled group's prunable channels removed}`` for
  :func:`nncompress.prune.prune_filters_` (every producer of a coupled group carries the same
  fraction; Li et al. 2017 / AMC channel pruning);
- ``sparsity``: ``{layer: fraction of its weights removed}`` for
  :func:`nncompress.prune.prune_` (Han et al. 2015 connection pruning);
- ``bits``: ``{layer: bits}`` for :func:`nncompress.quant.share_weights_` (Deep Compression
  weight sharing).

The three transforms accept a ``Policy`` in place of their configs (each family builds its own
config from it: ``FilterPruneConfig.from_policy``, ``MagnitudeConfig.from_policy``,
``KMeansConfig.from_policy``), and a recipe stores it as JSON (:meth:`Policy.to_dict` /
:meth:`Policy.from_dict`, :meth:`Policy.save` / :meth:`Policy.load`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import atomic_write

__all__ = ["POLICY_FORMAT", "Policy"]

POLICY_FORMAT = "nncompress.policy/1"
_MAX_BITS = 16


def _ratio(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < 1):
        raise ConfigError(f"{where}={v!r}: must be a number in [0, 1)")
    if not math.isfinite(v):
        raise ConfigError(f"{where}={v!r}: must be finite")
    return float(v)


@dataclass(frozen=True)
class Policy:
    """Per-layer compression ratios found by a search (or written by hand).

    Attributes
    ----------
    filter : ``{producer layer: fraction of prunable channels removed}``, each in [0, 1).
    sparsity : ``{layer: fraction of weights removed}``, each in [0, 1).
    bits : ``{layer: bits of the shared-weight codebook}``, each in [1, 16].
    criterion : filter score used by the search (``l1`` by default, Li et al.; checked by
        :class:`~nncompress.prune.FilterPruneConfig`).
    min_channels : every group keeps at least this many channels.
    info : free JSON-able description (agent, reward, budgets met, proxy accuracy, ...).
    """

    filter: Mapping[str, float] = field(default_factory=dict)
    sparsity: Mapping[str, float] = field(default_factory=dict)
    bits: Mapping[str, int] = field(default_factory=dict)
    criterion: str = "l1"
    min_channels: int = 1
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("filter", "sparsity", "bits", "info"):
            v = getattr(self, attr)
            if not isinstance(v, Mapping):
                raise ConfigError(f"{attr}={v!r}: must be a mapping {{layer name: value}}")
        object.__setattr__(
            self, "filter", {str(k): _ratio(f"filter['{k}']", v) for k, v in self.filter.items()}
        )
        object.__setattr__(
            self,
            "sparsity",
            {str(k): _ratio(f"sparsity['{k}']", v) for k, v in self.sparsity.items()},
        )
        bits = {}
        for k, b in self.bits.items():
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= _MAX_BITS:
                raise ConfigError(f"bits['{k}']={b!r}: must be an integer in [1, {_MAX_BITS}]")
            bits[str(k)] = b
        object.__setattr__(self, "bits", bits)
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ConfigError(f"criterion={self.criterion!r}: must be a filter criterion name")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ConfigError(f"min_channels={self.min_channels!r}: must be an integer >= 1")
        object.__setattr__(self, "info", dict(self.info))

    @property
    def empty(self) -> bool:
        return not (self.filter or self.sparsity or self.bits)

    # ---- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "filter": dict(self.filter),
            "sparsity": dict(self.sparsity),
            "bits": dict(self.bits),
            "criterion": self.criterion,
            "min_channels": self.min_channels,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        if not isinstance(data, Mapping):
            raise ConfigError(f"policy: expected a mapping, got {type(data).__name__}")
        fmt = data.get("format", POLICY_FORMAT)
        if fmt != POLICY_FORMAT:
            raise ConfigError(f"policy format={fmt!r}: this version reads {POLICY_FORMAT!r}")
        known = {"format", "filter", "sparsity", "bits", "criterion", "min_channels", "info"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"policy: unknown field(s) {unknown}; allowed: {sorted(known)}")
        kw = {k: v for k, v in data.items() if k != "format"}
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write the policy as JSON (atomically)."""
        path = Path(path)
        blob = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        atomic_write(path, lambda tmp: tmp.write_text(blob + "\n"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"policy file '{path}': cannot be read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"policy file '{path}': not valid JSON ({exc})") from None
        return cls.from_dict(data)
