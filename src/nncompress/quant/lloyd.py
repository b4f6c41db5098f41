"""1-D k-means for weight sharing (Han et al., ICLR 2016, "Deep Compression", section 3.2):
exact Lloyd iterations on the sorted values (:func:`kmeans_1d`), the same as an estimator
(:class:`KMeansQuantizer`), the rate of sharing alone (:func:`sharing_compression_rate`), and
the sorted-run assignment the weighted variant (:mod:`.awkmeans`) shares."""

from __future__ import annotations

import math

import numpy as np
import torch

INITS = ("linear", "density", "forgy")


def _cuts(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cluster boundaries in the ascending values ``x`` for ascending centroids ``c``: cluster
    ``j`` is ``x[cuts[j]:cuts[j + 1]]`` (values <= a midpoint go left: ties to the lower
    centroid, like argmin). Shape ``(len(c) + 1,)``."""
    mids = 0.5 * (c[1:] + c[:-1])  # (k-1,) decision boundaries
    return np.concatenate(([0], np.searchsorted(x, mids, side="right"), [x.size]))


def _assign(
    x: np.ndarray, order: np.ndarray, c: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final assignment of the ascending values ``x = flat[order]`` to the nearest of the
    centroids ``c``: ``(codebook, labels, sorted_labels)``; the codebook is padded to ``k``
    with copies of the largest centroid when there were fewer values than clusters, labels
    are in ``flat`` order, sorted_labels in ``x`` order."""
    sorted_labels = np.repeat(np.arange(c.size, dtype=np.int64), np.diff(_cuts(x, c)))  # (n,)
    labels = np.empty(x.size, dtype=np.int64)
    labels[order] = sorted_labels
    if c.size < k:
        c = np.concatenate([c, np.full(k - c.size, c[-1])])
    return c, labels, sorted_labels


# --------------------------------------------------------------------------------------------
# The 1-D k-means
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
        cuts = _cuts(x, c)  # (k_eff+1,)
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
    c, labels, sorted_labels = _assign(x, order, c, k)
    inertia = float(np.sum((x - c[sorted_labels]) ** 2))
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
# The estimator
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
