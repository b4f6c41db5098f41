"""``decompose_(model, DecomposeConfig(...))``: replace Linear/Conv layers by low-rank factors.

One model transform for every method of :mod:`nncompress.lowrank` (survey section 4):

========== ============ ==================================================================
method      layers       replacement
========== ============ ==================================================================
svd         Linear       Linear(in, r, bias=False) -> Linear(r, out)
svd         Conv2d 1x1   1x1 (C->r, no bias) -> 1x1 (r->N): the (N x C) matrix
separable   Conv2d k>1   (k_h x 1, r channels) -> (1 x k_w)          (Jaderberg 2014)
tucker2     Conv2d k>1   1x1 (C->R_in) -> k x k (R_in->R_out) -> 1x1 (Kim et al. 2016)
cp          Conv2d k>1   1x1 (C->R) -> k_h x 1 dw -> 1 x k_w dw -> 1x1 (Lebedev et al. 2015)
tt          Linear       TTLinear (tensor-train matrix)              (Novikov et al. 2015)
tt          Conv2d       TTConv2d (TT-matrix over image patches)     (Garipov et al. 2016)
========== ============ ==================================================================

Ranks are chosen per layer by exactly one rule: a fixed ``rank``; ``rank_fraction`` (the
largest rank whose factors keep at most that fraction of the layer's parameters);
``energy`` (smallest rank keeping that fraction of the squared singular values; for Tucker-2
per channel-mode unfolding); ``vbmf`` (EVBMF, Nakajima et al. 2013, as Kim et al. 2016); or a
global ``macs_budget`` / ``params_budget`` — a fraction of the targeted layers' total MACs or
parameters, met by bisection on one global energy (svd, separable, tucker2) or parameter
fraction (cp, tt) shared by all layers, so layers with fast-decaying spectra get lower ranks.
Layers where the factors would not have fewer parameters and fewer MACs than the original are
skipped and reported as such. ``per_layer`` overrides any of the rules by layer name (fnmatch
patterns allowed; first match wins).

The replaced submodules are plain ``nn.Sequential`` of ``nn.Linear``/``nn.Conv2d`` (or
:class:`~nncompress.lowrank.tt.TTLinear`), so :func:`nncompress.engine.save_checkpoint` records
them as structural replacements and :func:`nncompress.engine.load_checkpoint` rebuilds them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.convs import describe_conv
from ..core.coverage import CoverageReport, LayerOutcome
from ..core.modules import set_submodule
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector, Selectable
from ..core.validate import config_error as _err
from .allocate import response_ranks
from .config import METHODS, DecomposeConfig
from .plan import (
    Rank,
    _build,
    _choose_rank,
    _full_rank,
    _helps,
    _orig_cost,
    _padding_problem,
    _Plan,
    _record_geometry,
    _rel_error,
    _tt_modes,
    _unsupported,
)

__all__ = ["METHODS", "DecomposeConfig", "DecomposeReport", "LayerDecomposition", "decompose_"]

log = logging.getLogger(__name__)


@dataclass
class LayerDecomposition:
    """What :func:`decompose_` did to one layer (``status`` 'decomposed' or 'skipped')."""

    name: str
    type: str
    method: str
    status: str
    reason: str = ""
    rank: list[int] = field(default_factory=list)
    full_rank: list[int] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    rel_error: float | None = None
    #: a layer of a type the method takes (counted in the report's totals); ``False`` for
    #: layers reported only to say why the method cannot take them
    targeted: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecomposeReport:
    """Per-layer results and totals over the targeted layers (MACs per sample)."""

    layers: list[LayerDecomposition]
    config: dict[str, Any]
    knob: float | None = None
    budget_met: bool | None = None
    allocation: str | None = None  # budgets: 'energy' (global knob) or 'response'
    params_total: int | None = None  # the whole model's parameters before decomposing

    @property
    def coverage(self) -> CoverageReport:
        """The layers decomposed and those skipped with the reason, and the parameter share."""
        rows = [
            LayerOutcome(
                x.name,
                x.type,
                x.params_before,
                "changed" if x.status == "decomposed" else "skipped",
                f"rank {x.rank}, params {x.params_before} -> {x.params_after}"
                if x.status == "decomposed"
                else x.reason,
            )
            for x in self.layers
        ]
        total = self.params_total if self.params_total is not None else self.params_before
        return CoverageReport("decompose", rows, total)

    def _total(self, key: str) -> int | None:
        vals = [getattr(x, key) for x in self.layers if x.targeted]
        return None if any(v is None for v in vals) else int(sum(vals))

    @property
    def params_before(self) -> int:
        return self._total("params_before") or 0

    @property
    def params_after(self) -> int:
        return self._total("params_after") or 0

    @property
    def macs_before(self) -> int | None:
        return self._total("macs_before")

    @property
    def macs_after(self) -> int | None:
        return self._total("macs_after")

    @property
    def decomposed(self) -> list[str]:
        return [x.name for x in self.layers if x.status == "decomposed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "knob": self.knob,
            "budget_met": self.budget_met,
            "allocation": self.allocation,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [x.to_dict() for x in self.layers],
            "coverage": self.coverage.to_dict(),
        }


def _plan_layers(
    model: nn.Module,
    config: DecomposeConfig,
    filter: Selectable,  # noqa: A002
) -> tuple[list[_Plan], list[tuple[LayerDecomposition, _Plan]]]:
    """The layers to decompose, and those considered but skipped (with the reason)."""
    select = LayerSelector.coerce(filter)
    plans: list[_Plan] = []
    skipped: list[tuple[LayerDecomposition, _Plan]] = []
    for name, m in model.named_modules():
        if not name or not isinstance(m, nn.Linear | nn.Conv2d) or not select(name, m):
            continue
        cfg = config.for_layer(name)
        if cfg is None:
            entry = LayerDecomposition(
                name, type(m).__name__, config.method, "skipped", "per_layer skip"
            )
            skipped.append((entry, _Plan(name, m, config)))
            continue
        why = _unsupported(cfg.method, m)
        if why is not None:  # every Conv/Linear left alone is reported with the reason
            entry = LayerDecomposition(name, describe_conv(m), cfg.method, "skipped", why)
            entry.targeted = False
            skipped.append((entry, _Plan(name, m, cfg)))
            continue
        plans.append(_Plan(name, m, cfg))
    return plans, skipped


def _budget_knob(plans: list[_Plan], config: DecomposeConfig) -> tuple[float, bool]:
    """The global knob (energy or parameter fraction shared by all layers) meeting the MAC or
    parameter budget, by bisection; and whether the budget is met."""
    use_macs = config.macs_budget is not None
    fraction = config.macs_budget if use_macs else config.params_budget
    idx = 1 if use_macs else 0
    target = fraction * sum(_orig_cost(p)[idx] for p in plans)

    def total(k: float) -> int:
        tot = 0
        for p in plans:
            ok, after = _helps(p, _choose_rank(p, k))
            tot += after[idx] if ok else _orig_cost(p)[idx]
        return tot

    lo, hi = 1e-6, 1.0
    if total(hi) <= target:
        knob = hi
    else:
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(mid) <= target else (lo, mid)
        knob = lo
    budget_met = total(knob) <= target
    if not budget_met:
        log.warning("budget %.3g cannot be met even at the smallest ranks", fraction)
    return knob, budget_met


def _uses_response(plans: list[_Plan], config: DecomposeConfig) -> bool:
    methods = {p.cfg.method for p in plans}
    if config.allocate == "response":
        return True
    return config.allocate == "auto" and bool(methods) and methods <= {"svd", "separable"}


def _input_grams(
    model: nn.Module, plans: list[_Plan], calibration: Iterable | None
) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of the input of every planned Linear layer on the calibration batches
    (rows = samples x positions), float64; empty without calibration data."""
    linear = {id(p.module): p.name for p in plans if isinstance(p.module, nn.Linear)}
    if calibration is None or not linear:
        return {}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (rows, in)
        name = linear[id(mod)]
        sums[name] = sums.get(name, 0) + x.T @ x
        rows[name] = rows.get(name, 0) + x.shape[0]

    hooks = [p.module.register_forward_hook(hook) for p in plans if id(p.module) in linear]
    was_training = model.training
    model.eval()
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            for batch in calibration:
                x = batch[0] if isinstance(batch, list | tuple) else batch
                model(x.to(device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(rows[n], 1) for n in sums}


def _replace_layer(
    model: nn.Module, p: _Plan, rank: Rank | None, was_training: bool
) -> LayerDecomposition:
    """Decompose one planned layer at ``rank`` if that saves (else report why not);
    ``rank=None``: the budget allocation keeps the layer whole."""
    if rank is None:
        pb, mb = _orig_cost(p)
        return LayerDecomposition(
            p.name,
            type(p.module).__name__,
            p.cfg.method,
            "skipped",
            "kept whole by the budget allocation (its cheapest error per parameter)",
            full_rank=_full_rank(p),
            params_before=pb,
            params_after=pb,
            macs_before=mb,
            macs_after=mb,
        )
    (pb, mb), (ok, (pa, ma)) = _orig_cost(p), _helps(p, rank)
    entry = LayerDecomposition(
        name=p.name,
        type=type(p.module).__name__,
        method=p.cfg.method,
        status="decomposed" if ok else "skipped",
        rank=list(rank) if isinstance(rank, tuple | list) else [int(rank)],
        full_rank=_full_rank(p),
        params_before=pb,
        params_after=pa if ok else pb,
        macs_before=mb,
        macs_after=ma if ok else mb,
    )
    if ok:
        new = _build(p, rank)
        new.train(was_training)
        entry.rel_error = _rel_error(p.module, new, p)
        set_submodule(model, p.name, new)
        log.info("%s: %s rank %s, params %d -> %d", p.name, p.cfg.method, rank, pb, pa)
    else:
        entry.reason = f"no reduction at rank {entry.rank}: params {pb} -> {pa}" + (
            f", MACs {mb} -> {ma}" if mb is not None else ""
        )
    return entry


def decompose_(
    model: nn.Module,
    config: DecomposeConfig,
    *,
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
    input_shape: tuple[int, ...] | None = None,
    calibration: Iterable | None = None,
    progress: Progress | None = None,
) -> DecomposeReport:
    """Replace the model's Linear/Conv2d layers by low-rank factorisations, in place.

    Parameters
    ----------
    model : the network (its ``training`` flag is restored).
    config : method and rank rule, see :class:`DecomposeConfig`.
    filter : which layers to consider: a :class:`~nncompress.core.LayerSelector`, a
        ``callable(name, module) -> bool``, or layer names / fnmatch patterns; default all
        layers the method supports.
    input_shape : one sample's shape (e.g. ``(1, 28, 28)``); enables MAC counts, the relative
        output error per layer and ``macs_budget``.
    calibration : batches of inputs (tensors or ``(x, y)`` pairs) for the 'response' budget
        allocation (input statistics of each Linear layer); without them the weights' own
        spectra are used.
    progress : receives :class:`~nncompress.engine.ProgressEvent` per decomposed layer.

    Returns
    -------
    DecomposeReport
        One :class:`LayerDecomposition` per considered layer (decomposed or skipped, with the
        reason), with ranks, parameters, MACs before/after and the relative output error.
    """
    if not isinstance(config, DecomposeConfig):
        raise TypeError(f"config must be a DecomposeConfig, got {type(config).__name__}")
    if config.macs_budget is not None and input_shape is None:
        raise _err("macs_budget", config.macs_budget, "needs input_shape to count MACs")
    plans, skipped = _plan_layers(model, config, filter)
    params_total = sum(t.numel() for t in model.parameters())
    if input_shape is not None and (plans or skipped):
        _record_geometry(model, plans + [sp for _, sp in skipped], tuple(input_shape))
    for p in list(plans):  # conv subclasses rebuilt from plain convs need their padding
        why = _padding_problem(p)
        if why is not None:
            plans.remove(p)
            entry = LayerDecomposition(
                p.name, describe_conv(p.module), p.cfg.method, "skipped", why
            )
            skipped.append((entry, p))
    for p in plans:
        if p.cfg.method == "tt":
            p.tt_modes = _tt_modes(p)
    for entry, sp in skipped:
        entry.params_before = entry.params_after = _orig_cost(sp)[0]
        entry.macs_before = entry.macs_after = _orig_cost(sp)[1]

    # ---- choose ranks (a budget: response-error allocation or a global bisection) first
    knob, budget_met, allocation = None, None, None
    if config.is_budget and _uses_response(plans, config):
        use_macs = config.macs_budget is not None
        fraction = config.macs_budget if use_macs else config.params_budget
        target = fraction * sum(_orig_cost(p)[1 if use_macs else 0] for p in plans)
        grams = _input_grams(model, plans, calibration)
        ranks, budget_met = response_ranks(plans, target, use_macs, grams)
        allocation = "response"
    else:
        if config.is_budget:
            knob, budget_met = _budget_knob(plans, config)
            allocation = "energy"
        ranks = [_choose_rank(p, knob) for p in plans]

    # ---- decompose
    report: list[LayerDecomposition] = [entry for entry, _ in skipped]
    was_training = model.training
    with progress_task(progress, "decompose", len(plans)) as task:
        try:
            for p, rank in zip(plans, ranks, strict=True):
                report.append(_replace_layer(model, p, rank, was_training))
                task.advance(layer=p.name)
        finally:
            model.train(was_training)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    report.sort(key=lambda x: order.get(x.name, len(order)))
    out = DecomposeReport(report, config.to_dict(), knob, budget_met, allocation, params_total)
    out.coverage.warn()
    return out
