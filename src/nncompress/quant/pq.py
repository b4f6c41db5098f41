"""Product quantization with an activation objective (Stock et al., ICLR 2020, "And the Bit Goes
Down: Revisiting the Quantization of Neural Networks", arXiv:1907.05686).

A layer's weight ``W`` (``C_out`` rows; a conv's row is its ``C_in/groups * k_h * k_w`` kernel
values in ``F.unfold`` order) is cut into subvectors of ``d`` consecutive values of a row
(``d`` = 9 is one 3x3 kernel, the paper's "small blocks"; 18 / 8 the "large blocks"). One
codebook of ``k`` codewords of size ``d`` is learned per layer; each subvector stores the
``log2(k)``-bit index of its codeword. The codebook does not minimise ``||W - W_hat||^2`` but
the reconstruction of the layer's *output* on in-domain inputs ``X`` (``N`` rows of the
layer's unfolded input), ``||X W^T - X W_hat^T||^2``.

Writing ``X_s`` for the ``d`` columns of ``X`` a subvector ``v_j`` multiplies (``s = s(j)``:
its group and its block of the row) and ``H_s = X_s^T X_s`` (``d x d``), we minimise

.. math::

    J(C, a) = \\sum_j \\| X_{s(j)} (v_j - c_{a_j}) \\|^2
            = \\sum_j (v_j - c_{a_j})^T H_{s(j)} (v_j - c_{a_j}),

the output error without the cross terms between blocks (they couple all assignments; the
paper drops them too). ``metric='shared'`` replaces every ``H_s`` by their sum, as the
reference code of the paper does by stacking the blocks' inputs into one ``(N m, d)`` matrix;
``metric='block'`` (default) keeps one ``H_s`` per block, which is closer to the true output
error for the same cost. With no ``X`` every ``H_s`` is the identity: plain k-means of the
subvectors (the weight-space ablation).

EM (Stock et al., section 3.2):

* E-step: exhaustive assignment ``a_j = argmin_c (v_j - c)^T H_{s(j)} (v_j - c)``.
* M-step: each codeword is the least-squares solution over its members,
  ``c = argmin sum_{j in c} ||X_s(j) c - X_s(j) v_j||^2 = pinv(sum H_s(j)) (sum H_s(j) v_j)``
  (the normal equations of the stacked system, solved in float64 through the pseudo-inverse).
* An empty cluster is re-seeded by splitting the most populated one: its members are cut in
  two halves along their principal direction and the empty codeword takes one half.

Both steps, the re-seeding included, never increase ``J`` (each codeword is optimal for its
members, so moving members to a new codeword fitted to them cannot cost more); the test suite
checks it.

Three API layers: :func:`pq_em` (tensor function), :class:`ProductQuantizer` (estimator) and
:func:`nncompress.quant.pq_transform.pq_quantize_` (model transform), which installs
:class:`PQWeight` parametrizations ``weight = gather(codebook, assignments)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "INITS",
    "METRICS",
    "MAX_K",
    "OBJECTIVES",
    "PQFit",
    "PQWeight",
    "ProductQuantizer",
    "block_grams",
    "k_for_budget",
    "layer_rows",
    "output_error",
    "pq_bits",
    "pq_em",
    "pq_em_grams",
    "reconstruct",
    "subvectors",
]

INITS = ("kmeans++", "random")
METRICS = ("block", "shared")
OBJECTIVES = ("activation", "weight")
MAX_K = 1 << 16
_CHUNK = 1 << 22  # elements of a temporary (rows x k or rows x d x d) per chunk


# --------------------------------------------------------------------------------------------
# Layer 1: tensor functions
# --------------------------------------------------------------------------------------------


def _rows_of(w: torch.Tensor) -> torch.Tensor:
    """``W`` as ``(C_out, L)``: one row per output channel (a conv's kernel in unfold order)."""
    if w.dim() < 2:
        raise ValueError(f"W of shape {tuple(w.shape)}: needs at least 2 dims (C_out, ...)")
    return w.reshape(w.shape[0], -1)


def subvectors(w: torch.Tensor, d: int) -> torch.Tensor:
    """Cut each row of ``W`` into subvectors of ``d`` consecutive values.

    Parameters
    ----------
    w : ``(C_out, L)`` matrix, or a conv weight ``(C_out, C_in/groups, k_h, k_w)`` whose row
        ``C_in/groups * k_h * k_w`` is laid out as ``F.unfold`` lays out its input patches.
    d : block size; must divide ``L``.

    Returns
    -------
    ``(C_out * L / d, d)``: subvector ``j = o * (L/d) + b`` is ``row_o[b*d : (b+1)*d]``.
    """
    rows = _rows_of(w)  # (C_out, L)
    L = rows.shape[1]
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or L % d:
        raise ValueError(f"block size d={d!r}: must be a positive divisor of the row length {L}")
    return rows.reshape(-1, d)  # (C_out*L/d, d)


def reconstruct(
    codebook: torch.Tensor, assignments: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """``W_hat = codebook[assignments]`` reshaped to ``shape``; assignment ``-1`` (a pruned,
    all-zero block) gives zeros."""
    k, d = codebook.shape
    table = torch.cat([codebook, codebook.new_zeros(1, d)])  # (k+1, d)
    idx = torch.where(assignments < 0, k, assignments)  # (n,)
    return table[idx].reshape(shape)


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of a Linear or Conv2d as the rows ``X`` of its output's matrix product.

    Linear: ``(N, in_features)`` (leading dims flattened). Conv2d: ``(B * P, C_in * k_h * k_w)``
    (``P`` output positions), the patches ``F.unfold`` extracts after the module's own padding
    (any ``padding_mode``, ``padding='same'``), so ``y[:, o] = X_g @ W[o]`` with ``X_g`` the
    ``C_in/groups * k_h * k_w`` columns of ``o``'s group.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"layer_rows: {type(module).__name__} is not a Linear or a Conv2d")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = nn.functional.pad(x, pad, mode=mode)
    cols = nn.functional.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride
    )  # (B, C_in*k_h*k_w, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*P, C_in*k_h*k_w)


def block_grams(x: torch.Tensor, d: int, groups: int = 1) -> torch.Tensor:
    """Per-block Gram matrices ``H[g, b] = X_{g,b}^T X_{g,b}`` in float64.

    Parameters
    ----------
    x : ``(N, groups * L)`` input rows (see :func:`layer_rows`).
    d : block size (divides ``L``).

    Returns
    -------
    ``(groups, L/d, d, d)``.
    """
    if x.dim() != 2 or x.shape[1] % groups:
        raise ValueError(f"X of shape {tuple(x.shape)}: must be (N, groups * L), groups={groups}")
    L = x.shape[1] // groups
    if d < 1 or L % d:
        raise ValueError(f"block size d={d}: must divide the row length {L}")
    xb = x.detach().to(torch.float64).reshape(x.shape[0], groups, L // d, d)  # (N, G, m, d)
    return torch.einsum("ngmd,ngme->gmde", xb, xb)  # (G, m, d, d)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor, groups: int = 1) -> float:
    """The true output error ``||X W^T - X W_hat^T||^2`` (per group), cross terms included."""
    diff = _rows_of(w - w_hat).to(torch.float64)  # (C_out, L)
    xg = x.detach().to(torch.float64).reshape(x.shape[0], groups, -1)  # (N, G, L)
    dg = diff.reshape(groups, -1, diff.shape[1])  # (G, C_out/G, L)
    return float(torch.einsum("ngl,gol->ngo", xg, dg).pow(2).sum())


def pq_bits(
    n_subvectors: int, k: int, d: int, *, zero_code: bool = False, codeword_bits: int = 16
) -> int:
    """Fixed-width size in bits of a PQ layer: ``ceil(log2(k + zero_code))`` bits per index plus
    the codebook (``k * d`` values of ``codeword_bits``, fp16 by default; Stock et al. 3.3)."""
    alphabet = k + int(zero_code)
    return n_subvectors * max(0, alphabet - 1).bit_length() + k * d * codeword_bits


def k_for_budget(
    n_subvectors: int,
    d: int,
    bits_per_weight: float,
    *,
    max_k: int = 256,
    min_per_codeword: int = 4,
    zero_code: bool = False,
) -> int:
    """The largest power-of-two ``k`` whose index bits plus fp16 codebook fit the budget.

    ``pq_bits(n, k, d) <= bits_per_weight * n * d``, ``k <= max_k`` and
    ``k <= n_subvectors / min_per_codeword`` (a codeword must stand for a few subvectors: the
    reference implementation's threshold is 4). Returns 0 when not even ``k = 2`` fits.
    """
    budget = bits_per_weight * n_subvectors * d
    best, k = 0, 2
    while k <= min(max_k, n_subvectors // max(1, min_per_codeword)):
        if pq_bits(n_subvectors, k, d, zero_code=zero_code) <= budget:
            best = k
        k *= 2
    return best


def _metric_index(c_out: int, m: int, groups: int, device) -> torch.Tensor:
    """Block index ``s(j) = group(o) * m + b`` of subvector ``j = o * m + b``."""
    o = torch.arange(c_out, device=device).repeat_interleave(m)  # (C_out*m,)
    b = torch.arange(m, device=device).repeat(c_out)  # (C_out*m,)
    return (o // (c_out // groups)) * m + b


def _apply_metric(h: torch.Tensor, midx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H[midx[j]] @ v[j]`` for every row, in chunks (never ``n x d x d`` at once)."""
    if h.shape[0] == 1:
        return v @ h[0].T  # (n, d)
    d = v.shape[1]
    out = torch.empty_like(v)
    step = max(1, _CHUNK // (d * d))
    for i in range(0, v.shape[0], step):
        out[i : i + step] = torch.einsum("nde,ne->nd", h[midx[i : i + step]], v[i : i + step])
    return out


def _assign(
    v_h: torch.Tensor, c: torch.Tensor, h: torch.Tensor, midx: torch.Tensor
) -> torch.Tensor:
    """E-step: ``argmin_c c^T H_s c - 2 c^T H_s v`` (the constant ``v^T H_s v`` dropped)."""
    chc = ((c @ h) * c).sum(-1)  # (S, k): c^T H_s c
    n, k = v_h.shape[0], c.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=v_h.device)
    step = max(1, _CHUNK // max(1, k))
    for i in range(0, n, step):
        dist = chc[midx[i : i + step]] - 2.0 * (v_h[i : i + step] @ c.T)  # (rows, k)
        out[i : i + step] = dist.argmin(1)
    return out


def _normal_equations(a, v_h, h, midx, k):
    """Per codeword ``A_c = sum_{j in c} H_s(j)`` ``(k, d, d)`` and ``r_c = sum H_s(j) v_j``."""
    s, d = h.shape[0], h.shape[1]
    counts = torch.zeros(k * s, dtype=h.dtype, device=h.device)
    counts.index_add_(0, a * s + midx, torch.ones_like(a, dtype=h.dtype))
    big_a = (counts.reshape(k, s) @ h.reshape(s, d * d)).reshape(k, d, d)  # (k, d, d)
    r = torch.zeros(k, d, dtype=h.dtype, device=h.device).index_add_(0, a, v_h)  # (k, d)
    return big_a, r


def _cluster_cost(c: torch.Tensor, big_a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``c^T A c - 2 c^T r`` per codeword (the cluster's J without its constant ``v^T H v``)."""
    return torch.einsum("kd,kde,ke->k", c, big_a, c) - 2.0 * (c * r).sum(-1)


def _m_step(c_old, a, v_h, h, midx):
    """M-step through the pseudo-inverse; a codeword keeps its old value if (numerically) the
    solve is not better for its members, so J never increases. Returns (codebook, J - const)."""
    big_a, r = _normal_equations(a, v_h, h, midx, c_old.shape[0])
    c_new = (torch.linalg.pinv(big_a, hermitian=True) @ r.unsqueeze(-1)).squeeze(-1)  # (k, d)
    cost_new = _cluster_cost(c_new, big_a, r)
    cost_old = _cluster_cost(c_old, big_a, r)
    better = cost_new <= cost_old
    c = torch.where(better.unsqueeze(-1), c_new, c_old)
    return c, float(torch.where(better, cost_new, cost_old).sum())


def _reseed(a: torch.Tensor, v: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Give every empty cluster half of the most populated one (split along its principal
    direction in weight space, at the median). Returns (assignments, clusters re-seeded)."""
    counts = torch.bincount(a, minlength=k)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    done = 0
    for e in empty:
        big = int(counts.argmax())
        if counts[big] < 2:
            break
        members = torch.nonzero(a == big).flatten()  # (n_big,)
        pts = v[members] - v[members].mean(0)  # (n_big, d)
        _, vecs = torch.linalg.eigh(pts.T @ pts)  # ascending eigenvalues
        proj = pts @ vecs[:, -1]  # (n_big,) along the principal direction
        half = members[torch.argsort(proj, stable=True)[: len(members) // 2]]
        a[half] = e
        counts[e] = len(half)
        counts[big] -= len(half)
        done += 1
    return a, done


def _init(v: torch.Tensor, k: int, init, gen: torch.Generator) -> torch.Tensor:
    """Initial codebook: ``k`` distinct random subvectors, greedy k-means++ in weight space
    (Arthur & Vassilvitskii 2007: each next seed drawn with probability proportional to its
    squared distance to the nearest seed so far; "greedy": of ``2 + ln k`` such draws, the one
    that lowers the total squared distance most, as scikit-learn does), or a ``(k, d)`` tensor.
    """
    if isinstance(init, torch.Tensor):
        return init.detach().to(device=v.device, dtype=v.dtype).clone()
    n = v.shape[0]
    if init == "random":
        return v[torch.randperm(n, generator=gen, device="cpu")[:k].to(v.device)].clone()
    trials = 2 + int(math.log(k))  # greedy k-means++: best of a few candidates per seed
    first = int(torch.randint(n, (1,), generator=gen))
    c = [v[first]]
    d2 = (v - v[first]).pow(2).sum(1)  # (n,)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            cand = torch.multinomial((d2 / total).cpu(), trials, replacement=True, generator=gen)
        else:  # every point already a seed: duplicates (re-seeding splits them later)
            cand = torch.randint(n, (1,), generator=gen)
        cand = cand.to(v.device)
        new_d2 = torch.minimum(d2, torch.cdist(v[cand], v).pow(2))  # (trials, n)
        best = int(new_d2.sum(1).argmin())
        c.append(v[cand[best]])
        d2 = new_d2[best]
    return torch.stack(c)  # (k, d)


class PQFit(NamedTuple):
    """Result of :func:`pq_em`: ``codebook`` ``(k, d)``, ``assignments`` ``(n_subvectors,)``
    (``-1`` = all-zero block left out), ``objective`` (``J`` after each iteration), ``n_iter``,
    ``reseeded`` (empty clusters re-seeded over all iterations)."""

    codebook: torch.Tensor
    assignments: torch.Tensor
    objective: list[float]
    n_iter: int
    reseeded: int


def _check_em_args(k, n_iter, init, metric) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k={k!r}: must be an integer in [1, {MAX_K}]")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"iters={n_iter!r}: must be an integer >= 1")
    if isinstance(init, torch.Tensor):
        if init.dim() != 2 or init.shape[0] != k:
            raise ValueError(f"init of shape {tuple(init.shape)}: a tensor init must be (k={k}, d)")
    elif init not in INITS:
        raise ValueError(f"init={init!r}: must be one of {INITS} or a (k, d) tensor")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: must be one of {METRICS}")


def pq_em_grams(
    w: torch.Tensor,
    grams: torch.Tensor | None,
    k: int,
    d: int,
    iters: int = 20,
    *,
    groups: int = 1,
    metric: str = "block",
    init: str | torch.Tensor = "kmeans++",
    seed: int = 0,
    zero_blocks: bool = False,
) -> PQFit:
    """:func:`pq_em` from precomputed block Gram matrices ``(groups, L/d, d, d)`` (``None``:
    the weight-space objective). The model transform accumulates the Grams batch by batch."""
    _check_em_args(k, iters, init, metric)
    v = subvectors(w.detach(), d).to(torch.float64)  # (n, d)
    c_out, L = _rows_of(w).shape
    m = L // d
    if groups < 1 or c_out % groups:
        raise ValueError(f"groups={groups}: must divide C_out={c_out}")
    if grams is None:
        h = torch.eye(d, dtype=torch.float64, device=v.device).unsqueeze(0)  # (1, d, d)
        midx = torch.zeros(v.shape[0], dtype=torch.int64, device=v.device)
    else:
        if tuple(grams.shape) != (groups, m, d, d):
            raise ValueError(
                f"grams of shape {tuple(grams.shape)}: expected {(groups, m, d, d)} "
                f"(groups, L/d, d, d)"
            )
        h = grams.to(device=v.device, dtype=torch.float64).reshape(groups * m, d, d)
        midx = _metric_index(c_out, m, groups, v.device)  # (n,)
        if metric == "shared":
            h = h.sum(0, keepdim=True)  # (1, d, d): Stock et al.'s stacked blocks
            midx = torch.zeros_like(midx)
    active = (
        v.ne(0).any(1) if zero_blocks else torch.ones(len(v), dtype=torch.bool, device=v.device)
    )
    va, ma = v[active], midx[active]  # (n_active, d), (n_active,)
    if va.shape[0] < k:
        raise ValueError(
            f"k={k}: more codewords than the {va.shape[0]} subvectors to quantize"
            + (" (all-zero blocks excluded)" if zero_blocks else "")
        )
    gen = torch.Generator().manual_seed(int(seed))
    v_h = _apply_metric(h, ma, va)  # (n_active, d): H_s v
    const = float((va * v_h).sum())  # sum_j v^T H_s v
    c = _init(va, k, init, gen)  # (k, d)
    objective: list[float] = []
    a_prev, reseeded, it = None, 0, 0
    for it in range(1, iters + 1):  # noqa: B007 - reported
        a = _assign(v_h, c, h, ma)  # E-step
        a, r = _reseed(a, va, k)
        reseeded += r
        c, cost = _m_step(c, a, v_h, h, ma)  # M-step
        objective.append(max(0.0, cost + const))
        if a_prev is not None and torch.equal(a, a_prev):
            break
        a_prev = a.clone()
    assignments = torch.full((v.shape[0],), -1, dtype=torch.int64, device=v.device)
    assignments[active] = a
    dtype = w.dtype if w.is_floating_point() else torch.float32
    return PQFit(c.to(dtype), assignments, objective, it, reseeded)


def pq_em(
    w: torch.Tensor,
    x: torch.Tensor | None,
    k: int,
    d: int,
    iters: int = 20,
    *,
    groups: int = 1,
    metric: str = "block",
    init: str | torch.Tensor = "kmeans++",
    seed: int = 0,
    zero_blocks: bool = False,
) -> PQFit:
    """Product quantization of ``W`` minimising the output error on inputs ``X`` (EM).

    Minimises ``J = sum_j ||X_s(j) (v_j - c_a(j))||^2`` (module docstring; Stock et al. 2020,
    eq. 3) over a codebook ``C`` of ``k`` codewords of size ``d`` and the assignments ``a``.

    Parameters
    ----------
    w : ``(C_out, L)`` or a conv weight ``(C_out, C_in/groups, k_h, k_w)``.
    x : ``(N, groups * L)`` input rows (:func:`layer_rows`), or ``None`` for the weight-space
        objective ``||W - W_hat||^2`` (plain k-means of the subvectors).
    k : number of codewords (<= number of subvectors, <= 65536).
    d : block size, dividing ``L``.
    iters : maximum EM iterations (stops early when no assignment changes).
    groups : the conv's groups (output channel ``o`` sees the inputs of its group).
    metric : ``'block'`` (one Gram per block) or ``'shared'`` (their sum, as the reference code).
    init : ``'kmeans++'``, ``'random'`` (distinct subvectors), seeded by ``seed``, or a ``(k, d)``
        tensor (the initial codebook, e.g. to compare with another implementation).
    zero_blocks : leave all-zero subvectors (pruned blocks) out: assignment ``-1``.
    """
    grams = None if x is None else block_grams(x, d, groups)
    return pq_em_grams(
        w,
        grams,
        k,
        d,
        iters,
        groups=groups,
        metric=metric,
        init=init,
        seed=seed,
        zero_blocks=zero_blocks,
    )


# --------------------------------------------------------------------------------------------
# Layer 2: estimator
# --------------------------------------------------------------------------------------------


class ProductQuantizer:
    """Product quantization of one weight as an estimator (scikit-learn conventions).

    ``ProductQuantizer(k=256, block_size=9).fit(W, X)`` learns ``codebook_`` ``(k, d)``,
    ``assignments_`` ``(n_subvectors,)`` (``-1``: an all-zero block with ``zero_blocks``) and
    ``objective_`` (``J`` after each EM iteration, non-increasing), ``n_iter_``. With
    ``objective='weight'`` ``X`` is ignored (plain k-means of the subvectors).
    """

    def __init__(
        self,
        k: int = 256,
        block_size: int = 9,
        *,
        objective: str = "activation",
        metric: str = "block",
        n_iter: int = 20,
        init: str | torch.Tensor = "kmeans++",
        groups: int = 1,
        zero_blocks: bool = False,
        random_state: int = 0,
    ) -> None:
        self.k = k
        self.block_size = block_size
        self.objective = objective
        self.metric = metric
        self.n_iter = n_iter
        self.init = init
        self.groups = groups
        self.zero_blocks = zero_blocks
        self.random_state = random_state

    def fit(self, w: torch.Tensor, x: torch.Tensor | None = None) -> ProductQuantizer:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: must be one of {OBJECTIVES}")
        if self.objective == "activation" and x is None:
            raise ValueError("objective='activation' needs the input rows X (fit(W, X))")
        res = pq_em(
            w,
            x if self.objective == "activation" else None,
            self.k,
            self.block_size,
            self.n_iter,
            groups=self.groups,
            metric=self.metric,
            init=self.init,
            seed=self.random_state,
            zero_blocks=self.zero_blocks,
        )
        self.shape_ = tuple(w.shape)
        self.codebook_ = res.codebook
        self.assignments_ = res.assignments
        self.objective_ = res.objective
        self.n_iter_ = res.n_iter
        return self

    def reconstruct(self) -> torch.Tensor:
        """``W_hat`` in the fitted weight's shape."""
        return reconstruct(self.codebook_, self.assignments_, self.shape_)

    def bits(self) -> int:
        """Fixed-width size: indices at ``ceil(log2 k)`` bits plus an fp16 codebook."""
        zero = bool((self.assignments_ < 0).any())
        return pq_bits(len(self.assignments_), self.k, self.block_size, zero_code=zero)


# --------------------------------------------------------------------------------------------
# The parametrization the model transform installs
# --------------------------------------------------------------------------------------------


class PQWeight(nn.Module):
    """Parametrization ``weight = gather(codebook, assignments)`` reshaped to the layer's shape.

    ``codebook`` ``(k, d)`` is a trainable parameter, ``assignments`` ``(n_subvectors,)`` a fixed
    int64 buffer (``-1``: an all-zero pruned block, which stays exactly zero). Autograd gives a
    codeword the *sum* of the gradients of the subvectors assigned to it. Stock et al. (3.3)
    update a codeword with the *average* of those gradients; with ``centroid_grad='mean'``
    (default) the backward pass divides each codeword's gradient by its cluster size (the
    forward value is unchanged), so the learning rate means the same for a codeword of 4
    subvectors and one of 4000. ``'sum'`` keeps autograd's sum (equivalently, divide the
    learning rate yourself). The previous value of the weight is ignored.
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        assignments: torch.Tensor,
        shape: tuple[int, ...],
        centroid_grad: str = "mean",
    ) -> None:
        super().__init__()
        if centroid_grad not in ("mean", "sum"):
            raise ValueError(f"centroid_grad={centroid_grad!r}: must be 'mean' or 'sum'")
        k, d = codebook.shape
        if assignments.numel() * d != math.prod(shape):
            raise ValueError(
                f"{assignments.numel()} assignments x d={d} do not fill the shape {tuple(shape)}"
            )
        if assignments.numel() and (int(assignments.max()) >= k or int(assignments.min()) < -1):
            raise ValueError(f"assignments must lie in [-1, {k})")
        self.shape = tuple(int(s) for s in shape)
        self.centroid_grad = centroid_grad
        self.codebook = nn.Parameter(codebook.detach().clone())  # (k, d)
        self.register_buffer("assignments", assignments.detach().to(torch.int64).clone())

    @property
    def k(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def pq_block_size(self) -> int:
        """``d``; the ``.ncz`` encoder reads it to store the layer with the ``pq`` scheme."""
        return int(self.codebook.shape[1])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codebook = self.codebook  # (k, d)
        if self.centroid_grad == "mean" and codebook.requires_grad:
            a = self.assignments[self.assignments >= 0]
            counts = torch.bincount(a, minlength=self.k).clamp(min=1)  # (k,)
            scale = (1.0 / counts.to(codebook.dtype)).unsqueeze(1)  # (k, 1)
            # value exactly codebook (x + 0 == x); gradient divided by the cluster size
            codebook = codebook.detach() + (codebook - codebook.detach()) * scale
        return reconstruct(codebook, self.assignments, self.shape)

    def extra_repr(self) -> str:
        return f"k={self.k}, d={self.pq_block_size}, subvectors={self.assignments.numel()}"
