"""Model analysis for the policy search: which units can be compressed, and their costs.

Units are taken in forward order: the coupled channel groups of
:mod:`nncompress.prune.graph` (filter pruning; one action per group), then, per Conv/Linear
layer, connection sparsity and shared-weight bits. For every filter unit the channels are
ranked once by the filter criterion (L1 by default), so that "remove ``r`` channels" means the
``r`` lowest-scored ones, exactly as :func:`nncompress.prune.prune_filters_` picks them, and a
:class:`~nncompress.policy.budget.FilterTable` records how each layer's width shrinks with
``r``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import folded_copy
from ..prune.graph import DependencyGraph, build_dependency_graph
from ..prune.magnitude import prunable_layers
from ..prune.structured import CRITERIA, group_scores
from ..stats import count_macs
from .budget import (
    _FRAME_BYTES,
    _HEADER_BYTES_PER_TENSOR,
    Budget,
    CostModel,
    FilterTable,
    LatencyModel,
    LayerGeom,
    fit_latency_model,
)

__all__ = ["KINDS", "ActionsConfig", "Unit", "analyse"]

KINDS = ("filter", "sparsity", "bits")


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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def analyse(
    model: nn.Module,
    example_input: torch.Tensor,
    actions: ActionsConfig | None = None,
    budgets: Sequence[Budget] = (),
    *,
    latency_repeats: int = 20,
) -> tuple[list[Unit], CostModel, DependencyGraph | None]:
    """Units (in forward order), exact cost model and dependency graph of ``model`` (not
    changed) on ``example_input`` (one batch).

    Raises :class:`~nncompress.engine.ConfigError` when no unit can be compressed, or a
    latency budget is asked for without filter actions.
    """
    actions = actions or ActionsConfig()
    work = folded_copy(model).eval()
    if any(b.metric == "latency" for b in budgets) and not actions.filter:
        raise ConfigError(
            "budget latency: needs filter actions (connection sparsity and weight sharing "
            "do not make dense CPU kernels faster)"
        )
    shape = tuple(example_input.shape[1:])
    macs = count_macs(work, shape)
    modules = dict(work.named_modules())
    layers: list[LayerGeom] = []
    for name, (dense, _) in macs.items():
        m = modules[name]
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.numel() == 0:
            continue
        if isinstance(m, nn.Linear):
            kind, n_in, kernel, groups, stride = "linear", m.in_features, 1, 1, 1
        else:
            dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
            kind = "depthwise" if dw else "conv"
            n_in, groups = m.in_channels, m.groups
            kernel = int(np.prod(m.kernel_size))
            stride = int(m.stride[0])
        positions = dense // w.numel()
        layers.append(
            LayerGeom(
                name,
                kind,
                int(w.shape[0]),
                n_in,
                kernel,
                groups,
                positions,
                m.bias is not None,
                stride,
            )
        )
    index = {g.name: i for i, g in enumerate(layers)}
    graph = build_dependency_graph(work, example_input) if actions.filter else None
    units: list[Unit] = []
    followers: list[tuple[str, int, int, int]] = []
    if graph is not None:
        units, followers = _filter_units(work, graph, actions, index, modules)
    if actions.sparsity or actions.bits:
        names = prunable_layers(work, exclude=actions.exclude)
        for name in names:
            if name not in index:
                continue
            li = index[name]
            n = layers[li].n_out * (layers[li].n_in // layers[li].groups) * layers[li].kernel
            if layers[li].kind == "depthwise":
                n = layers[li].n_out * layers[li].kernel
            if actions.sparsity:
                lo = min(n, max(1, math.ceil(actions.min_density * n - 1e-9)))
                units.append(Unit("sparsity", name, [name], lo, n, n, li))
            if actions.bits:
                m_ = len(actions.bits)
                units.append(Unit("bits", name, [name], 0, m_ - 1, max(m_ - 1, 1), li))
    if not units:
        raise ConfigError(
            f"actions={actions.to_dict()}: no layer of the model can be compressed (every "
            "group is fixed or excluded)"
        )
    kind_rank = {k: i for i, k in enumerate(KINDS)}
    perm = sorted(range(len(units)), key=lambda i: (units[i].layer_index, kind_rank[units[i].kind]))
    units = [units[i] for i in perm]
    tables = [u.table for u in units if u.kind == "filter"]
    const_params, const_bytes = _constants(work, layers, followers)
    latency: dict[int, LatencyModel] = {}
    for b in budgets:
        if b.metric == "latency" and b.batch not in latency:
            latency[b.batch] = fit_latency_model(
                work,
                example_input,
                b.batch,
                repeats=latency_repeats,
                min_channels=actions.min_channels,
                exclude=actions.exclude,
            )
    cost = CostModel(layers, followers, const_params, const_bytes, tables, latency)
    return units, cost, graph


def _filter_units(work, graph, actions, index, modules):
    """One filter unit per prunable, non-excluded coupled group, with its width table."""
    scores = group_scores(work, graph, actions.criterion)
    units: list[Unit] = []
    followers: list[tuple[str, int, int, int]] = []
    f_index: dict[str, int] = {}
    for g in graph.groups:
        if g.num_prunable == 0 or any(_matches(p, actions.exclude) for p in g.producers):
            continue
        p_count = g.num_prunable
        r_max = min(p_count, g.size - actions.min_channels)
        if r_max <= 0:
            continue
        cand = [c for c in range(g.size) if g.prunable[c]]
        order = sorted(cand, key=lambda c: (scores[g.index][c], c))[:r_max]
        hi = min(p_count, math.floor(actions.max_keep * p_count + 1e-9))
        lo = max(math.ceil(actions.min_keep * p_count - 1e-9), p_count - r_max)
        lo = min(lo, hi)
        if lo == hi:
            continue
        out: dict[int, np.ndarray] = {}
        inp: dict[int, np.ndarray] = {}
        fol: dict[int, np.ndarray] = {}
        for mod, role in g.members:
            counts = np.array(
                [len(g.channels[c].get((mod, role), ())) for c in order], dtype=np.int64
            )
            cum = np.concatenate([[0], np.cumsum(counts)])  # (r_max + 1,)
            if mod in index and role in ("out", "follow"):
                out[index[mod]] = cum
            elif mod in index and role == "in":
                inp[index[mod]] = cum
            elif role == "follow":
                if mod not in f_index:
                    m = modules[mod]
                    n_ch = (
                        m.num_features if hasattr(m, "num_features") else int(m.normalized_shape[0])
                    )
                    par = sum(p.numel() for p in m.parameters(recurse=False)) // max(n_ch, 1)
                    state = sum(
                        t.numel()
                        for t in m.state_dict().values()
                        if t.dim() >= 1 and t.shape[0] == n_ch
                    ) // max(n_ch, 1)
                    f_index[mod] = len(followers)
                    followers.append((mod, n_ch, par, state))
                fol[f_index[mod]] = cum
        producers = [p for p in g.producers if p in index]
        first = min(index[p] for p in producers)
        table = FilterTable(out, inp, fol)
        units.append(
            Unit(
                "filter",
                g.producers[0],
                list(g.producers),
                lo,
                hi,
                p_count,
                first,
                g.index,
                p_count,
                order,
                table,
            )
        )
    return units, followers


def _constants(work, layers, followers) -> tuple[int, float]:
    """Parameters and raw bytes of everything the cost model does not track."""
    tracked: set[str] = set()
    for g in layers:
        tracked.add(f"{g.name}.weight")
        if g.bias:
            tracked.add(f"{g.name}.bias")
    params = 0
    for name, p in work.named_parameters():
        if name not in tracked and not any(name.startswith(f[0] + ".") for f in followers):
            params += p.numel()
    followers_ch = {f[0]: f[1] for f in followers}
    nbytes = 16.0 + 2 * _FRAME_BYTES + 64  # prefix, header and metadata frames, JSON
    for name, t in work.state_dict().items():
        nbytes += _HEADER_BYTES_PER_TENSOR
        mod = name.rsplit(".", 1)[0]
        if name in tracked:
            if name.endswith(".bias"):
                nbytes += _FRAME_BYTES
            continue
        if mod in followers_ch and t.dim() >= 1 and t.shape[0] == followers_ch[mod]:
            nbytes += _FRAME_BYTES
            continue
        nbytes += t.numel() * t.element_size() + _FRAME_BYTES
    return params, nbytes
