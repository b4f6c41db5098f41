"""Tensor-train (TT-matrix) fully connected layers (Novikov et al., NIPS 2015, "Tensorizing
Neural Networks").

With ``in = n_1 ... n_d`` and ``out = m_1 ... m_d``, the ``in x out`` matrix ``W^T`` of a
Linear layer is stored as ``d`` cores ``G_k (r_{k-1}, n_k, m_k, r_k)`` (``r_0 = r_d = 1``):

    W^T[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]

(indices flattened row-major). Parameters: ``sum_k r_{k-1} n_k m_k r_k`` instead of
``prod n_k m_k``. The forward pass contracts the input with one core at a time and never forms
``W``. The cores are found by TT-SVD (TensorLy's ``tensor_train_matrix``, PyTorch backend set
locally), exact at the full TT ranks ``r_k = min(prod_{i<=k} n_i m_i, prod_{i>k} n_i m_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix
from torch import nn

__all__ = [
    "TTLinear",
    "factorize",
    "tt_cost",
    "tt_full_ranks",
    "tt_linear",
]


def factorize(n: int, d: int) -> list[int]:
    """Split ``n`` into ``d`` integer factors as equal as possible (e.g. 784 -> [4, 7, 4, 7]).

    Prime factors, largest first, go to the currently smallest factor; the result is
    interleaved so that large and small factors alternate. Factors of 1 appear when ``n`` has
    fewer than ``d`` prime factors.
    """
    if n < 1 or d < 1:
        raise ValueError(f"factorize: n={n} and d={d} must be >= 1")
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    buckets = [1] * d
    for q in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= q
    ordered = sorted(buckets)
    lo, hi = ordered[: d // 2], ordered[d // 2 :][::-1]
    out = []
    for i in range(d):
        out.append(hi[i // 2] if i % 2 == 0 else lo[i // 2])
    return out


def tt_full_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> list[int]:
    """Internal TT ranks ``r_1..r_{d-1}`` at which TT-SVD is exact."""
    sizes = [a * b for a, b in zip(in_modes, out_modes, strict=True)]
    return [
        min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)
    ]


def _core_shapes(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    full = [1, *ranks, 1]
    return [(full[k], in_modes[k], out_modes[k], full[k + 1]) for k in range(len(in_modes))]


def tt_cost(
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    bias: bool,
    positions: int | None = 1,
) -> tuple[int, int | None]:
    """``(params, MACs per sample)`` of a :class:`TTLinear` (MACs of the successive contractions).

    Contracting core ``k`` costs ``prod_{i<k} m_i * r_{k-1} n_k m_k r_k * prod_{i>k} n_i``.
    """
    shapes = _core_shapes(in_modes, out_modes, ranks)
    params = sum(math.prod(s) for s in shapes) + (math.prod(out_modes) if bias else 0)
    if positions is None:
        return params, None
    macs = 0
    for k, shape in enumerate(shapes):
        macs += math.prod(out_modes[:k]) * math.prod(shape) * math.prod(in_modes[k + 1 :])
    return params, positions * macs


class TTLinear(nn.Module):
    """Linear layer whose weight is a TT-matrix; ``forward(x)`` for ``x (..., prod(in_modes))``.

    The cores ``core0 .. core{d-1}`` (shapes ``(r_{k-1}, n_k, m_k, r_k)``) and ``bias`` are
    parameters of this module itself. :meth:`spec_kwargs` describes it for checkpoints.

    Parameters
    ----------
    in_modes, out_modes : factorisations ``n_k`` of ``in_features`` and ``m_k`` of
        ``out_features`` (same length ``d >= 1``).
    ranks : the ``d - 1`` internal TT ranks.
    bias : whether the layer has an additive bias.
    """

    def __init__(
        self,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
    ) -> None:
        super().__init__()
        in_modes, out_modes, ranks = (
            [int(v) for v in in_modes],
            [int(v) for v in out_modes],
            [int(v) for v in ranks],
        )
        if not in_modes or len(in_modes) != len(out_modes):
            raise ValueError(
                f"in_modes={in_modes}, out_modes={out_modes}: must be non-empty and of equal length"
            )
        if len(ranks) != len(in_modes) - 1:
            raise ValueError(f"ranks={ranks}: need {len(in_modes) - 1} internal TT ranks")
        if min(in_modes + out_modes) < 1 or (ranks and min(ranks) < 1):
            raise ValueError(
                f"in_modes={in_modes}, out_modes={out_modes}, ranks={ranks}: must all be >= 1"
            )
        self.in_modes, self.out_modes, self.ranks = in_modes, out_modes, ranks
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        for k, shape in enumerate(_core_shapes(in_modes, out_modes, ranks)):
            core = torch.empty(shape)
            # W entries are sums over prod(ranks) products of d core entries: this std gives
            # them variance 1 / in_features (cores are normally overwritten by TT-SVD anyway).
            std = (1.0 / (self.in_features * math.prod(ranks))) ** (0.5 / len(in_modes))
            nn.init.normal_(core, 0.0, std)
            self.register_parameter(f"core{k}", nn.Parameter(core))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features))
        else:
            self.register_parameter("bias", None)

    @property
    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(len(self.in_modes))]

    def spec_kwargs(self) -> dict:
        """Constructor arguments (JSON-able) for :mod:`nncompress.engine.modspec`."""
        return {
            "in_modes": list(self.in_modes),
            "out_modes": list(self.out_modes),
            "ranks": list(self.ranks),
            "bias": self.bias is not None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        b = math.prod(lead)
        # state (B, P = m_1..m_{k-1}, r_{k-1}, n_k, Z = n_{k+1}..n_d)
        t = x.reshape(b, 1, 1, self.in_modes[0], -1)  # (B, 1, 1, n_1, Z)
        for k, core in enumerate(self.cores):
            t = torch.einsum("bprnz,rnms->bpmsz", t, core)  # (B, P, m_k, r_k, Z)
            p = t.shape[1] * t.shape[2]
            if k + 1 < len(self.in_modes):
                t = t.reshape(b, p, t.shape[3], self.in_modes[k + 1], -1)  # (B, P', r_k, n, Z')
        y = t.reshape(*lead, self.out_features)  # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y

    def macs_per_row(self) -> int:
        """Multiply-accumulates of :meth:`forward` for one input row (:func:`tt_cost`)."""
        return tt_cost(self.in_modes, self.out_modes, self.ranks, False, positions=1)[1]

    def full_weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight the cores represent (for checks and analysis)."""
        eye = torch.eye(self.in_features, device=self.core0.device, dtype=self.core0.dtype)
        bias, self.bias = self.bias, None
        try:
            w_t = self.forward(eye)  # (in, out)
        finally:
            self.bias = bias
        return w_t.t()

    def extra_repr(self) -> str:
        return (
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
            f"bias={self.bias is not None}"
        )


def tt_linear(
    linear: nn.Linear,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int] | int,
) -> TTLinear:
    """TT-SVD of ``linear``'s weight into a :class:`TTLinear` (Oseledets 2011; Novikov 2015).

    ``ranks`` is a list of ``d - 1`` internal ranks or one int for all; each is clamped to the
    full TT rank at that position (where TT-SVD is exact).
    """
    in_modes, out_modes = list(in_modes), list(out_modes)
    if math.prod(in_modes) != linear.in_features or math.prod(out_modes) != linear.out_features:
        raise ValueError(
            f"in_modes={in_modes} / out_modes={out_modes}: products must equal in_features="
            f"{linear.in_features} / out_features={linear.out_features}"
        )
    if len(in_modes) != len(out_modes):
        raise ValueError(f"in_modes={in_modes}, out_modes={out_modes}: lengths must match")
    d = len(in_modes)
    full = tt_full_ranks(in_modes, out_modes)
    if isinstance(ranks, int):
        ranks = [ranks] * (d - 1)
    ranks = [min(int(r), f) for r, f in zip(ranks, full, strict=True)]
    w = linear.weight.detach()  # (out, in)
    x = w.t().to("cpu", torch.float64).reshape(*in_modes, *out_modes)  # (n_1..n_d, m_1..m_d)
    with tl.backend_context("pytorch"):
        ttm = tensor_train_matrix(x, rank=[1, *ranks, 1])
    layer = TTLinear(in_modes, out_modes, ranks, bias=linear.bias is not None)
    with torch.no_grad():
        for k, core in enumerate(ttm.factors):  # (r_{k-1}, n_k, m_k, r_k)
            getattr(layer, f"core{k}").copy_(core)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
    return layer.to(device=w.device, dtype=w.dtype)
