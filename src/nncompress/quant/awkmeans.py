"""Activation-weighted k-means weight sharing: Deep Compression's codebooks fitted to the
layer's *output* error instead of its weight error.

Weight sharing (Han et al. 2016) clusters a layer's weights by minimising ``sum (w - c)^2``.
The output error of a linear layer on calibration inputs ``X`` is
``tr(D H D^T)`` with ``D = W - W_hat`` and ``H = 2 X^T X / n`` (the objective of GPTQ,
Frantar et al. 2023, and of "And the Bit Goes Down", Stock et al. 2020, which reconstructs
activations). Keeping the diagonal of ``H`` gives a weighted k-means,

    min_C  sum_ij h_j (W_ij - c_{l_ij})^2,         h_j = 2 E[x_j^2],

where input features that carry more energy weigh more (as in SqueezeLLM's sensitivity-
weighted k-means, Kim et al. 2024, with the Fisher diagonal replaced by ``diag H``). For an
embedding, whose input is one-hot, the weight of row ``i`` is the token's count in the
calibration data plus one. The codebook is then a :class:`~nncompress.quant.kmeans.SharedWeight`
parametrization, fine-tunable like Deep Compression's.

The weighted 1-D Lloyd iteration keeps the fast sorted-prefix-sum form of
:func:`~nncompress.quant.kmeans.kmeans_1d` (each cluster is a run of the sorted values);
scikit-learn's ``KMeans(sample_weight=...)`` reaches the same fixed points but builds an
n x k distance matrix per iteration, too slow for embedding tables, hence this code.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import ProgressEvent
from ..engine.batches import take_batches
from ..engine.layers import layer_kind, matrix_layers, record_inputs, tied_groups, weight_matrix
from .kmeans import CENTROID_GRADS, LayerShareReport, SharedWeight, ShareReport, shared_layers

__all__ = ["AwareKMeansConfig", "share_weights_aware_", "weighted_kmeans_1d"]

log = logging.getLogger(__name__)

MAX_SHARE_BITS = 16
_INITS = ("linear", "density")


def _weighted_init(x: np.ndarray, w: np.ndarray, cw: np.ndarray, k: int, init: str) -> np.ndarray:
    if init == "linear":
        return np.linspace(x[0], x[-1], k)
    # density: weighted quantiles at (i + 1/2) / k of the total weight
    targets = (np.arange(k) + 0.5) / k * cw[-1]
    idx = np.clip(np.searchsorted(cw, targets, side="left"), 0, len(x) - 1)
    return x[idx].astype(np.float64)


def weighted_kmeans_1d(
    values: torch.Tensor | np.ndarray,
    weights: torch.Tensor | np.ndarray,
    k: int,
    *,
    init: str = "density",
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weighted 1-D k-means: ``min sum_i a_i (x_i - c_{l_i})^2`` by Lloyd iterations.

    Parameters
    ----------
    values : (n,) values to cluster (flattened).
    weights : (n,) non-negative weights ``a_i`` (not all zero).
    k : clusters (>= 1).
    init : 'density' (weighted quantiles, default) or 'linear' (uniform between min and max).
    max_iter : Lloyd iterations at most (stops when the assignment no longer changes).

    Returns
    -------
    codebook (k,) float32 ascending, labels (n,) int64, weighted inertia.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer >= 1")
    if init not in _INITS:
        raise ValueError(f"init={init!r}: must be one of {_INITS}")
    x0 = torch.as_tensor(values).detach().reshape(-1).cpu().to(torch.float64).numpy()  # (n,)
    a0 = torch.as_tensor(weights).detach().reshape(-1).cpu().to(torch.float64).numpy()  # (n,)
    if x0.shape != a0.shape or x0.size == 0:
        raise ValueError(f"values {x0.shape} and weights {a0.shape}: same non-zero length needed")
    if not (np.isfinite(x0).all() and np.isfinite(a0).all()) or (a0 < 0).any() or a0.sum() <= 0:
        raise ValueError("weights must be finite, >= 0 and not all zero; values finite")
    order = np.argsort(x0, kind="stable")
    x, a = x0[order], a0[order]  # (n,) ascending values and their weights
    cw = np.cumsum(a)  # (n,)
    s0 = np.concatenate(([0.0], cw))  # (n+1,) prefix sums of weights
    s1 = np.concatenate(([0.0], np.cumsum(a * x)))  # (n+1,) prefix sums of weighted values
    n = x.size
    k_eff = min(int(k), n)
    c = np.sort(_weighted_init(x, a, cw, k_eff, init))  # (k_eff,)
    cuts_prev = None
    for _ in range(max_iter):
        mids = 0.5 * (c[1:] + c[:-1])  # (k_eff-1,)
        cuts = np.concatenate(([0], np.searchsorted(x, mids, side="right"), [n]))  # (k_eff+1,)
        mass = s0[cuts[1:]] - s0[cuts[:-1]]  # (k_eff,)
        total = s1[cuts[1:]] - s1[cuts[:-1]]  # (k_eff,)
        full = mass > 0
        new_c = c.copy()
        new_c[full] = total[full] / mass[full]  # weighted means; empty clusters keep theirs
        c = np.sort(new_c)
        if cuts_prev is not None and np.array_equal(cuts, cuts_prev):
            break
        cuts_prev = cuts
    mids = 0.5 * (c[1:] + c[:-1])
    cuts = np.concatenate(([0], np.searchsorted(x, mids, side="right"), [n]))
    sorted_labels = np.repeat(np.arange(k_eff, dtype=np.int64), np.diff(cuts))  # (n,)
    labels = np.empty(n, dtype=np.int64)
    labels[order] = sorted_labels
    inertia = float(np.sum(a * (x - c[sorted_labels]) ** 2))
    if k_eff < k:
        c = np.concatenate([c, np.full(int(k) - k_eff, c[-1])])
    return torch.from_numpy(c).to(torch.float32), torch.from_numpy(labels), inertia


def _bits_ok(b: Any) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_SHARE_BITS


@dataclass(frozen=True)
class AwareKMeansConfig:
    """Settings of :func:`share_weights_aware_` (frozen, JSON/YAML-able).

    ``bits`` (1..16) per shared weight, ``per_layer`` ``{name or fnmatch pattern: bits or
    None}`` (None: leave the layer alone), ``include``/``exclude`` fnmatch patterns over module
    names, ``embeddings`` to share ``nn.Embedding`` tables too (``embedding_bits``, default
    ``bits``), ``init`` 'density' or 'linear', ``max_iter`` Lloyd iterations,
    ``calibration_batches`` batches used (None: all), ``centroid_grad`` as
    :class:`~nncompress.quant.kmeans.KMeansConfig`.
    """

    bits: int = 4
    per_layer: dict[str, int | None] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    embeddings: bool = True
    embedding_bits: int | None = None
    init: str = "density"
    max_iter: int = 100
    calibration_batches: int | None = 16
    centroid_grad: str = "mean"

    def __post_init__(self) -> None:
        rule = f"must be an integer in [1, {MAX_SHARE_BITS}]"
        if not _bits_ok(self.bits):
            raise ConfigError(f"bits={self.bits!r}: {rule}")
        if self.embedding_bits is not None and not _bits_ok(self.embedding_bits):
            raise ConfigError(f"embedding_bits={self.embedding_bits!r}: {rule} or null")
        if not isinstance(self.per_layer, dict):
            raise ConfigError(f"per_layer={self.per_layer!r}: must be a mapping")
        for key, b in self.per_layer.items():
            if b is not None and not _bits_ok(b):
                raise ConfigError(f"per_layer['{key}']={b!r}: {rule} or null")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or not all(isinstance(p, str) for p in v):
                raise ConfigError(f"{name}={v!r}: must be a list of fnmatch patterns")
            object.__setattr__(self, name, tuple(v))
        if self.init not in _INITS:
            raise ConfigError(f"init={self.init!r}: must be one of {_INITS}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter!r}: must be an integer >= 1")
        if self.calibration_batches is not None and (
            not isinstance(self.calibration_batches, int) or self.calibration_batches < 1
        ):
            raise ConfigError(
                f"calibration_batches={self.calibration_batches!r}: must be >= 1 or null"
            )
        if self.centroid_grad not in CENTROID_GRADS:
            raise ConfigError(
                f"centroid_grad={self.centroid_grad!r}: must be one of {CENTROID_GRADS}"
            )

    def bits_for(self, name: str, kind: str) -> int | None:
        if name in self.per_layer:
            return self.per_layer[name]
        for pattern, b in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return b
        return (self.embedding_bits or self.bits) if kind == "embedding" else self.bits

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d


def _importances(
    model: nn.Module, primaries: dict[str, nn.Module], batches: list, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per primary layer: (in,) ``diag H`` of a matrix layer, (num,) token counts + 1 of an
    embedding."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        m = primaries[name]
        if layer_kind(m) == "embedding":
            c = torch.bincount(x.reshape(-1).cpu(), minlength=m.num_embeddings).double()
            sums[name] = sums.get(name, 0) + c
        else:
            rows = x.detach().reshape(-1, x.shape[-1]).double()  # (n, in)
            sums[name] = sums.get(name, 0) + rows.pow(2).sum(0).cpu()
            counts[name] = counts.get(name, 0) + rows.shape[0]

    record_inputs(model, primaries, batches, on_input, device)
    out = {}
    for name, m in primaries.items():
        if name not in sums:
            raise ValueError(f"layer '{name}' was not called by the model on the calibration data")
        if layer_kind(m) == "embedding":
            out[name] = sums[name] + 1.0  # (num,)
        else:
            out[name] = 2.0 * sums[name] / counts[name]  # (in,)
    return out


def share_weights_aware_(
    model: nn.Module,
    config: AwareKMeansConfig | None = None,
    calibration: Iterable | None = None,
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> ShareReport:
    """Share the weights of every selected matrix layer by activation-weighted k-means.

    Each weight (tied layers share one, and one parametrization) becomes
    ``codebook[indices]`` with ``2**bits`` centroids fitted by :func:`weighted_kmeans_1d` with
    the importances of the module docstring; zeros (pruned weights) stay zero. ``calibration``
    batches are tensors, tuples or keyword dicts (:mod:`nncompress.engine.batches`).
    ``inertia`` in the report is the weighted one.
    """
    cfg = config or AwareKMeansConfig()
    if calibration is None:
        raise ConfigError("share_weights_aware_: needs calibration batches (calibration=...)")
    kinds = ("linear", "conv1d", "embedding") if cfg.embeddings else ("linear", "conv1d")
    layers = matrix_layers(model, cfg.include, cfg.exclude, kinds, filter)
    names = [n for n, _ in layers]
    for key in cfg.per_layer:
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            raise ConfigError(f"per_layer['{key}']: matches no selected layer ({names[:8]}...)")
    already = shared_layers(model)
    plan = []
    for group in tied_groups(layers):
        gnames = [n for n, _ in group]
        if any(n in already for n in gnames):
            continue
        for n, m in group:
            if parametrize.is_parametrized(m, "weight"):
                raise ConfigError(f"layer '{n}' is already parametrized: fold it first")
        kinds_g = [layer_kind(m) for _, m in group]
        primary = next((i for i, k in enumerate(kinds_g) if k != "embedding"), 0)
        gkind = "embedding" if "embedding" in kinds_g else kinds_g[primary]  # tied: one rule
        bits = {cfg.bits_for(n, gkind) for n in gnames}
        if len(bits) != 1:
            raise ConfigError(f"tied layers {gnames} get different bits {sorted(map(str, bits))}")
        b = bits.pop()
        if b is not None:
            plan.append((group, primary, b))
    batches = take_batches(calibration, cfg.calibration_batches, "calibration")
    primaries = {g[p][0]: g[p][1] for g, p, _ in plan}
    imp = _importances(model, primaries, batches, model_device(model))
    report = ShareReport()
    if progress:
        progress(ProgressEvent("start", "share", total=len(plan)))
    try:
        for i, (group, p, bits) in enumerate(plan):
            name, m = group[p]
            report.layers.append(_share_one(group, name, m, imp[name], bits, cfg))
            if progress:
                progress(
                    ProgressEvent(
                        "advance", "share", total=len(plan), completed=i + 1, info={"layer": name}
                    )
                )
    finally:
        if progress:
            progress(ProgressEvent("end", "share"))
    return report


def _share_one(group, name, m, importance, bits, cfg) -> LayerShareReport:
    with torch.no_grad():
        w = m.weight.detach()  # layout of the weight
        mat = weight_matrix(m)  # (out, in)
        if layer_kind(m) == "embedding":
            a = importance[:, None].expand(mat.shape)  # (num, dim): row weights
        else:
            a = importance[None, :].expand(mat.shape)  # (out, in): column weights
        if layer_kind(m) == "conv1d":
            a = a.T  # back to the weight's (in, out) layout
        a = a.to(torch.float64) + 1e-12 * float(importance.mean())
    mask = w != 0
    k = 2**bits
    if int(mask.sum()) == 0:
        codebook, indices, inertia = torch.zeros(k), torch.zeros_like(w, dtype=torch.int64), 0.0
    else:
        cb, labels, inertia = weighted_kmeans_1d(
            w[mask], a[mask.cpu()], k, init=cfg.init, max_iter=cfg.max_iter
        )
        codebook = cb
        indices = torch.zeros(w.shape, dtype=torch.int64)
        indices[mask.cpu()] = labels
    p = SharedWeight(codebook.to(w.dtype), indices, mask, cfg.centroid_grad).to(w.device)
    for _, mod in group:
        parametrize.register_parametrization(mod, "weight", p)
        mod.parametrizations["weight"].original.requires_grad_(False)
    nnz = int(mask.sum())
    from .kmeans import sharing_compression_rate

    log.info("shared %s (activation-weighted): %d weights -> %d values", name, nnz, k)
    return LayerShareReport(
        name=name,
        n_weights=w.numel(),
        n_nonzero=nnz,
        bits=bits,
        k=k,
        inertia=inertia,
        compression_rate=sharing_compression_rate(max(nnz, 1), k),
    )
