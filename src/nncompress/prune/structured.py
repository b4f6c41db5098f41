"""Filter (structured) pruning after Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets".

Each output filter ``F_ij`` of conv layer ``i`` (weights ``(n_i, k_h, k_w)``) is scored by its L1
norm ``s_j = sum |F_ij|``; the ``m`` filters with the smallest sums are removed together with
their feature maps and the matching input channels of the next layers (section 3.1). The
paper's ablation (section 4.4) compares this with random and largest-first selection; we also
offer the L2 norm ``sqrt(sum F_ij^2)``.

Coupled filters: when several layers must drop the same channel (the last conv of a residual
block, its projection shortcut and the identity blocks after it; see
:mod:`nncompress.prune.graph`), a channel's score is the **sum** of its members' filter norms,
and the group is pruned as one unit. Pruned channels are removed physically
(:mod:`nncompress.prune.thin`), so the result is a smaller dense model.

How many channels go:

- ``ratio``: the same fraction of every prunable group (``scope="layer"``), or the smallest
  channels over all groups ranked together (``scope="global"``; scores are divided by their
  group's mean so that layers of different size and fan-in compare);
- ``per_layer``: a fraction per named layer (its group);
- ``macs_budget``: the fraction of the model's dense Conv/Linear MACs to keep; the smallest
  global ratio meeting it is found by bisection (MACs after pruning are computed exactly from
  the traced shapes, the same count as :func:`nncompress.stats.count_macs`).

Retrain afterwards with :func:`nncompress.engine.finetune` (Li et al. retrain the whole pruned
network; the paper's "prune once and retrain").
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.convs import describe_conv
from ..core.coverage import CoverageReport, LayerOutcome
from ..core.errors import ConfigError
from ..core.policy import Policy
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector
from ..core.validate import check as _check
from .graph import ChannelGroup, DependencyGraph, LayerCut, build_dependency_graph
from .thin import apply_cuts_

__all__ = [
    "CRITERIA",
    "FilterPlan",
    "FilterPruneConfig",
    "FilterPruneReport",
    "filter_norms",
    "group_scores",
    "plan_filters",
    "prune_filters_",
]

log = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "random", "largest")
SCOPES = ("layer", "global")
_BISECT_STEPS = 30


def filter_norms(weight: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Norm of every output filter of a Conv/Linear weight: ``(C_out,)``.

    ``p=1``: ``s_j = sum_{c,u,v} |W[j, c, u, v]|`` (Li et al. 2017, eq. in section 3.1);
    ``p=2``: ``sqrt(sum W[j]^2)``.
    """
    if p not in (1, 2):
        raise ValueError(f"p={p}: must be 1 or 2")
    flat = weight.detach().reshape(weight.shape[0], -1)  # (C_out, C_in*k_h*k_w)
    return flat.abs().sum(1) if p == 1 else flat.pow(2).sum(1).sqrt()  # (C_out,)


@dataclass(frozen=True)
class FilterPruneConfig:
    """What filter pruning removes (exactly one of ``ratio``, ``per_layer``, ``macs_budget``).

    Attributes
    ----------
    criterion : ``l1`` (Li et al.), ``l2``, ``random`` (seeded) or ``largest`` (removes the
        largest-L1 filters first; the paper's ablation).
    ratio : fraction in [0, 1) of each group's prunable channels to remove (or of all channels
        with ``scope="global"``).
    per_layer : ``{layer name: fraction}``; the fraction applies to the layer's coupled group.
        Layers not named are left alone.
    macs_budget : fraction in (0, 1] of the dense Conv/Linear MACs to keep; the global ratio
        is found by bisection.
    scope : ``layer`` (same fraction per group) or ``global`` (one ranking over all groups).
    min_channels : every group keeps at least this many channels.
    exclude : fnmatch patterns of layer names; a group with a matching producer is not pruned.
    seed : seed of the ``random`` criterion.
    """

    criterion: str = "l1"
    ratio: float | None = None
    per_layer: Mapping[str, float] | None = None
    macs_budget: float | None = None
    scope: str = "layer"
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            self.criterion in CRITERIA, "criterion", self.criterion, f"must be one of {CRITERIA}"
        )
        _check(self.scope in SCOPES, "scope", self.scope, f"must be one of {SCOPES}")
        given = [n for n in ("ratio", "per_layer", "macs_budget") if getattr(self, n) is not None]
        _check(
            len(given) == 1,
            "ratio/per_layer/macs_budget",
            given or None,
            "give exactly one of ratio, per_layer or macs_budget",
        )
        if self.ratio is not None:
            _check(
                isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1,
                "ratio",
                self.ratio,
                "must be in [0, 1)",
            )
        if self.per_layer is not None:
            _check(
                isinstance(self.per_layer, Mapping) and len(self.per_layer) > 0,
                "per_layer",
                self.per_layer,
                "must be a non-empty mapping {layer name: fraction}",
            )
            for name, r in self.per_layer.items():
                _check(
                    isinstance(r, (int, float)) and 0 <= r < 1,
                    f"per_layer['{name}']",
                    r,
                    "must be in [0, 1)",
                )
            _check(
                self.scope == "layer",
                "scope",
                self.scope,
                "per_layer ratios need scope='layer'",
            )
            object.__setattr__(self, "per_layer", dict(self.per_layer))
        if self.macs_budget is not None:
            _check(
                isinstance(self.macs_budget, (int, float)) and 0 < self.macs_budget <= 1,
                "macs_budget",
                self.macs_budget,
                "must be in (0, 1] (fraction of MACs to keep)",
            )
        _check(
            isinstance(self.min_channels, int) and self.min_channels >= 1,
            "min_channels",
            self.min_channels,
            "must be an integer >= 1",
        )
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))
        for pat in self.exclude:
            _check(isinstance(pat, str), "exclude", pat, "must be fnmatch patterns (strings)")
        _check(isinstance(self.seed, int), "seed", self.seed, "must be an integer")

    @property
    def selector(self) -> LayerSelector:
        """The producers this config may prune (a group is skipped when any producer is
        excluded)."""
        return LayerSelector(exclude=self.exclude)

    @classmethod
    def from_policy(cls, policy: Policy) -> FilterPruneConfig:
        """``per_layer`` ratios (and criterion, min_channels) of a :class:`~nncompress.core.Policy`."""
        if not policy.filter:
            raise ConfigError("policy.filter is empty: this policy prunes no filters")
        return cls(
            per_layer=dict(policy.filter),
            criterion=policy.criterion,
            min_channels=policy.min_channels,
        )

    def replace(self, **changes: Any) -> FilterPruneConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class FilterPlan:
    """Channels chosen for removal: ``plan`` feeds :func:`~nncompress.prune.remove_channels_`.

    ``removed[g]`` lists the channel numbers removed from ``graph.groups[g]``; ``ratio`` is the
    global ratio used (the bisection result for a MAC budget).
    """

    plan: dict[str, list[int]]
    removed: dict[int, list[int]]
    cuts: dict[str, LayerCut]
    ratio: float | None
    macs_before: int
    macs_after: int


@dataclass
class FilterPruneReport:
    """Result of :func:`prune_filters_`: params and MACs before/after, per layer and in total."""

    criterion: str
    scope: str
    ratio: float | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    plan: dict[str, list[int]] = field(default_factory=dict)
    coverage: CoverageReport | None = None

    @property
    def macs_kept(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict:
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "coverage"
        }
        out = copy.deepcopy(out)
        out["coverage"] = self.coverage.to_dict() if self.coverage else None
        return {**out, "macs_kept": self.macs_kept}


def _filter_coverage(
    model_before: dict[str, tuple[str, int]],
    params_total: int,
    graph: DependencyGraph,
    thinned: list[str],
    config: FilterPruneConfig,
) -> CoverageReport:
    """Layers thinned, and the Conv/Linear producers left whole with the reason."""
    changed = {n: "channels removed" for n in thinned}
    skipped: dict[str, str] = {}
    sel = config.selector
    for g in graph.groups:
        fixed = sorted({r for r in g.reasons if r})
        for p in g.producers:
            if p in changed or p in skipped:
                continue
            if g.num_prunable == 0:
                skipped[p] = "its channels cannot be removed: " + "; ".join(fixed[:2])
            elif not all(sel(q, None) for q in g.producers):
                skipped[p] = f"excluded (exclude={list(config.exclude)})"
            else:
                skipped[p] = "none of its group's channels were chosen"
    rows = []
    for status, entries in (("changed", changed), ("skipped", skipped)):
        for name, detail in entries.items():
            t, n = model_before.get(name, ("?", 0))
            rows.append(LayerOutcome(name, t, n, status, detail))
    order = {name: i for i, name in enumerate(model_before)}
    rows.sort(key=lambda x: order.get(x.name, len(order)))
    return CoverageReport("prune-filters", rows, params_total)


def group_scores(
    model: nn.Module, graph: DependencyGraph, criterion: str, seed: int = 0
) -> list[np.ndarray]:
    """Importance of every channel of every group (higher = keep), shape ``(group.size,)`` each.

    A channel's score is the sum over its producers of the filter norm (L1 or L2) -- coupled
    filters are judged together. ``largest`` negates the L1 score so that the largest filters go
    first; ``random`` draws uniform scores from a generator seeded with ``seed``.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r}: must be one of {CRITERIA}")
    gen = torch.Generator().manual_seed(seed)
    norms: dict[str, np.ndarray] = {}
    out = []
    for group in graph.groups:
        if criterion == "random":
            out.append(torch.rand(group.size, generator=gen, dtype=torch.float64).numpy())
            continue
        p = 2 if criterion == "l2" else 1
        scores = np.zeros(group.size)
        for c in range(group.size):
            for name, pos in group.producer_positions(c):
                if name not in norms:
                    w = model.get_submodule(name).weight
                    norms[name] = filter_norms(w, p).double().cpu().numpy()
                scores[c] += norms[name][pos]
        out.append(-scores if criterion == "largest" else scores)
    return out


def _excluded(group: ChannelGroup, selector: LayerSelector) -> bool:
    """A group is left alone when the selector rejects any of its producers."""
    return not all(selector.matches_name(p) for p in group.producers)


def _n_remove(group: ChannelGroup, ratio: float, min_channels: int) -> int:
    n = int(math.floor(ratio * group.num_prunable + 1e-9))
    return max(0, min(n, group.num_prunable, group.size - min_channels))


def _choose(
    graph: DependencyGraph,
    scores: list[np.ndarray],
    config: FilterPruneConfig,
    ratio: float | None,
    per_group: dict[int, float] | None,
) -> dict[int, list[int]]:
    removed: dict[int, list[int]] = {}
    active = [g for g in graph.groups if g.num_prunable and not _excluded(g, config.selector)]
    if config.scope == "layer" or per_group is not None:
        for g in active:
            r = per_group.get(g.index) if per_group is not None else ratio
            if r is None:
                continue
            k = _n_remove(g, r, config.min_channels)
            if k:
                cand = [c for c in range(g.size) if g.prunable[c]]
                order = sorted(cand, key=lambda c: (scores[g.index][c], c))
                removed[g.index] = sorted(order[:k])
        return removed
    # global: one ranking over all prunable channels, scores normalised per group
    pool: list[tuple[float, int, int]] = []
    for g in active:
        s = scores[g.index]
        cand = [c for c in range(g.size) if g.prunable[c]]
        scale = 1.0
        if config.criterion in ("l1", "l2", "largest"):
            mean = float(np.mean(np.abs(s[cand])))
            scale = 1.0 / mean if mean > 0 else 1.0
        pool.extend((float(s[c]) * scale, g.index, c) for c in cand)
    pool.sort()
    total = int(math.floor((ratio or 0.0) * len(pool) + 1e-9))
    left = {g.index: g.size for g in active}
    taken = 0
    for _, gi, c in pool:
        if taken >= total:
            break
        if left[gi] - 1 < config.min_channels:
            continue
        left[gi] -= 1
        removed.setdefault(gi, []).append(c)
        taken += 1
    return {gi: sorted(cs) for gi, cs in removed.items()}


def _to_plan(graph: DependencyGraph, removed: Mapping[int, list[int]]) -> dict[str, list[int]]:
    plan: dict[str, list[int]] = {}
    for gi, chans in removed.items():
        group = graph.groups[gi]
        for c in chans:
            for name, pos in group.producer_positions(c):
                plan.setdefault(name, []).append(pos)
    return {k: sorted(v) for k, v in plan.items()}


def plan_filters(
    model: nn.Module,
    config: FilterPruneConfig,
    example_input: torch.Tensor,
    *,
    graph: DependencyGraph | None = None,
    progress: Progress | None = None,
) -> FilterPlan:
    """Choose the channels to remove (nothing is changed). See :func:`prune_filters_`."""
    graph = graph or build_dependency_graph(model, example_input)
    scores = group_scores(model, graph, config.criterion, config.seed)
    macs_before = sum(graph.macs().values())

    def evaluate(ratio: float | None, per_group=None) -> FilterPlan:
        removed = _choose(graph, scores, config, ratio, per_group)
        plan = _to_plan(graph, removed)
        cuts = graph.expand(plan)
        return FilterPlan(plan, removed, cuts, ratio, macs_before, sum(graph.macs(cuts).values()))

    if config.per_layer is not None:
        per_group: dict[int, float] = {}
        for name, r in config.per_layer.items():
            if name not in graph.producers:
                raise ConfigError(
                    f"per_layer key '{name}': not a Conv/Linear layer of the model; "
                    f"prunable layers: {graph.producers}"
                )
            g = graph.group_of(name)
            if g.num_prunable == 0:
                raise ConfigError(
                    f"per_layer key '{name}': its channels cannot be removed "
                    f"({sorted({x for x in g.reasons if x})})"
                )
            if per_group.get(g.index, r) != r:
                raise ConfigError(
                    f"per_layer key '{name}': ratio {r} differs from {per_group[g.index]} given "
                    f"for a layer coupled with it (group {g.producers})"
                )
            per_group[g.index] = r
        return evaluate(None, per_group)
    if config.ratio is not None:
        return evaluate(config.ratio)
    # MAC budget: bisection on the global ratio (MACs grow monotonically as the ratio falls)
    target = config.macs_budget * macs_before
    lo, hi = 0.0, 1.0 - 1e-9
    best = evaluate(hi)
    if best.macs_after > target:
        raise ConfigError(
            f"macs_budget={config.macs_budget}: unreachable; pruning every prunable channel "
            f"(keeping min_channels={config.min_channels}, exclude={list(config.exclude)}) "
            f"keeps {best.macs_after / macs_before:.3f} of the MACs"
        )
    with progress_task(progress, "macs-bisection", _BISECT_STEPS) as task:
        for _ in range(_BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            trial = evaluate(mid)
            if trial.macs_after <= target:
                hi, best = mid, trial
            else:
                lo = mid
            task.advance()
    log.info(
        "macs_budget=%.3f: ratio %.4f keeps %.4f of the MACs",
        config.macs_budget,
        best.ratio,
        best.macs_after / macs_before,
    )
    return best


def prune_filters_(
    model: nn.Module,
    config: FilterPruneConfig | Policy,
    example_input: torch.Tensor,
    *,
    progress: Progress | None = None,
) -> FilterPruneReport:
    """Score filters, choose the channels to remove and thin ``model`` in place.

    Parameters
    ----------
    model : a trained model (any architecture :mod:`nncompress.prune.graph` can trace).
    config : :class:`FilterPruneConfig`, or a :class:`~nncompress.core.Policy` (its per-layer
        filter ratios, e.g. from a policy search).
    example_input : one batch of inputs, used to trace shapes and count MACs.
    progress : receives :class:`~nncompress.engine.ProgressEvent` during the MAC bisection.

    Returns
    -------
    FilterPruneReport : params and MACs before/after, per layer and in total, and the plan.
        Retrain afterwards (:func:`nncompress.engine.finetune`).
    """
    if isinstance(config, Policy):
        config = FilterPruneConfig.from_policy(config)
    graph = build_dependency_graph(model, example_input)
    chosen = plan_filters(model, config, example_input, graph=graph, progress=progress)
    macs_before = graph.macs()
    macs_after = graph.macs(chosen.cuts)
    before = {
        n: (
            describe_conv(m) if isinstance(m, nn.Conv1d | nn.Conv2d) else type(m).__name__,
            sum(p.numel() for p in m.parameters()),
        )  # fmt: skip
        for n, m in model.named_modules()
        if n
    }
    params_total = sum(p.numel() for p in model.parameters())
    thin = apply_cuts_(model, chosen.cuts, graph)
    layers = []
    for row in thin.layers:
        name = row["name"]
        layers.append(
            {**row, "macs_before": macs_before.get(name, 0), "macs_after": macs_after.get(name, 0)}
        )
    groups = [
        {
            "producers": graph.groups[gi].producers,
            "channels": graph.groups[gi].size,
            "removed": len(chans),
        }
        for gi, chans in sorted(chosen.removed.items())
    ]
    report = FilterPruneReport(
        criterion=config.criterion,
        scope=config.scope,
        ratio=chosen.ratio,
        params_before=thin.params_before,
        params_after=thin.params_after,
        macs_before=thin.macs_before,
        macs_after=thin.macs_after,
        layers=layers,
        groups=groups,
        plan=chosen.plan,
    )
    report.coverage = _filter_coverage(
        before, params_total, graph, [row["name"] for row in thin.layers], config
    )
    report.coverage.warn()
    log.info(
        "filter pruning (%s, %s): MACs %d -> %d (%.1f%% kept), params %d -> %d",
        config.criterion,
        config.scope,
        report.macs_before,
        report.macs_after,
        100 * report.macs_kept,
        report.params_before,
        report.params_after,
    )
    return report
