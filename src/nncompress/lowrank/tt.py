"""Tensor-train (TT-matrix) fully connected layers (Novikov et al., NIPS 2015, "Tensorizing
Neural Networks") and convolutions (Garipov et al. 2016, "Ultimate tensorization: compressing
convolutional and FC layers alike").

With ``in = n_1 ... n_d`` and ``out = m_1 ... m_d``, the ``in x out`` matrix ``W^T`` of a
Linear layer is stored as ``d`` cores ``G_k (r_{k-1}, n_k, m_k, r_k)`` (``r_0 = r_d = 1``):

    W^T[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ... G_d[:, i_d, j_d, :]

(indices flattened row-major). Parameters: ``sum_k r_{k-1} n_k m_k r_k`` instead of
``prod n_k m_k``. The forward pass contracts the input with one core at a time and never forms
``W``. The cores are found by TT-SVD (TensorLy's ``tensor_train_matrix``, PyTorch backend set
locally), exact at the full TT ranks ``r_k = min(prod_{i<=k} n_i m_i, prod_{i>k} n_i m_i)``.

A convolution is a Linear map applied to every image patch: :class:`TTConv2d` stores its
``(k_h k_w C) x N`` kernel matrix (patches flattened kernel position first, then channel) as a
TT-matrix whose first core is the spatial one (input mode ``k_h k_w``, output mode 1), as
Garipov et al. do, and the others factor the channels; it is applied to the patches of
``F.unfold``. The spatial core first keeps the successive contractions cheap: it reduces the
``k_h k_w`` patch positions to ``r_1`` before any channel core runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import tensor_train_matrix
from torch import nn

from ..engine.modspec import register_module

__all__ = [
    "TTConv2d",
    "TTLinear",
    "factorize",
    "tt_cost",
    "tt_full_ranks",
    "tt_conv",
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


@register_module
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


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_module
class TTConv2d(nn.Module):
    """Conv2d whose ``(k_h k_w C) -> N`` kernel matrix is a :class:`TTLinear` over image patches.

    ``forward(x)`` unfolds ``x (B, C, H, W)`` into patches ``(B, L, k_h k_w C)`` (kernel
    position first, then channel: ``conv.weight.permute(0, 2, 3, 1).reshape(N, -1)``), applies
    the TT-matrix and folds the result to ``(B, N, H_out, W_out)``. Zero padding only, no
    groups.

    Parameters
    ----------
    in_channels : ``C``; ``prod(in_modes)`` must equal ``C k_h k_w``.
    kernel_size, stride, padding, dilation : as for ``nn.Conv2d``.
    in_modes, out_modes, ranks, bias : of the :class:`TTLinear` (``prod(out_modes) = N``).
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int | Sequence[int],
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.in_channels = int(in_channels)
        patch = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        if math.prod(int(v) for v in in_modes) != patch:
            raise ValueError(
                f"in_modes={list(in_modes)}: product must equal in_channels * k_h * k_w = {patch}"
            )
        self.tt = TTLinear(in_modes, out_modes, ranks, bias=bias)
        self.out_channels = self.tt.out_features

    def spec_kwargs(self) -> dict:
        """Constructor arguments (JSON-able) for :mod:`nncompress.engine.modspec`."""
        return {
            "in_channels": self.in_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            **self.tt.spec_kwargs(),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
        )
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B,CK,L)
        k = self.kernel_size[0] * self.kernel_size[1]
        patches = cols.reshape(b, self.in_channels, k, -1).permute(0, 3, 2, 1)  # (B, L, K, C)
        y = self.tt(patches.reshape(b, patches.shape[1], -1))  # (B, L, N)
        return y.transpose(1, 2).reshape(b, self.out_channels, ho, wo)

    def full_weight(self) -> torch.Tensor:
        """The dense ``(N, C, k_h, k_w)`` kernel the cores represent."""
        kh, kw = self.kernel_size
        w = self.tt.full_weight().reshape(self.out_channels, kh, kw, self.in_channels)
        return w.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


def tt_conv(
    conv: nn.Conv2d,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int] | int,
) -> TTConv2d:
    """TT-SVD of ``conv``'s kernel matrix ``(N, k_h k_w C)`` into a :class:`TTConv2d`.

    Requires ``groups == 1``, numeric padding and ``padding_mode='zeros'``; ``in_modes`` factor
    ``k_h k_w C`` (row-major over kernel position then channel, e.g. ``[k_h k_w, c_1, c_2]``),
    ``out_modes`` factor ``N`` (e.g. ``[1, n_1, n_2]``). At full ranks it reproduces ``conv``.
    """
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            "tt_conv: needs groups=1, numeric padding and padding_mode='zeros'; got "
            f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )
    n = conv.out_channels
    w = conv.weight.detach()
    as_linear = nn.Linear(w[0].numel(), n, bias=conv.bias is not None).to(w.device, w.dtype)
    with torch.no_grad():
        as_linear.weight.copy_(w.permute(0, 2, 3, 1).reshape(n, -1))  # (N, kh*kw*C)
        if conv.bias is not None:
            as_linear.bias.copy_(conv.bias.detach())
    tt = tt_linear(as_linear, in_modes, out_modes, ranks)
    layer = TTConv2d(
        conv.in_channels,
        conv.kernel_size,
        tt.in_modes,
        tt.out_modes,
        tt.ranks,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    )
    layer.tt = tt
    return layer.to(device=w.device, dtype=w.dtype)
