"""Entropy-constrained scalar quantization (ECSQ) of the surviving weights, with optional
rate-distortion pruning and per-weight importance (a diagonal Fisher on the held-out split).

Chou, Lookabaugh & Gray 1989 ("Entropy-constrained vector quantization"): instead of the
nearest centroid (k-means, Deep Compression), each weight takes the centroid that minimises
distortion *plus* ``lambda`` times the code length of that centroid,

    l_i = argmin_j  a_i (w_i - c_j)**2 + lambda * L_j,     L_j = -log2 p_j,

and the Lloyd-like update alternates this assignment with ``c_j`` = the ``a``-weighted mean of
its weights and ``p_j`` = its share of the weights. Frequent centroids get cheaper, rare ones
dearer (some empty out: the codebook shrinks by itself), so the code histogram gets skewed and
its entropy, which the entropy coder spends, drops for a controlled distortion.
``lambda = 0`` is weighted k-means.

*Importance.* With ``a_i`` = the diagonal of the empirical Fisher information
``E[(dL/dw_i)**2]`` (:func:`fisher_importance`, on held-out batches), the distortion
``sum_i a_i delta_i**2`` approximates twice the loss increase (second-order Taylor, as in
Optimal Brain Damage, LeCun et al. 1990) and ``lambda`` is in loss units per bit, comparable
across layers. Without it (``a_i = 1``), ``lambda`` is taken relative to the layer's mean
squared weight so one value fits layers of any scale.

*Rate-distortion pruning.* With ``prune=True`` zero is an extra, fixed centroid whose code
length is the cost of a zero in the significance map, ``-log2(1 - d)`` for the layer's
density ``d``, while a nonzero centroid costs ``-log2 d - log2 p_j``: a weight is dropped when
the bits it saves outweigh ``a_i w_i**2 / lambda``.

Three API layers, like :mod:`nncompress.quant.kmeans`: :func:`ecsq_1d` (tensor function),
:class:`ECSQuantizer` (estimator), :func:`ecsq_share_` (model transform installing the same
:class:`~nncompress.quant.kmeans.SharedWeight` parametrization as Deep Compression's sharing, so
centroid fine-tuning and the encoder work unchanged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError
from ..core.select import Selectable
from .kmeans import (
    INITS,
    LayerShareReport,
    ShareReport,
    _candidates,
    _init_centroids,
    _install,
    shared_layers,
)

__all__ = [
    "ECSQConfig",
    "ECSQuantizer",
    "ecsq_1d",
    "ecsq_share_",
    "fisher_importance",
    "rate_bits",
]

log = logging.getLogger(__name__)

IMPORTANCES = ("none", "fisher")
_CHUNK = 1 << 16  # weights per assignment block: (chunk, k) distance matrices


def rate_bits(labels: np.ndarray, k: int) -> float:
    """Empirical entropy in bits of the labels in ``[0, k)`` (the entropy coder's cost)."""
    c = np.bincount(labels, minlength=k).astype(np.float64)
    c = c[c > 0]
    n = c.sum()
    return float(-(c * np.log2(c / n)).sum()) if n else 0.0


def _assign(
    x: np.ndarray, a: np.ndarray, c: np.ndarray, cost: np.ndarray, lam: float
) -> np.ndarray:
    """argmin_j a_i (x_i - c_j)**2 + lam * cost_j, block by block. ``cost`` inf = unusable."""
    out = np.empty(x.size, dtype=np.int64)
    for s in range(0, x.size, _CHUNK):
        xs, as_ = x[s : s + _CHUNK, None], a[s : s + _CHUNK, None]
        obj = as_ * (xs - c[None, :]) ** 2 + lam * cost[None, :]  # (chunk, k)
        out[s : s + _CHUNK] = np.argmin(obj, axis=1)
    return out


def ecsq_1d(
    w: torch.Tensor | np.ndarray,
    k: int,
    lam: float,
    *,
    importance: torch.Tensor | np.ndarray | None = None,
    prune: bool = False,
    density: float = 1.0,
    init: str = "linear",
    max_iter: int = 100,
    random_state: int | None = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Entropy-constrained scalar quantization of the values of ``w`` (Chou et al. 1989).

    Minimises ``sum_i a_i (w_i - c_{l_i})**2 + lam * sum_i L_{l_i}`` with
    ``L_j = -log2 p_j`` by alternating assignment and centroid/probability updates until the
    assignment is stable (each step lowers the objective).

    Parameters
    ----------
    w : values (any shape; flattened), typically the surviving weights of a layer.
    k : initial number of centroids (clusters that empty out are dropped).
    lam : rate weight ``lambda`` >= 0 (distortion units per bit).
    importance : per-value weights ``a_i`` > 0 (default 1).
    prune : add zero as a fixed centroid (label -1) costing ``-log2(1 - density)`` bits,
        nonzero centroids costing ``-log2 density`` extra (rate-distortion pruning).
    density : fraction of the layer's positions that are nonzero (for the map costs).
    init, random_state : initial centroids as in :func:`~nncompress.quant.kmeans.kmeans_1d`.

    Returns
    -------
    codebook : (k',) ascending float64 centroids that kept at least one value.
    labels : (n,) int64 index into ``codebook``, or -1 for a value pruned to zero.
    info : ``distortion`` (weighted), ``rate_bits`` (entropy of the labels, zeros counted as a
        symbol when pruning), ``objective``, ``n_iter``, ``pruned``.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer >= 1")
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam={lam!r}: must be a finite number >= 0")
    if init not in INITS:
        raise ValueError(f"init={init!r}: must be one of {INITS}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r}: must be in (0, 1]")
    x = torch.as_tensor(w).detach().reshape(-1).cpu().to(torch.float64).numpy()  # (n,)
    n = x.size
    if n == 0:
        raise ValueError("w is empty: nothing to quantize")
    if not np.isfinite(x).all():
        raise ValueError("w contains NaN or infinite values")
    if importance is None:
        a = np.ones(n)
    else:
        a = torch.as_tensor(importance).detach().reshape(-1).cpu().to(torch.float64).numpy()
        if a.size != n or not np.isfinite(a).all() or a.min() < 0:
            raise ValueError(f"importance: must be {n} finite values >= 0")
        a = a + 1e-12 * max(float(a.mean()), 1e-30)  # keep every weight's distortion alive
    rng = np.random.default_rng(random_state)
    c = _init_centroids(np.sort(x), min(int(k), n), init, rng).astype(np.float64)
    c = np.unique(c)  # (k,) distinct, ascending
    p = np.full(c.size, 1.0 / c.size)
    if prune:  # a zero must stay expressible in a fully dense layer: d <= 1 - 1/(2n)
        density = min(density, 1.0 - 0.5 / n)
    extra_nz = -math.log2(density) if prune else 0.0
    zero_cost = -math.log2(1.0 - density) if prune else math.inf
    labels = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - reported
        cost = -np.log2(p) + extra_nz  # (k,)
        cands = np.concatenate([c, [0.0]]) if prune else c
        costs = np.concatenate([cost, [zero_cost]]) if prune else cost
        new = _assign(x, a, cands, costs, lam)
        new[new == c.size] = -1  # the zero centroid
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        live = labels >= 0
        if not live.any():  # everything pruned: nothing left to update
            c, p = c[:0], p[:0]
            break
        cnt = np.bincount(labels[live], minlength=c.size).astype(np.float64)  # (k,)
        wsum = np.bincount(labels[live], weights=a[live] * x[live], minlength=c.size)
        asum = np.bincount(labels[live], weights=a[live], minlength=c.size)
        keep = cnt > 0
        c = np.where(keep, wsum / np.maximum(asum, 1e-300), c)[keep]
        # drop empty clusters and renumber the labels
        remap = np.full(keep.size, -1, dtype=np.int64)
        remap[keep] = np.arange(int(keep.sum()))
        labels = np.where(labels >= 0, remap[np.maximum(labels, 0)], -1)
        p = cnt[keep] / max(1.0, cnt[keep].sum())
        if prune:  # the zeros change the layer's density
            nz_frac = (labels >= 0).mean()
            density_now = max(1e-12, density * nz_frac)
            extra_nz = -math.log2(density_now)
            zero_cost = -math.log2(max(1e-12, 1.0 - density_now))
        order = np.argsort(c)
        c = c[order]
        p = p[order]
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        labels = np.where(labels >= 0, inv[np.maximum(labels, 0)], -1)
    assert labels is not None
    recon = np.zeros(n)
    recon[labels >= 0] = c[labels[labels >= 0]]
    distortion = float((a * (x - recon) ** 2).sum())
    sym = np.where(labels >= 0, labels, c.size)
    rate = rate_bits(sym, c.size + 1)
    info = {
        "distortion": distortion,
        "rate_bits": rate,
        "objective": distortion + lam * rate,
        "n_iter": float(n_iter),
        "pruned": float((labels < 0).sum()),
    }
    return c, labels, info


class ECSQuantizer:
    """ECSQ as an estimator: ``ECSQuantizer(k=32, lam=1e-3).fit(w, importance)``.

    Learned attributes: ``codebook_`` (k',), ``labels_`` (n,) (-1 = pruned to zero),
    ``distortion_``, ``rate_bits_``, ``n_iter_``.
    """

    def __init__(
        self,
        k: int = 32,
        lam: float = 0.0,
        prune: bool = False,
        density: float = 1.0,
        init: str = "linear",
        max_iter: int = 100,
        random_state: int | None = 0,
    ) -> None:
        self.k = k
        self.lam = lam
        self.prune = prune
        self.density = density
        self.init = init
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, w, importance=None) -> ECSQuantizer:
        c, labels, info = ecsq_1d(
            w,
            self.k,
            self.lam,
            importance=importance,
            prune=self.prune,
            density=self.density,
            init=self.init,
            max_iter=self.max_iter,
            random_state=self.random_state,
        )
        self.codebook_ = c
        self.labels_ = labels
        self.distortion_ = info["distortion"]
        self.rate_bits_ = info["rate_bits"]
        self.n_iter_ = int(info["n_iter"])
        return self

    def reconstruct(self) -> np.ndarray:
        """The quantized values (0 where pruned)."""
        return np.where(self.labels_ >= 0, self.codebook_[np.maximum(self.labels_, 0)], 0.0)


# --------------------------------------------------------------------------- importance


def fisher_importance(
    model: nn.Module,
    loader: Iterable,
    *,
    batches: int = 8,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``E[(dL/dw)**2]`` of every weight with 2+ dimensions, per
    module name (``'fc1'``), from ``batches`` batches of ``loader`` (use the held-out split).

    Squared gradients of per-batch mean losses, averaged over batches (the usual cheap
    estimate; the model's parametrizations, e.g. pruning masks, are differentiated through).
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    was_training = model.training
    model.eval()
    names = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            names[name] = m
    acc: dict[str, torch.Tensor | None] = {name: None for name in names}
    seen = 0
    device = next(model.parameters()).device
    try:
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            x, y = x.to(device), y.to(device)
            # cached(): a parametrized weight is computed once, so the tensor we differentiate
            # is the one the forward pass uses
            with torch.enable_grad(), parametrize.cached():
                weights = {name: m.weight for name, m in names.items()}  # effective weights
                leaves = [w for w in weights.values() if w.requires_grad]
                out = model(x)
                loss = loss_fn(out, y)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            grads = iter(grads)
            grads = [next(grads) if w.requires_grad else None for w in weights.values()]
            for name, g in zip(weights, grads, strict=True):
                if g is None:
                    continue
                sq = g.detach() ** 2
                acc[name] = sq if acc[name] is None else acc[name] + sq
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("fisher_importance: the loader yielded no batch")
    return {n: v / seen for n, v in acc.items() if v is not None}


# --------------------------------------------------------------------------- model transform


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {allowed}")


@dataclass(frozen=True)
class ECSQConfig:
    """How :func:`ecsq_share_` quantizes each layer.

    ``bits_fc`` / ``bits_conv``: initial codebook size ``2**bits`` (clusters may empty out);
    ``lam``: the rate weight (with ``importance='fisher'`` in loss units per bit, global
    across layers; with ``'none'`` relative to each layer's mean squared weight);
    ``per_layer_lam``: overrides by module name; ``prune``: rate-distortion pruning.
    """

    bits_fc: int = 5
    bits_conv: int = 6
    lam: float = 0.0
    per_layer_lam: dict[str, float] = field(default_factory=dict)
    importance: str = "fisher"
    prune: bool = False
    init: str = "linear"
    max_iter: int = 100
    centroid_grad: str = "mean"

    def __post_init__(self) -> None:
        for name in ("bits_fc", "bits_conv"):
            v = getattr(self, name)
            _check(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8,
                name,
                v,
                "must be an integer in [1, 8]",
            )
        for name, v in [("lam", self.lam), *self.per_layer_lam.items()]:
            _check(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and v >= 0,
                name if name == "lam" else f"per_layer_lam['{name}']",
                v,
                "must be a finite number >= 0",
            )
        _check(
            self.importance in IMPORTANCES, "importance", self.importance, f"one of {IMPORTANCES}"
        )
        _check(isinstance(self.prune, bool), "prune", self.prune, "must be true or false")
        _check(self.init in INITS, "init", self.init, f"must be one of {INITS}")
        _check(
            isinstance(self.max_iter, int) and self.max_iter >= 1,
            "max_iter",
            self.max_iter,
            "must be an integer >= 1",
        )

    def bits_for(self, module: nn.Module) -> int:
        return self.bits_conv if isinstance(module, nn.modules.conv._ConvNd) else self.bits_fc


def ecsq_share_(
    model: nn.Module,
    config: ECSQConfig | None = None,
    *,
    importance: dict[str, torch.Tensor] | None = None,
    filter: Selectable = None,
) -> ShareReport:
    """Quantize every selected layer's surviving weights by ECSQ and share them, in place.

    Installs the :class:`~nncompress.quant.kmeans.SharedWeight` parametrization
    ``weight = where(mask, codebook[indices], 0)`` with the ECSQ codebook; with
    ``config.prune`` the mask also drops the weights ECSQ sent to zero. ``importance`` maps a
    module name to its per-weight importance (:func:`fisher_importance`); required when
    ``config.importance == 'fisher'``. Returns the per-layer report (``inertia`` holds the
    weighted distortion).
    """
    cfg = config or ECSQConfig()
    layers = _candidates(model, filter)
    unknown = sorted(set(cfg.per_layer_lam) - {n for n, _ in layers})
    if unknown:
        raise ConfigError(f"per_layer_lam: {unknown} are not quantizable layers of the model")
    if cfg.importance == "fisher" and importance is None:
        raise ConfigError("importance='fisher': pass importance=fisher_importance(model, val)")
    already = shared_layers(model)
    report = ShareReport()
    for name, m in layers:
        if name in already:
            log.info("layer %s is already shared: skipped", name)
            continue
        with torch.no_grad():
            w = m.weight.detach().cpu()
        mask = w != 0
        survivors = w[mask]  # (nnz,)
        if survivors.numel() == 0:
            continue
        lam = cfg.per_layer_lam.get(name, cfg.lam)
        a = None
        if cfg.importance == "fisher":
            if name not in importance:
                raise ConfigError(f"importance: no entry for layer '{name}'")
            a = importance[name].detach().cpu()[mask]
        else:
            lam = lam * float((survivors.double() ** 2).mean())
        density = float(mask.float().mean())
        c, labels, info = ecsq_1d(
            survivors,
            2 ** cfg.bits_for(m),
            lam,
            importance=a,
            prune=cfg.prune,
            density=density,
            init=cfg.init,
            max_iter=cfg.max_iter,
        )
        labels_t = torch.from_numpy(labels)
        new_mask = mask.clone()
        new_mask[mask] = labels_t >= 0
        indices = torch.zeros(w.shape, dtype=torch.int64)
        indices[new_mask] = labels_t[labels_t >= 0]
        # a layer pruned away keeps a one-value codebook (unused: the mask is all False)
        codebook = torch.from_numpy(c if c.size else np.zeros(1)).to(w.dtype)
        _install(m, codebook, indices, new_mask, cfg.centroid_grad)
        nnz = int(new_mask.sum())
        report.layers.append(
            LayerShareReport(
                name=name,
                n_weights=w.numel(),
                n_nonzero=nnz,
                bits=math.ceil(math.log2(max(2, c.size))),
                k=int(c.size),
                inertia=info["distortion"],
                # fp32 survivors vs their coded codes (entropy) and the fp32 codebook
                compression_rate=32.0
                * survivors.numel()
                / max(1.0, info["rate_bits"] + 32.0 * c.size),
            )
        )
        log.info(
            "ecsq %s: %d -> %d nonzeros, k=%d, %.3f bits/weight",
            name,
            survivors.numel(),
            nnz,
            c.size,
            info["rate_bits"] / max(1, survivors.numel()),
        )
    return report
