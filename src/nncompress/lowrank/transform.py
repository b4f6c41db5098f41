"""``decompose_(model, DecomposeConfig(...))``: replace Linear/Conv layers by low-rank factors.

One model transform for every method of :mod:`nncompress.lowrank` (survey section 4):

========== ============ ==================================================================
method      layers       replacement
========== ============ ==================================================================
svd         Linear       Linear(in, r, bias=False) -> Linear(r, out)
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
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import set_submodule
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector, Selectable, name_matches
from ..core.validate import config_error as _err
from .cp import cp_conv, cp_cost
from .rank import evbmf, rank_for_energy
from .separable import separable_conv, separable_cost, separable_full_rank, separable_matrix
from .svd import svd_linear, svd_linear_cost
from .tt import factorize, tt_conv, tt_cost, tt_full_ranks, tt_linear
from .tucker import tucker2_conv, tucker2_cost, tucker2_vbmf_ranks

__all__ = ["METHODS", "DecomposeConfig", "DecomposeReport", "LayerDecomposition", "decompose_"]

log = logging.getLogger(__name__)

METHODS = ("svd", "separable", "tucker2", "cp", "tt")
_SPECTRAL = ("svd", "separable", "tucker2")  # methods with singular values (energy, vbmf)
_CHOICES = ("rank", "rank_fraction", "energy", "vbmf", "macs_budget", "params_budget")
_LAYER_KEYS = (
    "method",
    "rank",
    "rank_fraction",
    "energy",
    "vbmf",
    "min_rank",
    "tt_cores",
    "tt_in_modes",
    "tt_out_modes",
    "skip",
)

Rank = int | tuple[int, int] | list[int]


@dataclass(frozen=True)
class DecomposeConfig:
    """What to decompose and how to choose ranks (frozen; JSON/YAML-serialisable).

    Exactly one of ``rank``, ``rank_fraction``, ``energy``, ``vbmf``, ``macs_budget``,
    ``params_budget`` must be set.

    Attributes
    ----------
    method : 'svd' | 'separable' | 'tucker2' | 'cp' | 'tt'.
    rank : fixed rank (Tucker-2: both channel ranks; TT: every internal TT rank), clamped to the
        exact (full) rank.
    rank_fraction : in (0, 1]: largest rank whose factors keep at most this fraction of each
        layer's parameters.
    energy : in (0, 1]: fraction of squared singular values kept (svd, separable, tucker2).
    vbmf : ranks by empirical variational Bayesian matrix factorisation (svd, separable,
        tucker2).
    macs_budget, params_budget : in (0, 1]: the decomposed layers together keep at most this
        fraction of their original MACs (needs ``input_shape``) / parameters.
    min_rank : lower bound on every chosen rank.
    per_layer : ``{name or fnmatch pattern: {key: value}}`` overriding ``method``, the rank rule
        (``rank``/``rank_fraction``/``energy``/``vbmf``), ``min_rank``, ``tt_*``, or
        ``skip: true``.
    tt_cores : number ``d`` of TT cores when the factorisations are chosen automatically (for
        a convolution the first core is the spatial one: ``k_h k_w`` in, 1 out).
    tt_in_modes, tt_out_modes : explicit factorisations of in/out features (usually given per
        layer).
    cp_iters : ALS iterations of the CP decomposition.
    require_fewer_macs : skip layers whose factors would need more MACs than the original even
        if they have fewer parameters (set False for 'tt', which trades MACs for parameters).
    seed : random seed (CP initialisation when the rank exceeds a mode size).
    """

    method: str = "svd"
    rank: int | None = None
    rank_fraction: float | None = None
    energy: float | None = None
    vbmf: bool = False
    macs_budget: float | None = None
    params_budget: float | None = None
    min_rank: int = 1
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    tt_cores: int = 3
    tt_in_modes: tuple[int, ...] | None = None
    tt_out_modes: tuple[int, ...] | None = None
    cp_iters: int = 100
    require_fewer_macs: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tt_in_modes", "tt_out_modes"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(int(x) for x in v))
        if not isinstance(self.per_layer, dict):
            raise _err("per_layer", self.per_layer, "must be a mapping {layer: {key: value}}")
        self._validate("")
        for pattern, over in self.per_layer.items():
            if not isinstance(over, dict):
                raise _err("per_layer", over, "each override must be a mapping", pattern)
            bad = sorted(set(over) - set(_LAYER_KEYS))
            if bad:
                raise ConfigError(
                    f"per_layer[{pattern!r}]: unknown key(s) {bad}; allowed: {list(_LAYER_KEYS)}"
                )
            if not over.get("skip", False):
                self._layer_config(over, pattern)._validate(pattern)

    def _validate(self, where: str) -> None:
        if self.method not in METHODS:
            raise _err("method", self.method, f"must be one of {list(METHODS)}", where)
        chosen = [
            c for c in _CHOICES if (getattr(self, c) is not None and getattr(self, c) is not False)
        ]
        if len(chosen) != 1:
            raise ConfigError(
                f"{'layer ' + repr(where) + ': ' if where else ''}exactly one of {list(_CHOICES)} "
                f"must be set, got {chosen or 'none'}"
            )
        if self.rank is not None and (
            not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1
        ):
            raise _err("rank", self.rank, "must be an integer >= 1", where)
        for name in ("rank_fraction", "energy", "macs_budget", "params_budget"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and 0.0 < v <= 1.0):
                raise _err(name, v, "must be in (0, 1]", where)
        if not isinstance(self.vbmf, bool):
            raise _err("vbmf", self.vbmf, "must be true or false", where)
        if (self.energy is not None or self.vbmf) and self.method not in _SPECTRAL:
            rule = "energy" if self.energy is not None else "vbmf"
            raise _err(
                rule,
                getattr(self, rule),
                f"needs singular values: only for methods {list(_SPECTRAL)}, not "
                f"'{self.method}' (use rank or rank_fraction)",
                where,
            )
        if not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise _err("min_rank", self.min_rank, "must be an integer >= 1", where)
        if not isinstance(self.tt_cores, int) or self.tt_cores < 2:
            raise _err("tt_cores", self.tt_cores, "must be an integer >= 2", where)
        if not isinstance(self.cp_iters, int) or self.cp_iters < 1:
            raise _err("cp_iters", self.cp_iters, "must be an integer >= 1", where)
        for name in ("tt_in_modes", "tt_out_modes"):
            v = getattr(self, name)
            if v is not None and (len(v) < 1 or min(v) < 1):
                raise _err(name, list(v), "must be a non-empty list of integers >= 1", where)
        if (self.tt_in_modes is None) != (self.tt_out_modes is None) or (
            self.tt_in_modes is not None and len(self.tt_in_modes) != len(self.tt_out_modes)
        ):
            raise _err(
                "tt_in_modes/tt_out_modes",
                (self.tt_in_modes, self.tt_out_modes),
                "give both, with the same number of factors",
                where,
            )

    def _layer_config(self, over: dict[str, Any], where: str) -> DecomposeConfig:
        over = {k: v for k, v in over.items() if k != "skip"}
        if any(k in over for k in _CHOICES):
            base = {c: (False if c == "vbmf" else None) for c in _CHOICES}
            if "macs_budget" in over or "params_budget" in over:
                raise ConfigError(
                    f"per_layer[{where!r}]: budgets are global; give rank, rank_fraction, "
                    "energy or vbmf per layer"
                )
        else:
            base = {}
        try:
            return replace(self, per_layer={}, **{**base, **over})
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"per_layer[{where!r}]: {exc}") from None

    def for_layer(self, name: str) -> DecomposeConfig | None:
        """The config that applies to layer ``name`` (``None`` when it is marked ``skip``)."""
        for pattern, over in self.per_layer.items():
            if name_matches(name, pattern):
                return None if over.get("skip", False) else self._layer_config(over, pattern)
        return self

    @property
    def is_budget(self) -> bool:
        return self.macs_budget is not None or self.params_budget is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("tt_in_modes", "tt_out_modes"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposeConfig:
        from ..engine.config import config_from_dict

        return config_from_dict(cls, data)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecomposeReport:
    """Per-layer results and totals over the targeted layers (MACs per sample)."""

    layers: list[LayerDecomposition]
    config: dict[str, Any]
    knob: float | None = None
    budget_met: bool | None = None

    def _total(self, key: str) -> int | None:
        vals = [getattr(x, key) for x in self.layers]
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
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "layers": [x.to_dict() for x in self.layers],
        }


# --------------------------------------------------------------------------- per-layer plans


@dataclass
class _Plan:
    name: str
    module: nn.Module
    cfg: DecomposeConfig
    in_shape: tuple[int, ...] | None = None  # one sample's input to the layer
    in_hw: tuple[int, int] | None = None
    out_hw: tuple[int, int] | None = None
    positions: int | None = None  # Linear: output rows per sample
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    tt_modes: tuple[list[int], list[int]] | None = None


def _unsupported(method: str, m: nn.Module) -> str | None:
    """Why ``method`` cannot decompose ``m`` (``None`` if it can)."""
    if method == "svd" or (method == "tt" and not isinstance(m, nn.Conv2d)):
        return None if isinstance(m, nn.Linear) else "not a Linear layer"
    if not isinstance(m, nn.Conv2d):
        return "not a Conv2d layer"
    if method == "tt":
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups})"
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return "string padding or non-zero padding mode"
        return None
    if m.groups != 1:
        return f"grouped convolution (groups={m.groups})"
    if tuple(m.kernel_size) == (1, 1):
        return "1x1 kernel (use svd on it as a matrix)"
    if method in ("separable", "cp") and (isinstance(m.padding, str) or m.padding_mode != "zeros"):
        return "string padding or non-zero padding mode"
    if method == "separable" and min(m.kernel_size) == 1:
        return "kernel already 1-D"
    return None


def _full_rank(p: _Plan) -> list[int]:
    m, method = p.module, p.cfg.method
    if method == "svd":
        return [min(m.weight.shape)]
    if method == "separable":
        return [separable_full_rank(m)]
    if method == "tucker2":
        return [m.weight.shape[0], m.weight.shape[1]]
    if method == "cp":
        # generic upper bound on the CP rank: product of all mode sizes but the largest
        return [math.prod(m.weight.shape) // max(m.weight.shape)]
    return tt_full_ranks(*p.tt_modes)


def _orig_cost(p: _Plan) -> tuple[int, int | None]:
    m = p.module
    params = sum(t.numel() for t in (m.weight, m.bias) if t is not None)
    if isinstance(m, nn.Linear):
        return params, None if p.positions is None else p.positions * m.weight.numel()
    if p.out_hw is None:
        return params, None
    return params, p.out_hw[0] * p.out_hw[1] * m.weight.numel()


def _cost(p: _Plan, rank: Rank) -> tuple[int, int | None]:
    m, method = p.module, p.cfg.method
    if method == "svd":
        params = svd_linear_cost(m.in_features, m.out_features, rank, m.bias is not None)
        return params, None if p.positions is None else p.positions * rank * (
            m.in_features + m.out_features
        )
    if method == "separable":
        return separable_cost(m, rank, p.in_hw, p.out_hw)
    if method == "tucker2":
        return tucker2_cost(m, rank, p.in_hw, p.out_hw)
    if method == "cp":
        return cp_cost(m, rank, p.in_hw, p.out_hw)
    positions = p.positions
    if isinstance(m, nn.Conv2d):
        positions = None if p.out_hw is None else p.out_hw[0] * p.out_hw[1]
    return tt_cost(*p.tt_modes, rank, m.bias is not None, positions)


def _clamp(p: _Plan, rank: Rank) -> Rank:
    full, lo = _full_rank(p), p.cfg.min_rank
    if p.cfg.method == "tucker2":
        return (min(max(rank[0], lo), full[0]), min(max(rank[1], lo), full[1]))
    if p.cfg.method == "tt":
        return [min(max(r, lo), f) for r, f in zip(rank, full, strict=True)]
    return min(max(rank, lo), full[0]) if p.cfg.method != "cp" else max(rank, lo)


def _ladder(p: _Plan) -> list[Rank]:
    """Candidate ranks in increasing cost order (for fractions and budgets)."""
    method, full = p.cfg.method, _full_rank(p)
    if method in ("svd", "separable"):
        return list(range(1, full[0] + 1))
    if method == "cp":
        n, c, kh, kw = p.module.weight.shape
        top = max(1, (n * c * kh * kw) // (n + c + kh + kw) + 1)  # beyond this: no saving
        return list(range(1, top + 1))
    if method == "tucker2":
        steps = max(full)
        return [
            (max(1, round(k * full[0] / steps)), max(1, round(k * full[1] / steps)))
            for k in range(1, steps + 1)
        ]
    steps = max(full) if full else 1
    return [[max(1, min(f, k)) for f in full] for k in range(1, steps + 1)]


def _spectrum(p: _Plan, key: str) -> torch.Tensor:
    if key not in p.spectra:
        w = p.module.weight.detach().double()
        if key == "matrix":
            mat = w if p.cfg.method == "svd" else separable_matrix(w)
            p.spectra[key] = torch.linalg.svdvals(mat)
        else:  # tucker2 unfoldings
            mode = 0 if key == "mode0" else 1
            p.spectra[key] = torch.linalg.svdvals(w.movedim(mode, 0).reshape(w.shape[mode], -1))
    return p.spectra[key]


def _rank_for_energy(p: _Plan, energy: float) -> Rank:
    if p.cfg.method == "tucker2":
        return (
            rank_for_energy(_spectrum(p, "mode0"), energy),
            rank_for_energy(_spectrum(p, "mode1"), energy),
        )
    return rank_for_energy(_spectrum(p, "matrix"), energy)


def _rank_for_fraction(p: _Plan, fraction: float) -> Rank:
    budget = fraction * _orig_cost(p)[0]
    ladder = _ladder(p)
    best = ladder[0]
    for r in ladder:
        if _cost(p, r)[0] <= budget:
            best = r
        else:
            break
    return best


def _choose_rank(p: _Plan, knob: float | None = None) -> Rank:
    cfg = p.cfg
    if cfg.rank is not None:
        r = cfg.rank
        rank: Rank = (
            (r, r)
            if cfg.method == "tucker2"
            else [r] * len(_full_rank(p))
            if (cfg.method == "tt")
            else r
        )
    elif cfg.rank_fraction is not None:
        rank = _rank_for_fraction(p, cfg.rank_fraction)
    elif cfg.energy is not None:
        rank = _rank_for_energy(p, cfg.energy)
    elif cfg.vbmf:
        if cfg.method == "tucker2":
            rank = tucker2_vbmf_ranks(p.module.weight)
        else:
            w = p.module.weight.detach()
            rank = evbmf(w if cfg.method == "svd" else separable_matrix(w)).rank
    else:  # budget: global knob
        assert knob is not None
        rank = _rank_for_energy(p, knob) if cfg.method in _SPECTRAL else _rank_for_fraction(p, knob)
    return _clamp(p, rank)


def _helps(p: _Plan, rank: Rank) -> tuple[bool, tuple[int, int | None]]:
    before, after = _orig_cost(p), _cost(p, rank)
    ok = after[0] < before[0] and (
        not p.cfg.require_fewer_macs
        or after[1] is None
        or before[1] is None
        or after[1] < before[1]
    )
    return ok, after


def _build(p: _Plan, rank: Rank) -> nn.Module:
    m, cfg = p.module, p.cfg
    if cfg.method == "svd":
        return svd_linear(m, rank)
    if cfg.method == "separable":
        return separable_conv(m, rank)
    if cfg.method == "tucker2":
        return tucker2_conv(m, rank)
    if cfg.method == "cp":
        return cp_conv(m, rank, n_iter_max=cfg.cp_iters, seed=cfg.seed)
    if isinstance(m, nn.Conv2d):
        return tt_conv(m, *p.tt_modes, rank)
    return tt_linear(m, *p.tt_modes, rank)


def _record_geometry(model: nn.Module, plans: list[_Plan], input_shape: tuple[int, ...]) -> None:
    by_module = {id(p.module): p for p in plans}
    hooks = []

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        p = by_module[id(mod)]
        x = inputs[0]
        p.in_shape = tuple(x.shape[1:])
        if isinstance(mod, nn.Conv2d):
            p.in_hw, p.out_hw = tuple(x.shape[-2:]), tuple(output.shape[-2:])
        else:
            p.positions = output.numel() // output.shape[-1]

    for p in plans:
        hooks.append(p.module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def _tt_modes(p: _Plan) -> tuple[list[int], list[int]]:
    """TT modes of the layer's (in x out) matrix; for a conv, in = k_h k_w C (patches)."""
    cfg, m = p.cfg, p.module
    conv = isinstance(m, nn.Conv2d)
    n_in = m.weight[0].numel() if conv else m.in_features
    n_out = m.out_channels if conv else m.out_features
    if cfg.tt_in_modes is not None:
        ins, outs = list(cfg.tt_in_modes), list(cfg.tt_out_modes)
        if math.prod(ins) != n_in or math.prod(outs) != n_out:
            what = "k_h * k_w * in_channels" if conv else "in_features"
            raise _err(
                "tt_in_modes/tt_out_modes",
                (ins, outs),
                f"products must equal {what}={n_in} and out={n_out}",
                p.name,
            )
        return ins, outs
    if conv:  # the spatial mode k_h k_w (output mode 1) first, as Garipov et al. 2016
        spatial = m.kernel_size[0] * m.kernel_size[1]
        ins = [spatial, *factorize(m.in_channels, cfg.tt_cores - 1)]
        return ins, [1, *factorize(n_out, cfg.tt_cores - 1)]
    return factorize(n_in, cfg.tt_cores), factorize(n_out, cfg.tt_cores)


def _rel_error(old: nn.Module, new: nn.Module, p: _Plan) -> float | None:
    """Relative output error ``||new(x) - old(x)|| / ||old(x) - bias||`` on a random probe."""
    shape = p.in_shape or ((old.in_features,) if isinstance(old, nn.Linear) else None)
    if shape is None:
        return None
    w = old.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float32).to(w.device, w.dtype)
    with torch.no_grad():
        ref, got = old(x), new(x)
        if old.bias is not None:
            shape_b = (-1,) + (1,) * (ref.dim() - 2) if isinstance(old, nn.Conv2d) else (-1,)
            signal = ref - old.bias.reshape(shape_b)
        else:
            signal = ref
        return float((got - ref).norm() / signal.norm().clamp_min(1e-30))


def _replace_layer(
    model: nn.Module, p: _Plan, rank: Rank, was_training: bool
) -> LayerDecomposition:
    """Decompose one planned layer at ``rank`` if that saves (else report why not)."""
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
        if why is not None:
            family = {"svd": nn.Linear, "tt": (nn.Linear, nn.Conv2d)}.get(cfg.method, nn.Conv2d)
            if isinstance(m, family) or filter is not None or cfg is not config:
                entry = LayerDecomposition(name, type(m).__name__, cfg.method, "skipped", why)
                skipped.append((entry, _Plan(name, m, cfg)))
            continue
        plans.append(_Plan(name, m, cfg))
    if input_shape is not None and (plans or skipped):
        _record_geometry(model, plans + [sp for _, sp in skipped], tuple(input_shape))
    for p in plans:
        if p.cfg.method == "tt":
            p.tt_modes = _tt_modes(p)
    for entry, sp in skipped:
        entry.params_before = entry.params_after = _orig_cost(sp)[0]
        entry.macs_before = entry.macs_after = _orig_cost(sp)[1]

    # ---- choose ranks (a global bisection for budgets) before any decomposition work
    knob, budget_met = None, None
    if config.is_budget:
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
    return DecomposeReport(report, config.to_dict(), knob, budget_met)
