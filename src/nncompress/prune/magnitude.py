"""Connection (unstructured) magnitude pruning — Han et al., NIPS 2015,
"Learning both Weights and Connections for Efficient Neural Networks".

Layer 1 (tensor math):

- :func:`magnitude_threshold` — Han's per-layer threshold ``t = q * std(w)``;
- :func:`threshold_mask` — keep ``|w| > t``;
- :func:`magnitude_mask` — keep the ``n - round(s * n)`` largest ``|w|`` of one layer;
- :func:`global_masks` — the same ranking over all layers together.

Layer 3 (model transform): :func:`prune_` attaches a :class:`PruningMask` parametrization
(``torch.nn.utils.parametrize``) to each selected weight, so the effective weight is
``W * M``: pruned weights are exactly zero in the forward pass, their gradient is exactly zero
(``d(W*M)/dW = M``), and the stored original is zeroed at the pruned positions when the mask is
set, so no optimizer (SGD momentum, Adam, weight decay, L1) can move them: a zero with a zero
gradient stays zero. ``save_checkpoint`` folds the parametrization, so every saved form has the
zeros. Pruning a pruned layer again only grows its mask (new mask AND old mask).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.coverage import CoverageReport, coverage_report
from ..core.errors import ConfigError
from ..core.modules import folded_copy, own_parametrized_class_
from ..core.policy import Policy
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector, Selectable
from ..core.validate import config_error

__all__ = [
    "LayerPruning",
    "MagnitudeConfig",
    "PruningMask",
    "apply_mask_",
    "folded_copy",
    "global_masks",
    "magnitude_mask",
    "magnitude_threshold",
    "masks_from_zeros_",
    "prunable_layers",
    "prune_",
    "pruning_coverage",
    "pruning_masks",
    "remove_pruning_",
    "threshold_mask",
]

log = logging.getLogger(__name__)

# weight layers a coverage report accounts for (pruned or not)
_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)

#: what ``filter=`` accepts (a LayerSelector, a predicate, names/globs): kept for old imports
Filter = Selectable

#: module types pruned by default (names, so configs stay JSON-able)
DEFAULT_INCLUDE = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose2d": nn.ConvTranspose2d,
}


# --------------------------------------------------------------------------------------------
# Layer 1: tensor functions
# --------------------------------------------------------------------------------------------


def magnitude_threshold(w: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> float:
    """Han 2015 threshold ``t = q * std(w)``.

    ``std`` is the population standard deviation (``ddof=0``, as ``numpy.std``) over all
    entries of the layer's weight tensor — Han's "standard deviation of a layer's weights".
    With ``mask`` it is taken over the surviving entries only (``w[mask]``), which is what
    :func:`prune_` does when it re-prunes an already pruned layer (for a dense layer the two
    are identical).
    """
    if q < 0 or not math.isfinite(q):
        raise ValueError(f"q={q}: must be a finite number >= 0")
    vals = w.detach().reshape(-1)  # (n,)
    if mask is not None:
        vals = vals[mask.reshape(-1).bool()]  # (n_kept,)
    if vals.numel() == 0:
        return 0.0
    return float(q * vals.double().std(correction=0))


def threshold_mask(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask keeping the connections with ``|w| > threshold`` (shape of ``w``).

    Han 2015 removes "all connections whose weights are below a threshold"; entries exactly at
    the threshold are removed too, so a threshold of 0 removes exactly the zeros.
    """
    if threshold < 0:
        raise ValueError(f"threshold={threshold}: must be >= 0")
    return w.detach().abs() > threshold


def _check_sparsity(s: float, where: str = "") -> None:
    if not (isinstance(s, int | float) and 0.0 <= s < 1.0):
        raise config_error("sparsity", s, "must be in [0, 1)", where)


def magnitude_mask(
    w: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask keeping the ``n - round(sparsity * n)`` largest-magnitude entries of ``w``.

    Entries already pruned by ``mask`` are ranked below every surviving entry, so they stay
    pruned (the result is always a subset of ``mask``); when ``mask`` already prunes more
    than ``sparsity`` asks, it is returned unchanged. Ties are broken by position (stable).
    """
    _check_sparsity(sparsity)
    n = w.numel()
    n_keep = n - round(sparsity * n)
    score = w.detach().abs().reshape(-1).double()  # (n,)
    if mask is not None:
        score = torch.where(mask.reshape(-1).bool(), score, torch.full_like(score, -1.0))
    keep = torch.zeros(n, dtype=torch.bool, device=w.device)
    if n_keep > 0:
        order = torch.sort(score, descending=True, stable=True).indices  # (n,)
        keep[order[:n_keep]] = True
    if mask is not None:
        keep &= mask.reshape(-1).bool()
    return keep.reshape(w.shape)


def global_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks for several layers ranked together by ``|w|``: exactly ``round(sparsity * N)`` of
    the ``N`` weights of all layers are pruned (the smallest in magnitude, wherever they are).

    Entries already pruned in ``masks`` are ranked below everything (they stay pruned).
    """
    _check_sparsity(sparsity)
    names = list(weights)
    if not names:
        return {}
    flat = []
    for name in names:
        s = weights[name].detach().abs().reshape(-1).double().cpu()  # (n_l,)
        if masks is not None and name in masks:
            s = torch.where(masks[name].reshape(-1).bool().cpu(), s, torch.full_like(s, -1.0))
        flat.append(s)
    scores = torch.cat(flat)  # (N,)
    total = scores.numel()
    n_keep = total - round(sparsity * total)
    keep = torch.zeros(total, dtype=torch.bool)
    if n_keep > 0:
        keep[torch.sort(scores, descending=True, stable=True).indices[:n_keep]] = True
    out, start = {}, 0
    for name, s in zip(names, flat, strict=True):
        m = keep[start : start + s.numel()].reshape(weights[name].shape)
        if masks is not None and name in masks:
            m &= masks[name].bool().cpu()
        out[name] = m.to(weights[name].device)
        start += s.numel()
    return out


# --------------------------------------------------------------------------------------------
# Parametrization
# --------------------------------------------------------------------------------------------


class PruningMask(nn.Module):
    """Parametrization ``W -> W * M`` with a fixed boolean mask buffer ``mask`` (shape of W).

    The gradient reaching the stored weight is ``grad * M``, exactly zero where pruned.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().bool().clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)  # (same shape as w)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"kept={kept}/{self.mask.numel()}"


def _mask_module(module: nn.Module, pname: str = "weight") -> PruningMask | None:
    if not parametrize.is_parametrized(module, pname):
        return None
    for p in module.parametrizations[pname]:
        if isinstance(p, PruningMask):
            return p
    return None


def apply_mask_(module: nn.Module, mask: torch.Tensor, pname: str = "weight") -> PruningMask:
    """Attach (or tighten) the pruning mask of ``module.<pname>``; returns the parametrization.

    If the weight is already masked the new mask is ``old AND mask`` (masks only grow). The
    stored weight is zeroed at the pruned positions so optimizers cannot revive them.
    """
    w = getattr(module, pname)
    if mask.shape != w.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match {pname} shape {tuple(w.shape)}"
        )
    mask = mask.to(device=w.device, dtype=torch.bool)
    existing = _mask_module(module, pname)
    if existing is None:
        if parametrize.is_parametrized(module, pname):
            log.warning(
                "%s already has parametrizations; the pruning mask is applied after them",
                type(module).__name__,
            )
        parametrize.register_parametrization(module, pname, PruningMask(mask), unsafe=True)
        existing = _mask_module(module, pname)
        assert existing is not None
    else:
        existing.mask &= mask
    plist = module.parametrizations[pname]
    if plist[0] is existing:
        with torch.no_grad():
            plist.original.mul_(existing.mask.to(plist.original.dtype))
    return existing


def pruning_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module_name: bool mask}`` of every masked weight in ``model``."""
    out = {}
    for name, m in model.named_modules():
        pm = _mask_module(m)
        if pm is not None:
            out[name] = pm.mask
    return out


def remove_pruning_(model: nn.Module) -> int:
    """Fold every :class:`PruningMask` into its weight (the zeros stay); returns how many.

    Other parametrizations on the same weight are kept.
    """
    count = 0
    for _, m in list(model.named_modules()):
        pm = _mask_module(m)
        if pm is None:
            continue
        own_parametrized_class_(m)  # do not break copies sharing its class
        plist = m.parametrizations["weight"]
        with torch.no_grad():
            if plist[0] is pm:
                plist.original.mul_(pm.mask.to(plist.original.dtype))
        if len(plist) == 1:
            # the original is already masked: removing without re-evaluating keeps it exact
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        else:
            idx = [i for i, p in enumerate(plist) if p is pm][0]
            del plist[idx]
        count += 1
    return count


# --------------------------------------------------------------------------------------------
# Layer 3: config and model transform
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnitudeConfig:
    """How :func:`prune_` chooses connections to remove (Han 2015).

    Exactly one of ``q`` (threshold ``q * std`` of each layer's surviving weights) or
    ``sparsity`` (fraction of each layer's weights removed, or of all selected weights with
    ``scope='global'``) must be given.

    Attributes
    ----------
    q : quality parameter of Han's threshold (>= 0); layer scope only.
    sparsity : target fraction of pruned weights, in [0, 1).
    scope : 'layer' (each layer separately) or 'global' (all selected layers ranked together).
    per_layer : overrides by module name. A number is read in the config's own mode (a q if
        ``q`` is set, else a sparsity); a mapping ``{"q": x}`` or ``{"sparsity": x}`` says which.
        Layers with overrides are pruned on their own, outside the global ranking.
    include : module type names that are pruned (default Linear and Conv).
    exclude : module names (fnmatch patterns allowed, e.g. ``"fc3"`` or ``"layer1.*"``) to skip.
    """

    q: float | None = None
    sparsity: float | None = None
    scope: str = "layer"
    per_layer: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.q is None) == (self.sparsity is None):
            raise ConfigError(
                f"q={self.q!r}, sparsity={self.sparsity!r}: give exactly one of q or sparsity"
            )
        if self.q is not None and not (
            isinstance(self.q, int | float) and math.isfinite(self.q) and self.q >= 0
        ):
            raise ConfigError(f"q={self.q!r}: must be a finite number >= 0")
        if self.sparsity is not None:
            _check_sparsity(self.sparsity)
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope={self.scope!r}: must be 'layer' or 'global'")
        if self.scope == "global" and self.q is not None:
            raise ConfigError("scope='global' ranks by a target sparsity: give sparsity, not q")
        if not isinstance(self.per_layer, Mapping):
            raise ConfigError(f"per_layer={self.per_layer!r}: must be a mapping name -> value")
        object.__setattr__(self, "per_layer", dict(self.per_layer))
        for name in self.per_layer:
            self.layer_rule(name)  # validates
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        bad = [t for t in self.include if t not in _TYPES]
        if bad:
            raise ConfigError(
                f"include={list(self.include)!r}: unknown types {bad}; allowed: {sorted(_TYPES)}"
            )

    @property
    def default_rule(self) -> tuple[str, float]:
        """The rule of layers without an override: ``('q', q)`` or ``('sparsity', s)``."""
        return ("q", self.q) if self.q is not None else ("sparsity", self.sparsity)

    def layer_rule(self, name: str) -> tuple[str, float] | None:
        """``('q', x)`` or ``('sparsity', x)`` for an overridden layer, else ``None``."""
        if name not in self.per_layer:
            return None
        v = self.per_layer[name]
        if isinstance(v, Mapping):
            if len(v) != 1 or next(iter(v)) not in ("q", "sparsity"):
                raise ConfigError(
                    f"per_layer[{name!r}]={v!r}: must be a number or {{'q': x}} / {{'sparsity': x}}"
                )
            kind, val = next(iter(v.items()))
        else:
            kind, val = ("q" if self.q is not None else "sparsity"), v
        if kind == "sparsity":
            _check_sparsity(val, name)
        elif not (isinstance(val, int | float) and math.isfinite(val) and val >= 0):
            raise config_error("q", val, "must be a finite number >= 0", name)
        return kind, float(val)

    @property
    def selector(self) -> LayerSelector:
        """The layers this config prunes (``include`` types, minus ``exclude`` names)."""
        return layer_selector(self.include, self.exclude)

    @classmethod
    def from_policy(cls, policy: Policy) -> MagnitudeConfig:
        """One sparsity per layer a :class:`~nncompress.core.Policy` names (a searched policy)."""
        if not policy.sparsity:
            raise ConfigError("policy.sparsity is empty: this policy prunes no connections")
        per = {k: {"sparsity": v} for k, v in policy.sparsity.items()}
        return cls(sparsity=0.0, per_layer=per)

    def to_dict(self) -> dict[str, Any]:
        return {
            "q": self.q,
            "sparsity": self.sparsity,
            "scope": self.scope,
            "per_layer": dict(self.per_layer),
            "include": list(self.include),
            "exclude": list(self.exclude),
        }


@dataclass
class LayerPruning:
    """Per-layer result of :func:`prune_`: ``kept`` of ``params`` weights survive; ``threshold``
    is the magnitude cut (``q * std`` in q mode, else the smallest kept ``|w|``)."""

    name: str
    params: int
    kept: int
    threshold: float
    rule: str

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.params if self.params else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "kept": self.kept,
            "kept_fraction": self.kept_fraction,
            "threshold": self.threshold,
            "rule": self.rule,
        }


def layer_selector(
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = (),
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
) -> LayerSelector:
    """The :class:`~nncompress.core.LayerSelector` of the prunable types ``include``, minus the
    ``exclude`` names/globs, and ``filter``."""
    return LayerSelector(types=tuple(_TYPES[t] for t in include), exclude=tuple(exclude)) & filter


def prunable_layers(
    model: nn.Module,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = (),
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
) -> dict[str, nn.Module]:
    """Modules whose ``weight`` would be pruned: type in ``include``, name not matching any
    ``exclude`` pattern, and selected by ``filter`` (see :class:`~nncompress.core.LayerSelector`)."""
    chosen = layer_selector(include, exclude, filter).select(model)
    return {n: m for n, m in chosen.items() if getattr(m, "weight", None) is not None}


def _smallest_kept(w: torch.Tensor, mask: torch.Tensor) -> float:
    kept = w.detach().abs()[mask]
    return float(kept.min()) if kept.numel() else math.inf


def _prune_layer(
    m: nn.Module, name: str, rule: tuple[str, float], old: torch.Tensor | None
) -> LayerPruning:
    """Prune one layer by its own rule: ``('q', q)`` or ``('sparsity', s)``."""
    kind, val = rule
    w = m.weight  # effective (already masked) weight
    if kind == "q":
        t = magnitude_threshold(w, val, old)
        mask = threshold_mask(w, t)
        if old is not None:
            mask &= old
    else:
        mask = magnitude_mask(w, val, old)
        t = _smallest_kept(w, mask)
    apply_mask_(m, mask)
    return LayerPruning(name, w.numel(), int(mask.sum()), t, f"{kind}={val:g}")


def _prune_global(
    layers: dict[str, nn.Module],
    names: list[str],
    sparsity: float,
    old_masks: dict[str, torch.Tensor],
    report: dict[str, LayerPruning],
) -> None:
    """Prune ``names`` together: one magnitude ranking over all their weights."""
    weights = {n: layers[n].weight for n in names}
    masks = global_masks(weights, sparsity, {n: old_masks[n] for n in names if n in old_masks})
    cut = min((_smallest_kept(weights[n], masks[n]) for n in names), default=0.0)
    for n in names:
        apply_mask_(layers[n], masks[n])
        report[n] = LayerPruning(
            n, weights[n].numel(), int(masks[n].sum()), cut, f"global sparsity={sparsity:g}"
        )


def prune_(
    model: nn.Module,
    config: MagnitudeConfig | Policy,
    *,
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
    progress: Progress | None = None,
) -> dict[str, LayerPruning]:
    """Prune ``model`` in place by weight magnitude (Han 2015) and return a per-layer report.

    ``config`` may also be a :class:`~nncompress.core.Policy` (e.g. from a policy search): its
    per-layer sparsities are applied to the layers it names, the others are left alone.

    Each selected layer gets (or tightens) a :class:`PruningMask`. In q mode the threshold is
    ``q * std`` of the layer's surviving weights (:func:`magnitude_threshold`); in sparsity mode
    exactly ``round(s * n)`` weights of the layer (or of all layers, ``scope='global'``) are
    pruned, counting those already pruned.
    """
    if isinstance(config, Policy):
        config = MagnitudeConfig.from_policy(config)
        filter = LayerSelector(names=sorted(config.per_layer)) & filter
    layers = prunable_layers(model, config.include, config.exclude, filter)
    unknown = sorted(set(config.per_layer) - set(layers))
    if unknown:
        raise ConfigError(
            f"per_layer names {unknown} are not prunable layers of the model; "
            f"prunable: {sorted(layers)}"
        )
    if not layers:
        log.warning(
            "prune_: no layer matched include=%s exclude=%s", config.include, config.exclude
        )
    report: dict[str, LayerPruning] = {}
    old_masks = pruning_masks(model)
    global_names = []
    with progress_task(progress, "prune", len(layers)) as task:
        for i, (name, m) in enumerate(layers.items()):
            rule = config.layer_rule(name)
            if rule is None and config.scope == "global":
                global_names.append(name)
                continue
            report[name] = _prune_layer(m, name, rule or config.default_rule, old_masks.get(name))
            task.advance(i + 1)
        if global_names:
            _prune_global(layers, global_names, config.sparsity, old_masks, report)
    report = PruneReport({n: report[n] for n in layers})
    report.coverage = _prune_coverage(model, config, layers, report)
    report.coverage.warn()
    log.info(
        "pruned %d layers: %s",
        len(report),
        {n: round(r.kept_fraction, 4) for n, r in report.items()},
    )
    return report


def pruning_coverage(model: nn.Module) -> CoverageReport:
    """The weight layers carrying a pruning mask with zeros (changed) and the others (skipped:
    not pruned), e.g. after :func:`~nncompress.prune.iterative_prune_` or AGP."""
    masks = pruning_masks(model)
    changed = {
        n: f"{100 * (1 - float(m.float().mean())):.1f}% pruned"
        for n, m in masks.items()
        if bool((m == 0).any())
    }
    skipped = {
        n: "not pruned (not selected, or no weight below its threshold)"
        for n, m in model.named_modules()
        if n and isinstance(m, _WEIGHT_LAYERS) and n not in changed
    }
    return coverage_report("prune", model, changed, skipped)


class PruneReport(dict):
    """``{layer: LayerPruning}`` as :func:`prune_` always returned, plus ``coverage``: the
    layers pruned and the weight layers left alone with the reason."""

    coverage: CoverageReport | None = None


def _prune_coverage(
    model: nn.Module,
    config: MagnitudeConfig,
    layers: Mapping[str, nn.Module],
    report: Mapping[str, LayerPruning],
) -> CoverageReport:
    changed = {n: f"{100 * (1 - r.kept_fraction):.1f}% pruned" for n, r in report.items()}
    skipped = {}
    for name, m in model.named_modules():
        if name in layers or not name or not isinstance(m, _WEIGHT_LAYERS):
            continue
        skipped[name] = (
            f"not selected (include={list(config.include)}, exclude={list(config.exclude)}, "
            "or the layer filter)"
        )
    for n, r in report.items():
        if r.kept == r.params:
            changed.pop(n)
            skipped[n] = "selected, but no weight fell below its threshold"
    return coverage_report("prune", model, changed, skipped)


def masks_from_zeros_(
    model: nn.Module,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = (),
    filter: Selectable = None,  # noqa: A002
) -> dict[str, int]:
    """Re-create masks from exact zeros (e.g. after loading a pruned checkpoint, or when a
    recipe resumes): every selected layer with at least one zero weight gets ``mask = w != 0``.
    Returns ``{name: kept}`` of the layers masked."""
    out = {}
    for name, m in prunable_layers(model, include, exclude, filter).items():
        w = m.weight.detach()
        nz = w != 0
        if bool(nz.all()):
            continue
        apply_mask_(m, nz)
        out[name] = int(nz.sum())
    return out
