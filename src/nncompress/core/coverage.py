"""What a transform changed and what it left alone: one report shape for every family.

A compression transform that silently skips most of a model (a quantizer that meets only the
classifier because every convolution is a subclass it does not recognise, a low-rank
decomposition that skips every 1x1 convolution) looks like it worked. Every transform therefore
returns or records a :class:`CoverageReport`: the layers it changed, the layers it considered
and skipped with the reason, and the share of the model's parameters it changed. When that
share is below :data:`LOW_COVERAGE` (a tenth), or when layers it was asked to change stayed as
they were, it warns (:class:`CoverageWarning`, also logged); the CLI prints the summary.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "LOW_COVERAGE",
    "CoverageReport",
    "CoverageWarning",
    "LayerOutcome",
    "coverage_report",
]

log = logging.getLogger(__name__)

#: a transform changing less than this share of the model's parameters warns
LOW_COVERAGE = 0.1


class CoverageWarning(UserWarning):
    """A transform changed little of the model, or left layers it was meant to change."""


@dataclass
class LayerOutcome:
    """One layer a transform considered: ``status`` is 'changed' or 'skipped'."""

    name: str
    type: str
    params: int
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CoverageReport:
    """Which layers a transform changed and skipped (with reasons), and the parameter share.

    Attributes
    ----------
    transform : the transform's name ('quantize', 'prune', 'decompose', ...).
    layers : one :class:`LayerOutcome` per considered layer, in model order.
    params_total : parameters of the whole model before the transform.
    """

    transform: str
    layers: list[LayerOutcome] = field(default_factory=list)
    params_total: int = 0

    @property
    def changed(self) -> list[LayerOutcome]:
        return [x for x in self.layers if x.status == "changed"]

    @property
    def skipped(self) -> list[LayerOutcome]:
        return [x for x in self.layers if x.status == "skipped"]

    @property
    def params_changed(self) -> int:
        return sum(x.params for x in self.changed)

    @property
    def fraction(self) -> float:
        return self.params_changed / self.params_total if self.params_total else 0.0

    def summary(self) -> str:
        """One line: how many layers changed and skipped, and the parameter share."""
        return (
            f"{self.transform}: changed {len(self.changed)} layer(s) holding "
            f"{self.params_changed:,} of {self.params_total:,} parameters "
            f"({100 * self.fraction:.1f}%), skipped {len(self.skipped)}"
        )

    def lines(self) -> list[str]:
        """The summary and one line per skipped layer with its reason."""
        out = [self.summary()]
        out += [f"  skipped {x.name} ({x.type}): {x.detail}" for x in self.skipped]
        return out

    def warnings(self) -> list[str]:
        """The warnings this report calls for (low coverage)."""
        if self.params_total and self.fraction < LOW_COVERAGE:
            return [
                f"{self.transform} changed only {100 * self.fraction:.1f}% of the model's "
                f"parameters (< {100 * LOW_COVERAGE:.0f}%): {len(self.changed)} layer(s) "
                f"changed, {len(self.skipped)} skipped"
                + (
                    " (" + "; ".join(f"{x.name}: {x.detail}" for x in self.skipped[:3]) + ")"
                    if self.skipped
                    else ""
                )
            ]
        return []

    def warn(self, extra: Iterable[str] = ()) -> list[str]:
        """Issue :meth:`warnings` (and ``extra``) as :class:`CoverageWarning` and log them."""
        msgs = [*self.warnings(), *extra]
        for m in msgs:
            log.warning(m)
            warnings.warn(m, CoverageWarning, stacklevel=3)
        return msgs

    def to_dict(self) -> dict[str, Any]:
        return {
            "transform": self.transform,
            "params_total": self.params_total,
            "params_changed": self.params_changed,
            "fraction": self.fraction,
            "changed": [x.name for x in self.changed],
            "skipped": {x.name: x.detail for x in self.skipped},
            "layers": [x.to_dict() for x in self.layers],
            "warnings": self.warnings(),
        }


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def coverage_report(
    transform: str,
    model: nn.Module,
    changed: Mapping[str, str] | Iterable[str],
    skipped: Mapping[str, str],
    *,
    params: Mapping[str, int] | None = None,
    types: Mapping[str, str] | None = None,
    params_total: int | None = None,
) -> CoverageReport:
    """Build a report from layer names (``changed``: names or ``{name: detail}``; ``skipped``:
    ``{name: reason}``). Parameters and types are read from ``model`` (as it was before the
    transform) unless ``params`` / ``types`` give them (layers the transform replaced)."""
    changed = dict(changed) if isinstance(changed, Mapping) else dict.fromkeys(changed, "")
    mods = dict(model.named_modules())
    order = {name: i for i, name in enumerate(mods)}
    rows = []
    for status, entries in (("changed", changed), ("skipped", skipped)):
        for name, detail in entries.items():
            m = mods.get(name)
            n = (params or {}).get(name, _params(m) if m is not None else 0)
            t = (types or {}).get(name, type(m).__name__ if m is not None else "?")
            rows.append(LayerOutcome(name, t.replace("Parametrized", ""), int(n), status, detail))
    rows.sort(key=lambda x: order.get(x.name, len(order)))
    total = _params(model) if params_total is None else params_total
    return CoverageReport(transform, rows, int(total))
