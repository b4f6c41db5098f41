"""The model side of a policy search (AMC, He et al. 2018): units and costs of a model, the
fast accuracy proxy, and the problem object the search of :mod:`nncompress.policy` drives.

:mod:`nncompress.policy` holds the algorithms (budgets, clipped actions, agents, the search
loop, executors) and never touches a model's layers: families do not import each other. This
adapter is where the policy family meets the transforms of :mod:`nncompress.prune` and
:mod:`nncompress.quant`:

- :func:`analyse` traces the model once (:func:`~nncompress.prune.build_dependency_graph`),
  ranks each coupled group's channels by the filter criterion
  (:func:`~nncompress.prune.group_scores`, so "remove ``r`` channels" means the ones
  :func:`~nncompress.prune.prune_filters_` would remove) and records how every layer's width
  shrinks with ``r``; per-layer geometry comes from :func:`~nncompress.stats.count_macs`;
- the proxy (AMC section 3.2): a copy is thinned as the candidate says, the layers that lost
  input channels are refitted by least squares to the original responses
  (:func:`~nncompress.prune.reconstruct_`), connections are pruned and weights shared, and the
  copy is evaluated on a fixed held-out subset without fine-tuning;
- :class:`ModelProblem` packs both for :func:`nncompress.policy.search`;
  :func:`search_model` is the one-call entry point.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import folded_copy, set_submodule
from ..core.progress import ProgressEvent
from ..data.datasets import BatchLoader
from ..engine.train import evaluate
from ..policy.budget import (
    _FRAME_BYTES,
    _HEADER_BYTES_PER_TENSOR,
    Budget,
    CostModel,
    FilterTable,
    LatencyModel,
    LayerGeom,
)
from ..policy.env import ActionSpace
from ..policy.executor import Executor
from ..policy.proxy import ProxyConfig
from ..policy.search import SearchConfig, SearchResult, search
from ..policy.units import KINDS, ActionsConfig, Unit
from ..prune.graph import DependencyGraph, LayerCut, build_dependency_graph
from ..prune.magnitude import magnitude_mask, prunable_layers
from ..prune.reconstruct import ReconstructionData, reconstruct_, reconstruction_data
from ..prune.structured import FilterPruneConfig, group_scores, prune_filters_
from ..prune.thin import thin_module
from ..quant.kmeans import KMeansConfig, share_weights_
from ..stats import count_macs, measure_latency

__all__ = [
    "CompressionPlan",
    "ModelProblem",
    "ProxyData",
    "analyse",
    "apply_plan_",
    "build_space",
    "evaluate_candidate",
    "fit_latency_model",
    "make_proxy_data",
    "model_fingerprint",
    "search_model",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# units and costs
# --------------------------------------------------------------------------------------------


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

    Raises :class:`~nncompress.core.ConfigError` when a latency budget is asked for without
    filter actions.
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


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------


def fit_latency_model(
    model: nn.Module,
    example_input: torch.Tensor,
    batch: int,
    *,
    keeps: Sequence[float] = (1.0, 0.75, 0.5, 0.3),
    repeats: int = 20,
    min_channels: int = 1,
    exclude: Sequence[str] = (),
) -> LatencyModel:
    """Measure the CPU latency of uniformly filter-pruned copies of ``model`` and fit
    ``latency = t0 + c * dense MACs`` by least squares.

    Each copy keeps ``keep`` of every prunable group's channels (L1 criterion, thinned), its
    median latency at ``batch`` is measured with :func:`nncompress.stats.measure_latency`.
    """
    shape = tuple(example_input.shape[1:])
    points: list[tuple[float, float]] = []
    for keep in keeps:
        if not 0 < keep <= 1:
            raise ConfigError(f"keeps: {keep!r} must be in (0, 1]")
        m = copy.deepcopy(model).eval()
        if keep < 1:
            cfg = FilterPruneConfig(
                ratio=1.0 - keep, min_channels=min_channels, exclude=tuple(exclude)
            )
            prune_filters_(m, cfg, example_input)
        macs = float(sum(v[0] for v in count_macs(m, shape).values()))
        ms = measure_latency(m, shape, batch, repeats=repeats, warmup=max(2, repeats // 5))
        points.append((macs, ms))
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    if len(points) >= 2 and np.ptp(x) > 0:
        c, t0 = np.polyfit(x, y, 1)
    else:
        c, t0 = (y[0] / x[0] if x[0] else 0.0), 0.0
    if c <= 0:  # timing noise on a shared machine: fall back to proportional latency
        log.warning(
            "latency fit at batch %d has slope %.3g <= 0; using ms proportional to MACs", batch, c
        )
        t0, c = 0.0, float(y.mean() / x.mean())
    dense = points[0][1] if keeps[0] == 1.0 else float(t0 + c * x.max())
    lm = LatencyModel(batch, float(t0), float(c), float(dense), points)
    log.info("latency model batch %d: %.3f ms + %.3g ms/MAC (dense %.3f ms)", batch, t0, c, dense)
    return lm


def build_space(
    model: nn.Module,
    example_input: torch.Tensor,
    actions: ActionsConfig | None = None,
    budgets: Sequence[Budget] = (),
    *,
    latency_repeats: int = 20,
) -> ActionSpace:
    """The :class:`~nncompress.policy.ActionSpace` of ``model`` (see :func:`analyse`).

    Raises :class:`~nncompress.core.ConfigError` when a budget cannot be met even with every
    unit compressed as much as allowed, before any episode.
    """
    actions = actions or ActionsConfig()
    units, cost, _ = analyse(
        model, example_input, actions, budgets, latency_repeats=latency_repeats
    )
    return ActionSpace(units, cost, budgets, actions)


# --------------------------------------------------------------------------------------------
# the proxy
# --------------------------------------------------------------------------------------------


@dataclass
class CompressionPlan:
    """One candidate as plain data (cheap to send to a worker): the thinning cuts of every
    touched module, per-layer sparsities and bits, and the layers to refit."""

    cuts: dict[str, LayerCut]
    sparsity: dict[str, float]
    bits: dict[str, int]
    refit: list[str]


def plan_of(space: ActionSpace, graph: DependencyGraph | None, q: Sequence[int]) -> CompressionPlan:
    """The channels to cut (the ``r`` lowest-scored of each group), sparsities and bits of
    the kept counts ``q``."""
    producer_plan: dict[str, list[int]] = {}
    pol = space.policy(q)
    for u, qu in zip(space.units, q, strict=True):
        if u.kind != "filter" or graph is None:
            continue
        group = graph.groups[u.group]
        for c in u.order[: u.prunable - int(qu)]:
            for name, pos in group.producer_positions(c):
                producer_plan.setdefault(name, []).append(pos)
    cuts = graph.expand(producer_plan) if producer_plan and graph is not None else {}
    refit = [
        n for n, cut in cuts.items() if cut.keep_in is not None and cut.kind in ("conv", "linear")
    ]
    return CompressionPlan(cuts, dict(pol.sparsity), dict(pol.bits), refit)


@dataclass
class ProxyData:
    """What every worker needs once: the model, the held-out subset, the refit targets."""

    model: nn.Module
    val_x: torch.Tensor
    val_y: torch.Tensor
    recon: ReconstructionData | None
    config: ProxyConfig


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _subset(x: torch.Tensor, y: torch.Tensor | None, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[: min(n, len(x))].sort().values
    return x[idx], (y[idx] if y is not None else None)


def make_proxy_data(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    space: ActionSpace,
    config: ProxyConfig,
) -> ProxyData:
    """Fix the held-out subset and compute the refit targets of every layer that any filter
    unit can cut (one forward pass of the unpruned model)."""
    if len(val[0]) == 0:
        raise ConfigError("val split is empty: the proxy needs held-out samples")
    work = copy.deepcopy(model).eval()
    vx, vy = _subset(val[0], val[1], config.val_samples, config.seed)
    recon = None
    if config.refit:
        names = sorted(
            {
                space.cost.layers[li].name
                for u in space.units
                if u.kind == "filter" and u.table is not None
                for li in u.table.inp
            }
        )
        if names:
            cx, _ = _subset(train[0], None, config.calib_samples, config.seed + 1)
            with _threads(config.threads):
                recon = reconstruction_data(
                    work, cx, names, points_per_image=config.points_per_image, seed=config.seed
                )
    return ProxyData(work, vx, vy, recon, config)


def apply_plan_(
    model: nn.Module,
    plan: CompressionPlan,
    data: ProxyData | None = None,
    config: ProxyConfig | None = None,
) -> list:
    """Compress ``model`` in place as ``plan`` says (refit when ``data`` has targets)."""
    for name, cut in plan.cuts.items():
        set_submodule(model, name, thin_module(model.get_submodule(name), cut))
    refit = []
    if data is not None and data.recon is not None and plan.refit:
        keep_out = {n: plan.cuts[n].keep_out for n in plan.refit}
        ridge = config.ridge if config is not None else 1e-4
        refit = reconstruct_(model, data.recon, plan.refit, keep_out=keep_out, ridge=ridge)
    with torch.no_grad():
        for name, s in plan.sparsity.items():
            w = model.get_submodule(name).weight
            w.mul_(magnitude_mask(w, s).to(w.dtype))
    if plan.bits:
        share_weights_(model, KMeansConfig(per_layer=dict(plan.bits)), filter=sorted(plan.bits))
    return refit


def evaluate_candidate(data: ProxyData, plan: CompressionPlan) -> dict:
    """Proxy accuracy (%) and loss of one candidate on the held-out subset (what an executor
    runs, here or on a Ray worker).

    Runs with ``data.config.threads`` torch threads and restores the previous setting.
    """
    config = data.config
    t0 = time.perf_counter()
    with _threads(config.threads):
        model = copy.deepcopy(data.model)
        refit = apply_plan_(model, plan, data, config)
        loader = BatchLoader(data.val_x, data.val_y, config.batch_size)
        res = evaluate(model, loader)
    return {
        "accuracy": float(res["accuracy"]),
        "loss": float(res["loss"]),
        "refit_error": (float(sum(r.error_after for r in refit) / len(refit)) if refit else None),
        "wall_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# the problem
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the state dict: a resumed search checks its model by it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ModelProblem:
    """A model and its data as a :class:`nncompress.policy.search.SearchProblem`.

    Build with :meth:`build`. ``shared`` (:class:`ProxyData`) is what executors send to their
    workers once; :meth:`candidate` turns kept counts into a :class:`CompressionPlan`.
    """

    evaluate_fn: Callable[[Any, Any], dict] = staticmethod(evaluate_candidate)

    def __init__(
        self, space: ActionSpace, graph: DependencyGraph | None, shared: ProxyData, fingerprint: str
    ) -> None:
        self.space = space
        self.graph = graph
        self.shared = shared
        self.fingerprint = fingerprint

    @classmethod
    def build(
        cls,
        model: nn.Module,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        config: SearchConfig,
        *,
        example_input: torch.Tensor | None = None,
        latency_repeats: int = 20,
    ) -> ModelProblem:
        """Analyse ``model`` (not changed) and fix the proxy's data.

        ``train`` gives the calibration images of the refit, ``val`` (the held-out split,
        never the test split) the proxy's subset; ``example_input`` (default: two held-out
        samples) is used for tracing.
        """
        work = folded_copy(model).eval()
        if example_input is None:
            example_input = val[0][:2]
        units, cost, graph = analyse(
            work, example_input, config.actions, config.budgets, latency_repeats=latency_repeats
        )
        space = ActionSpace(units, cost, config.budgets, config.actions)
        shared = make_proxy_data(work, train, val, space, config.proxy)
        return cls(space, graph, shared, model_fingerprint(work))

    def candidate(self, q: np.ndarray) -> CompressionPlan:
        return plan_of(self.space, self.graph, q)


def search_model(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: SearchConfig | None = None,
    *,
    example_input: torch.Tensor | None = None,
    executor: Executor | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> SearchResult:
    """Search a per-layer compression policy for ``model`` under ``config.budgets``.

    Builds the :class:`ModelProblem` and runs :func:`nncompress.policy.search` (see there for
    the executor, the resumable ``out_dir`` and the progress events). ``model`` is not changed;
    apply ``result.policy`` with :func:`~nncompress.prune.prune_filters_`,
    :func:`~nncompress.prune.prune_` or :func:`~nncompress.quant.share_weights_`, then
    fine-tune.
    """
    cfg = config or SearchConfig()
    if executor is not None:
        executor.connect()  # fail on a missing Ray or a silent address before the analysis
    problem = ModelProblem.build(model, train, val, cfg, example_input=example_input)
    return search(problem, cfg, executor=executor, out_dir=out_dir, progress=progress)
