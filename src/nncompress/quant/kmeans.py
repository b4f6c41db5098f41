"""Trained quantization by weight sharing (Han et al., ICLR 2016, "Deep Compression", stage 2).

Per layer, the surviving (nonzero / unmasked) weights are clustered with 1-D k-means into
``k = 2**b`` shared values; each weight then stores a ``b``-bit index into its layer's codebook.
Zero is not a cluster: pruned weights stay exactly zero (the mask wins).

Three API layers:

1. :func:`kmeans_1d` — exact 1-D Lloyd iterations on a tensor.
2. :class:`KMeansQuantizer` — the same as a scikit-learn style estimator
   (``fit`` returns self; ``codebook_``, ``labels_``, ``inertia_``).
3. :func:`share_weights_` — a model transform: installs a
   ``torch.nn.utils.parametrize`` parametrization ``weight = codebook[indices] * mask`` on
   every selected layer. The indices are a fixed buffer and the codebook an ``nn.Parameter``,
   so autograd gives each centroid the *sum* of the gradients of the weights assigned to it,
   which is exactly Deep Compression's centroid update; any optimizer then fine-tunes it.
   :func:`share_from_values_` rebuilds that parametrization from a model whose (plain) weights
   already take few distinct values, e.g. one reloaded from a checkpoint.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.coverage import CoverageReport, coverage_report
from ..core.errors import ConfigError
from ..core.policy import Policy
from ..core.progress import Progress, progress_task
from ..core.select import LayerSelector, Selectable
from ..core.validate import check as _check

__all__ = [
    "INITS",
    "KMeansConfig",
    "KMeansQuantizer",
    "LayerShareReport",
    "ShareReport",
    "SharedWeight",
    "kmeans_1d",
    "share_from_values_",
    "share_weights_",
    "shared_layers",
    "sharing_compression_rate",
]

log = logging.getLogger(__name__)

INITS = ("linear", "density", "forgy")
CENTROID_GRADS = ("mean", "sum")
MAX_BITS = 16
REBUILD_MAX_VALUES = 2**8  # share_from_values_: layers with at most this many distinct values

#: what ``filter=`` accepts (a LayerSelector, a predicate, names/globs): kept for old imports
LayerFilter = Selectable
#: the layer types weight sharing applies to
SHAREABLE = LayerSelector(fn=lambda name, m: _shareable(m))


# --------------------------------------------------------------------------------------------
# Layer 1: the 1-D k-means
# --------------------------------------------------------------------------------------------


def _init_centroids(x: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Initial centroids for sorted float64 values ``x`` (Deep Compression, section 3.2)."""
    if init == "linear":
        # Uniform between min and max: keeps centroids near the rare large weights.
        return np.linspace(x[0], x[-1], k)
    if init == "density":
        # Uniform over the CDF: the (i + 1/2)/k quantiles.
        return np.quantile(x, (np.arange(k) + 0.5) / k)
    # forgy: k distinct random samples
    return np.sort(x[rng.choice(len(x), size=k, replace=False)])


def kmeans_1d(
    w: torch.Tensor | np.ndarray,
    k: int,
    *,
    init: str = "linear",
    max_iter: int = 300,
    tol: float = 0.0,
    random_state: int | None = 0,
    n_init: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact 1-D k-means (Lloyd's algorithm) of the values of ``w``.

    Minimises the inertia ``sum_i (w_i - c_{l_i})**2`` over codebook ``c`` (k values) and labels
    ``l`` (Han et al. 2016, "Deep Compression", eq. 1: ``argmin_C sum_i sum_{w in c_i} |w - c_i|^2``).

    In one dimension every cluster of a Lloyd iteration is a contiguous run of the *sorted*
    values, cut at the midpoints between consecutive centroids. So we sort once (O(n log n)),
    and each iteration only needs ``searchsorted`` of the k-1 midpoints (O(k log n)) and
    prefix sums to get every cluster's count and sum — no O(n k) distance matrix as in a
    generic k-means. That is why this is written by hand rather than calling scikit-learn:
    it gives the same Lloyd fixed points far faster (see benchmarks/deep_compression.py).

    An empty cluster (possible with ``linear`` init where the weights have gaps) takes the
    value farthest from its centroid, which leaves its old cluster, as scikit-learn does.

    Parameters
    ----------
    w : values to cluster (any shape; flattened).
    k : number of clusters (>= 1). If ``w`` has fewer distinct values than ``k``, the extra
        centroids duplicate existing ones and receive no labels.
    init : ``'linear'`` (uniform between min and max, default), ``'density'`` (uniform over the
        CDF) or ``'forgy'`` (k random samples).
    max_iter : maximum Lloyd iterations.
    tol : stop when no centroid moves by more than ``tol`` times the value range (the loop
        always stops when the assignment no longer changes: that is an exact fixed point).
    random_state : seed for ``forgy`` init.
    n_init : with ``forgy``, the number of random restarts; the run with the lowest inertia
        is kept (the deterministic inits run once).

    Returns
    -------
    codebook : ``(k,)`` float tensor, ascending, in ``w``'s float dtype (float32 for others).
    labels : ``(n,)`` int64 tensor, index of each value's centroid (in ``w.flatten()`` order).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer >= 1")
    if init not in INITS:
        raise ValueError(f"init={init!r}: must be one of {INITS}")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r}: must be >= 1")
    if tol < 0:
        raise ValueError(f"tol={tol!r}: must be >= 0")
    t = torch.as_tensor(w)
    out_dtype = t.dtype if t.is_floating_point() else torch.float32
    flat = t.detach().reshape(-1).cpu().to(torch.float64).numpy()  # (n,)
    n = flat.size
    if n == 0:
        raise ValueError("w is empty: nothing to cluster")
    if not np.isfinite(flat).all():
        raise ValueError("w contains NaN or infinite values")
    codebook, labels, _, _ = _best_of(flat, int(k), init, max_iter, tol, random_state, n_init)
    return (
        torch.from_numpy(codebook).to(out_dtype),
        torch.from_numpy(labels),
    )


def _best_of(
    flat: np.ndarray,
    k: int,
    init: str,
    max_iter: int,
    tol: float,
    random_state: int | None,
    n_init: int,
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Run :func:`_lloyd` ``n_init`` times (only ``forgy`` is random) and keep the lowest inertia."""
    if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init={n_init!r}: must be an integer >= 1")
    rng = np.random.default_rng(random_state)
    runs = n_init if init == "forgy" else 1
    best = None
    for _ in range(runs):
        res = _lloyd(flat, k, init, max_iter, tol, rng)
        if best is None or res[2] < best[2]:
            best = res
    return best


def _lloyd(
    flat: np.ndarray, k: int, init: str, max_iter: int, tol: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Lloyd iterations on float64 values: ``(codebook, labels, inertia, n_iter)``."""
    n = flat.size
    order = np.argsort(flat, kind="stable")  # (n,)
    x = flat[order]  # (n,) ascending
    s1 = np.concatenate(([0.0], np.cumsum(x)))  # (n+1,) prefix sums
    span = float(x[-1] - x[0])
    k_eff = min(k, n)
    c = _init_centroids(x, k_eff, init, rng)  # (k_eff,)
    cuts_prev = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        mids = 0.5 * (c[1:] + c[:-1])  # (k_eff-1,) decision boundaries
        # values <= midpoint go left (ties to the lower centroid, like argmin)
        cuts = np.concatenate(([0], np.searchsorted(x, mids, side="right"), [n]))  # (k_eff+1,)
        counts = np.diff(cuts)  # (k_eff,)
        sums = s1[cuts[1:]] - s1[cuts[:-1]]  # (k_eff,)
        full = counts > 0
        if not full.all():
            sums, counts = _relocate_empty(x, cuts, c, sums, counts)
            full = counts > 0
        new_c = c.copy()
        new_c[full] = sums[full] / counts[full]
        new_c = np.sort(new_c)
        shift = np.max(np.abs(new_c - c))
        c = new_c
        if (cuts_prev is not None and np.array_equal(cuts, cuts_prev)) or shift <= tol * span:
            break
        cuts_prev = cuts
    # Final assignment against the final centroids (exactly the nearest centroid).
    mids = 0.5 * (c[1:] + c[:-1])
    cuts = np.concatenate(([0], np.searchsorted(x, mids, side="right"), [n]))
    sorted_labels = np.repeat(np.arange(k_eff, dtype=np.int64), np.diff(cuts))  # (n,)
    labels = np.empty(n, dtype=np.int64)
    labels[order] = sorted_labels
    inertia = float(np.sum((x - c[sorted_labels]) ** 2))
    if k_eff < k:  # fewer values than clusters: pad with copies of the largest centroid
        c = np.concatenate([c, np.full(k - k_eff, c[-1])])
    return c, labels, inertia, n_iter


def _relocate_empty(
    x: np.ndarray, cuts: np.ndarray, c: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Give each empty cluster the value farthest from its assigned centroid (as scikit-learn).

    The chosen value leaves its cluster (its sum and count are updated) and becomes the empty
    cluster's only member. Returns the new ``(sums, counts)``.
    """
    sums, counts = sums.copy(), counts.copy()
    empty = np.flatnonzero(counts == 0)
    labels = np.repeat(np.arange(len(c)), counts)  # (n,) sorted labels
    dist = np.abs(x - c[labels])  # (n,)
    m = min(len(empty), len(x))
    far = np.argpartition(-dist, m - 1)[:m] if m < len(x) else np.arange(len(x))
    far = far[np.argsort(-dist[far], kind="stable")]
    for j, pos in zip(empty, far, strict=False):
        if dist[pos] <= 0:
            break  # values sit on their centroids: nothing to split
        donor = labels[pos]
        if counts[donor] <= 1:
            continue
        sums[donor] -= x[pos]
        counts[donor] -= 1
        sums[j], counts[j] = x[pos], 1
    return sums, counts


# --------------------------------------------------------------------------------------------
# Layer 2: estimator
# --------------------------------------------------------------------------------------------


class KMeansQuantizer:
    """1-D k-means weight sharing as an estimator (scikit-learn conventions).

    ``KMeansQuantizer(bits=5).fit(w)`` clusters the values of ``w`` into ``2**bits`` shared
    values (Han et al. 2016). Learned attributes: ``codebook_`` ``(k,)``, ``labels_`` ``(n,)``,
    ``inertia_`` (sum of squared errors), ``n_iter_``.
    """

    def __init__(
        self,
        bits: int = 5,
        init: str = "linear",
        max_iter: int = 300,
        tol: float = 0.0,
        random_state: int | None = 0,
        n_init: int = 1,
    ) -> None:
        self.bits = bits
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.n_init = n_init

    def fit(self, w: torch.Tensor | np.ndarray) -> KMeansQuantizer:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits!r}: must be an integer in [1, 16]")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: must be one of {INITS}")
        t = torch.as_tensor(w)
        flat = t.detach().reshape(-1).cpu().to(torch.float64).numpy()  # (n,)
        if flat.size == 0:
            raise ValueError("w is empty: nothing to cluster")
        codebook, labels, inertia, n_iter = _best_of(
            flat, 2**self.bits, self.init, self.max_iter, self.tol, self.random_state, self.n_init
        )
        dtype = t.dtype if t.is_floating_point() else torch.float32
        self.codebook_ = torch.from_numpy(codebook).to(dtype)  # (k,)
        self.labels_ = torch.from_numpy(labels)  # (n,)
        self.inertia_ = inertia
        self.n_iter_ = n_iter
        return self

    def reconstruct(self) -> torch.Tensor:
        """The clustered values ``codebook_[labels_]`` (flat)."""
        return self.codebook_[self.labels_]


def sharing_compression_rate(n: int, k: int, weight_bits: int = 32) -> float:
    """Compression rate of weight sharing alone (Han et al. 2016, eq. 2).

    ``r = n * b / (n * log2(k) + k * b)``: ``n`` weights of ``b`` bits each become ``log2(k)``-bit
    indices plus a codebook of ``k`` values of ``b`` bits.
    """
    if n < 1 or k < 1:
        raise ValueError(f"n={n}, k={k}: both must be >= 1")
    return n * weight_bits / (n * math.log2(k) + k * weight_bits) if k > 1 else float(n)


# --------------------------------------------------------------------------------------------
# Layer 3: model transform
# --------------------------------------------------------------------------------------------


def _valid_bits(b: Any) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_BITS


@dataclass(frozen=True)
class KMeansConfig:
    """How to share weights: bits per layer type, per-layer overrides, k-means settings.

    Defaults follow Deep Compression: 8 bits (256 shared values) for conv layers, 5 bits (32)
    for fully connected layers (Linear and Hugging Face Conv1D); ``bits_embedding`` for
    ``nn.Embedding`` tables. ``per_layer`` maps a module name (``'fc1'``) or an fnmatch pattern
    (``'encoder.*.query'``) to its bits: an exact name wins, then the first matching pattern.
    Bits go up to 16 (65,536 shared values).
    """

    bits_conv: int = 8
    bits_fc: int = 5
    per_layer: dict[str, int] = field(default_factory=dict)
    bits_embedding: int = 8
    init: str = "linear"
    max_iter: int = 300
    seed: int = 0
    centroid_grad: str = "mean"

    def __post_init__(self) -> None:
        _check(
            _valid_bits(self.bits_conv), "bits_conv", self.bits_conv, f"must be in [1, {MAX_BITS}]"
        )
        _check(_valid_bits(self.bits_fc), "bits_fc", self.bits_fc, f"must be in [1, {MAX_BITS}]")
        _check(
            _valid_bits(self.bits_embedding),
            "bits_embedding",
            self.bits_embedding,
            f"must be in [1, {MAX_BITS}]",
        )
        _check(isinstance(self.per_layer, dict), "per_layer", self.per_layer, "must be a mapping")
        for name, b in self.per_layer.items():
            _check(
                _valid_bits(b),
                f"per_layer['{name}']",
                b,
                f"bits must be an integer in [1, {MAX_BITS}]",
            )
        _check(self.init in INITS, "init", self.init, f"must be one of {INITS}")
        _check(
            self.centroid_grad in CENTROID_GRADS,
            "centroid_grad",
            self.centroid_grad,
            f"must be one of {CENTROID_GRADS} ('sum' is the paper's rule, 'mean' divides it "
            "by the cluster size)",
        )
        _check(
            isinstance(self.max_iter, int) and self.max_iter >= 1,
            "max_iter",
            self.max_iter,
            "must be an integer >= 1",
        )

    @classmethod
    def from_policy(cls, policy: Policy) -> KMeansConfig:
        """``per_layer`` bits of a :class:`~nncompress.core.Policy` (a searched policy)."""
        if not policy.bits:
            raise ConfigError("policy.bits is empty: this policy shares no weights")
        return cls(per_layer=dict(policy.bits))

    def bits_for(self, name: str, module: nn.Module) -> int:
        if name in self.per_layer:
            return self.per_layer[name]
        for pattern, b in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return b
        base = _type_before(module)
        if issubclass(base, nn.Embedding):
            return self.bits_embedding
        return self.bits_conv if issubclass(base, nn.modules.conv._ConvNd) else self.bits_fc


class SharedWeight(nn.Module):
    """Parametrization ``weight = where(mask, codebook[indices], 0)``.

    ``codebook`` ``(k,)`` is a trainable parameter; ``indices`` (int64, the weight's shape) and
    ``mask`` (bool) are fixed buffers. Indexing a parameter back-propagates by scatter-add, so
    with ``centroid_grad='sum'`` ``codebook.grad[j] = sum of dL/dW over the unmasked weights
    with index j`` — Deep Compression's centroid gradient, literally. With ``'mean'`` (the
    default) the gradient is divided by the cluster size, i.e. the average of the weights'
    gradients (as Stock et al. 2019 update codewords): the summed step is ~1000x a weight's step
    for clusters of ~1000 weights and made SGD diverge when fine-tuning LeNet-5's centroids at
    the weights' learning rate (91.84% -> 32.04%, benchmarks/deep_compression.py). The forward
    value is identical in both modes. ``torch.where`` (not a product) keeps pruned entries +0.0.
    The input (the previous value of the weight) is ignored.
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        indices: torch.Tensor,
        mask: torch.Tensor,
        centroid_grad: str = "mean",
    ) -> None:
        super().__init__()
        if indices.shape != mask.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and mask {tuple(mask.shape)} differ")
        if centroid_grad not in CENTROID_GRADS:
            raise ValueError(f"centroid_grad={centroid_grad!r}: must be one of {CENTROID_GRADS}")
        self.centroid_grad = centroid_grad
        self.codebook = nn.Parameter(codebook.detach().clone())  # (k,)
        self.register_buffer("indices", indices.detach().to(torch.int64).clone())  # weight shape
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())  # weight shape

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codebook = self.codebook  # (k,)
        if self.centroid_grad == "mean" and codebook.requires_grad:
            counts = torch.bincount(self.indices[self.mask], minlength=codebook.numel())  # (k,)
            scale = 1.0 / counts.clamp(min=1).to(codebook.dtype)  # (k,)
            # value exactly codebook (x + 0 == x); gradient scaled by 1 / cluster size
            codebook = codebook.detach() + (codebook - codebook.detach()) * scale
        shared = codebook[self.indices]  # (weight shape)
        return torch.where(self.mask, shared, torch.zeros((), dtype=shared.dtype))

    @property
    def k(self) -> int:
        return int(self.codebook.numel())

    def storage_hint(self) -> dict[str, Any]:
        """For :func:`nncompress.io.save_compressed`: at most ``k`` distinct values, so the
        codebook scheme applies even above its default 256-value limit."""
        return {"scheme": "codebook", "k": self.k}


@dataclass
class LayerShareReport:
    """What :func:`share_weights_` did to one layer."""

    name: str
    n_weights: int
    n_nonzero: int
    bits: int
    k: int
    inertia: float
    compression_rate: float  # r of eq. 2 for the surviving weights (fp32 originals)


@dataclass
class ShareReport:
    layers: list[LayerShareReport] = field(default_factory=list)
    coverage: CoverageReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": [vars(r) for r in self.layers]}
        if self.coverage is not None:
            out["coverage"] = self.coverage.to_dict()
        return out


def _shareable(m: nn.Module) -> bool:
    """Linear, Conv, Embedding, or a Hugging Face Conv1D (recognised without importing it)."""
    base = _type_before(m)
    if issubclass(base, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
        return True
    return base.__name__ == "Conv1D" and hasattr(m, "nf")


def _type_before(m: nn.Module) -> type:
    return parametrize.type_before_parametrizations(m)


def _candidates(model: nn.Module, filter: Selectable) -> list[tuple[str, nn.Module]]:
    return list((SHAREABLE & filter).select(model).items())


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """The :class:`SharedWeight` parametrization of every shared layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, SharedWeight):
                    out[name] = p
    return out


def _install(
    module: nn.Module,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
    centroid_grad: str = "mean",
):
    p = SharedWeight(codebook.to(module.weight.dtype), indices, mask, centroid_grad)
    p = p.to(module.weight.device)
    # Composes after any existing parametrization (e.g. a pruning mask): mask, then codebook.
    parametrize.register_parametrization(module, "weight", p)
    # The stored original no longer influences the output: keep it out of training.
    module.parametrizations["weight"].original.requires_grad_(False)
    return p


def _share_layer(
    name: str, m: nn.Module, cfg: KMeansConfig, bits: int
) -> tuple[LayerShareReport, SharedWeight]:
    """Cluster one layer's surviving weights and install its :class:`SharedWeight`."""
    with torch.no_grad():
        w = m.weight.detach()  # effective weight (after any pruning mask)
    mask = w != 0  # the mask wins: zeros are pruned, not a cluster
    survivors = w[mask]  # (nnz,)
    k = 2**bits
    if survivors.numel() == 0:
        codebook = torch.zeros(k, dtype=w.dtype)
        indices = torch.zeros_like(w, dtype=torch.int64)
        inertia = 0.0
    else:
        q = KMeansQuantizer(bits, cfg.init, cfg.max_iter, random_state=cfg.seed)
        q.fit(survivors)
        codebook = q.codebook_
        indices = torch.zeros(w.shape, dtype=torch.int64)
        indices[mask.cpu()] = q.labels_
        inertia = q.inertia_
    p = _install(m, codebook, indices, mask, cfg.centroid_grad)
    nnz = int(mask.sum())
    log.info("shared %s: %d weights -> %d values (%d bits)", name, nnz, k, bits)
    report = LayerShareReport(
        name=name,
        n_weights=w.numel(),
        n_nonzero=nnz,
        bits=bits,
        k=k,
        inertia=inertia,
        compression_rate=sharing_compression_rate(max(nnz, 1), k),
    )
    return report, p


def share_weights_(
    model: nn.Module,
    config: KMeansConfig | Policy | None = None,
    *,
    filter: Selectable = None,  # noqa: A002 - torchao-style keyword
    progress: Progress | None = None,
) -> ShareReport:
    """Replace the weights of each selected layer by shared values, in place.

    Per layer (Han et al. 2016, section 3): the surviving weights ``W[W != 0]`` are clustered
    by :func:`kmeans_1d` into ``k = 2**b`` centroids (``b`` from ``config``); a
    :class:`SharedWeight` parametrization then computes ``weight = codebook[indices] * mask``.
    Pruned (zero) weights are not clustered and stay exactly zero. Layers already shared are
    skipped. Fine-tune afterwards (e.g. :func:`nncompress.engine.finetune`): only the codebooks,
    biases and other unshared parameters remain trainable.

    Parameters
    ----------
    config : :class:`KMeansConfig`, or a :class:`~nncompress.core.Policy` (its per-layer bits,
        e.g. from a policy search; only the layers it names are shared).
    filter : which layers (a :class:`~nncompress.core.LayerSelector`, a predicate
        ``(name, module) -> bool`` or names/globs), among the Linear, Conv, Embedding and
        Hugging Face Conv1D layers (default: all). Layers sharing one weight (tied) share one
        codebook.
    """
    if isinstance(config, Policy):
        config = KMeansConfig.from_policy(config)
        filter = LayerSelector(names=sorted(config.per_layer)) & filter
    cfg = config or KMeansConfig()
    layers = _candidates(model, filter)
    names = {n for n, _ in layers}
    unknown = sorted(
        k
        for k in cfg.per_layer
        if k not in names and not any(fnmatch.fnmatchcase(n, k) for n in names)
    )
    if unknown:
        raise ConfigError(
            f"per_layer names {unknown} are not shareable layers of the model (nor patterns "
            f"matching one); allowed: {sorted(names)}"
        )
    tied = _tied_with(layers)
    by_name = dict(layers)
    tied_bits: dict[str, int] = {}
    for name, others in tied.items():
        if others:
            tied_bits[name] = _tied_group_bits(cfg, [name, *others], by_name)
    already = shared_layers(model)
    tied_done: dict[str, str] = {}
    report = ShareReport()
    with progress_task(progress, "share", len(layers)) as task:
        for i, (name, m) in enumerate(layers):
            if name in already:
                log.info("layer %s is already shared: skipped", name)
                continue
            twin = next((o for o in tied.get(name, []) if o in already), None)
            if twin is not None:  # tied to a layer shared a moment ago: same parametrization
                _install_same(m, already[twin])
                already[name] = already[twin]
                tied_done[name] = twin
                log.info("layer %s is tied to %s: shares its codebook", name, twin)
                continue
            bits = tied_bits.get(name) or cfg.bits_for(name, m)
            rep, already[name] = _share_layer(name, m, cfg, bits)
            report.layers.append(rep)
            task.advance(i + 1, layer=name)
    changed = {r.name: f"{r.bits} bits" for r in report.layers}
    changed.update({n: f"tied to {t}" for n, t in tied_done.items()})
    skipped = {
        n: "not selected by the layer filter"
        for n, m in model.named_modules()
        if n and _shareable(m) and n not in names
    }
    skipped.update({n: "already shared" for n in names if n not in changed})
    report.coverage = coverage_report("share", model, changed, skipped)
    report.coverage.warn()
    return report


def _tied_with(layers: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """For each layer whose weight tensor another selected layer also holds (a tied embedding
    and LM head), the names of those other layers."""
    by_id: dict[int, list[str]] = {}
    for name, m in layers:
        w = (
            m.parametrizations["weight"].original
            if parametrize.is_parametrized(m, "weight")
            else m.weight
        )
        by_id.setdefault(id(w), []).append(name)
    return {n: [o for o in group if o != n] for group in by_id.values() for n in group}


def _tied_group_bits(cfg: KMeansConfig, names: list[str], modules: dict) -> int:
    """Bits of layers sharing one weight: their explicit per_layer bits (which must agree),
    else ``bits_embedding`` when one of them is an embedding, else the first one's default."""
    explicit = set()
    for n in names:
        if n in cfg.per_layer:
            explicit.add(cfg.per_layer[n])
        else:
            hit = next((b for p, b in cfg.per_layer.items() if fnmatch.fnmatchcase(n, p)), None)
            if hit is not None:
                explicit.add(hit)
    if len(explicit) > 1:
        raise ConfigError(
            f"layers {names} share one weight (tied) but per_layer gives them different bits "
            f"{sorted(explicit)}; give them the same bits"
        )
    if explicit:
        return explicit.pop()
    if any(issubclass(_type_before(modules[n]), nn.Embedding) for n in names):
        return cfg.bits_embedding
    return cfg.bits_for(names[0], modules[names[0]])


def _install_same(module: nn.Module, p: SharedWeight) -> None:
    """Register an existing :class:`SharedWeight` on ``module`` too (tied weights stay tied)."""
    parametrize.register_parametrization(module, "weight", p)
    module.parametrizations["weight"].original.requires_grad_(False)


def share_from_values_(
    model: nn.Module,
    *,
    max_values: int = REBUILD_MAX_VALUES,
    filter: Selectable = None,  # noqa: A002
    centroid_grad: str = "mean",
) -> list[str]:
    """Rebuild the shared-weight parametrization from weights that take few distinct values.

    Checkpoints fold parametrizations into plain weights; a layer whose nonzero weights take at
    most ``max_values`` distinct values is turned back into ``codebook[indices] * mask`` with
    the codebook = those values (ascending) and the mask = nonzeros. The effective weights are
    unchanged bit for bit. Layers already shared, or with more distinct values, are left alone.
    Returns the names of the layers that were rebuilt.
    """
    already = shared_layers(model)
    done = []
    for name, m in _candidates(model, filter):
        if name in already:
            continue
        with torch.no_grad():
            w = m.weight.detach()
        mask = w != 0
        values, inverse = torch.unique(w[mask], sorted=True, return_inverse=True)
        if values.numel() == 0 or values.numel() > max_values:
            continue
        indices = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
        indices[mask] = inverse
        _install(m, values, indices, mask, centroid_grad)
        done.append(name)
    return done
