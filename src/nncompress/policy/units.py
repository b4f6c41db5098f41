"""The units of a policy search (one decision each) and the bounds of their actions.

Units are taken in forward order: the coupled channel groups of
:mod:`nncompress.prune.graph` (filter pruning; one action per group), then, per Conv/Linear
layer, connection sparsity and shared-weight bits. They are built from a model by
:func:`nncompress.stages.search_model.analyse`; here they are plain data (families do not
import each other), with for every filter unit its channels' removal order (lowest filter
score first, as :func:`nncompress.prune.prune_filters_` picks them) and a
:class:`~nncompress.policy.budget.FilterTable` of how each layer's width shrinks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ConfigError
from .budget import FilterTable

__all__ = ["CRITERIA", "KINDS", "ActionsConfig", "Unit"]

KINDS = ("filter", "sparsity", "bits")
#: filter scores of nncompress.prune.structured (checked again there)
CRITERIA = ("l1", "l2", "random", "largest")


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {allowed}")


@dataclass(frozen=True)
class ActionsConfig:
    """Which per-unit actions the search takes, and their bounds.

    Attributes
    ----------
    filter : search a filter-pruning ratio per coupled channel group.
    sparsity : search a connection-pruning sparsity per Conv/Linear layer.
    bits : shared-weight bit choices searched per layer (empty: no bits actions).
    min_keep, max_keep : bounds of the fraction of a group's prunable channels kept (AMC's
        ``lbound`` 0.2 and ``rbound`` 1).
    min_density : the smallest fraction of a layer's weights kept by connection pruning.
    min_channels : every group keeps at least this many channels.
    criterion : filter score (``l1``: Li et al.; AMC prunes by magnitude too).
    exclude : fnmatch patterns of layer names never compressed.
    storage_bits : bits assumed by the ``bytes`` estimate for layers without a bits action
        (0 = float32, no sharing).
    """

    filter: bool = True
    sparsity: bool = False
    bits: tuple[int, ...] = ()
    min_keep: float = 0.2
    max_keep: float = 1.0
    min_density: float = 0.02
    min_channels: int = 1
    criterion: str = "l1"
    exclude: tuple[str, ...] = ()
    storage_bits: int = 0

    def __post_init__(self) -> None:
        for name in ("filter", "sparsity"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, v, "must be true or false")
        bits = tuple(sorted(set(self.bits or ())))
        for b in bits:
            _check(
                isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 8,
                "bits",
                list(self.bits),
                "must be integers in [1, 8]",
            )
        object.__setattr__(self, "bits", bits)
        _check(
            self.filter or self.sparsity or bool(bits),
            "filter/sparsity/bits",
            (self.filter, self.sparsity, bits),
            "enable at least one kind of action",
        )
        _check(0 < self.min_keep <= 1, "min_keep", self.min_keep, "must be in (0, 1]")
        _check(
            self.min_keep <= self.max_keep <= 1,
            "max_keep",
            self.max_keep,
            "must be in [min_keep, 1]",
        )
        _check(0 < self.min_density <= 1, "min_density", self.min_density, "must be in (0, 1]")
        _check(
            isinstance(self.min_channels, int) and self.min_channels >= 1,
            "min_channels",
            self.min_channels,
            "must be an integer >= 1",
        )
        _check(self.criterion in CRITERIA, "criterion", self.criterion, f"one of {CRITERIA}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        object.__setattr__(self, "exclude", exclude)
        _check(
            isinstance(self.storage_bits, int) and 0 <= self.storage_bits <= 8,
            "storage_bits",
            self.storage_bits,
            "must be 0 (float32) or bits in [1, 8]",
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bits"], d["exclude"] = list(self.bits), list(self.exclude)
        return d


@dataclass
class Unit:
    """One decision of an episode. ``q`` (the kept quantity) is an integer in ``[lo, hi]``:
    kept prunable channels (filter), kept weights (sparsity) or an index into the bit choices
    (bits); the action is ``q / full``."""

    kind: str
    name: str
    layers: list[str]
    lo: int
    hi: int
    full: int
    layer_index: int
    group: int | None = None
    prunable: int = 0
    order: list[int] = field(default_factory=list)  # filter: removal order of group channels
    table: FilterTable | None = field(default=None, repr=False)  # filter: width reductions

    def q_of(self, action: float) -> int:
        a = min(max(float(action), 0.0), 1.0)
        return int(min(max(round(a * self.full), self.lo), self.hi))

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "layers": list(self.layers),
            "lo": self.lo,
            "hi": self.hi,
            "full": self.full,
        }
