"""CP decomposition of convolutions into four thin convolutions (Lebedev et al., ICLR 2015).

``W (N, C, k_h, k_w) ~ sum_r lambda_r a_out[:, r] o a_in[:, r] o a_h[:, r] o a_w[:, r]``
(rank-``R`` canonical polyadic decomposition), applied as

    1x1 conv C -> R (weight a_in^T)  ->  k_h x 1 depthwise conv (R groups, weight a_h)
    ->  1 x k_w depthwise conv (R groups, weight a_w)  ->  1x1 conv R -> N (weight lambda a_out,
    original bias).

Stride, padding and dilation are split per axis over the two depthwise convolutions. The CP
factors come from TensorLy's ``parafac`` (alternating least squares), run with the PyTorch
backend set locally. Unlike SVD/Tucker, CP of a tensor is not unique and ALS may not reach the
global optimum; fine-tuning afterwards (as Lebedev et al. do) recovers most of the loss.
"""

from __future__ import annotations

import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import nn

from .separable import require_plain_conv

__all__ = ["cp_conv", "cp_cost", "cp_decompose"]


def cp_decompose(
    w: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rank-``rank`` CP of a 4-D kernel: ``(weights (R,), [a_out (N,R), a_in (C,R), a_h, a_w])``.

    ALS from an SVD initialisation when ``rank`` is at most every mode's size, else from a
    seeded random one; float64, results cast back to ``w``'s dtype.
    """
    if rank < 1:
        raise ValueError(f"rank={rank}: must be >= 1")
    x = w.detach().to("cpu", torch.float64)  # (N, C, kh, kw)
    init = "svd" if rank <= min(x.shape) else "random"
    with tl.backend_context("pytorch"):
        cp = parafac(
            x,
            rank=rank,
            n_iter_max=n_iter_max,
            init=init,
            tol=tol,
            random_state=seed,
            normalize_factors=True,
        )
    weights, factors = cp.weights, list(cp.factors)
    cast = {"device": w.device, "dtype": w.dtype}
    return weights.to(**cast), [f.to(**cast) for f in factors]


def cp_cost(
    conv: nn.Conv2d,
    rank: int,
    in_hw: tuple[int, int] | None,
    out_hw: tuple[int, int] | None,
) -> tuple[int, int | None]:
    """``(params, MACs per sample)`` of the four-conv CP block.

    params ``= R (C + k_h + k_w + N) (+ N)``; the first 1x1 runs at ``(H_in, W_in)``, the
    vertical depthwise at ``(H_out, W_in)``, the rest at ``(H_out, W_out)``.
    """
    n, c, kh, kw = conv.weight.shape
    params = rank * (c + kh + kw + n) + (n if conv.bias is not None else 0)
    if in_hw is None or out_hw is None:
        return params, None
    macs = (
        in_hw[0] * in_hw[1] * rank * c
        + out_hw[0] * in_hw[1] * rank * kh
        + out_hw[0] * out_hw[1] * rank * (kw + n)
    )
    return params, macs


def cp_conv(conv: nn.Conv2d, rank: int, *, n_iter_max: int = 100, seed: int = 0) -> nn.Sequential:
    """Replace ``conv`` by the CP block ``1x1 -> k_h x 1 dw -> 1 x k_w dw -> 1x1``.

    Requires ``groups == 1``, numeric padding and ``padding_mode='zeros'``.
    """
    require_plain_conv(conv, "cp_conv")
    w = conv.weight.detach()  # (N, C, kh, kw)
    n, c, kh, kw = w.shape
    lam, (a_out, a_in, a_h, a_w) = cp_decompose(w, rank, n_iter_max=n_iter_max, seed=seed)
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    first = nn.Conv2d(c, rank, 1, bias=False)
    vert = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False)
    horiz = nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False)
    last = nn.Conv2d(rank, n, 1, bias=conv.bias is not None)
    with torch.no_grad():
        # Spread each component's weight lambda_r evenly over the four factors: with all of it
        # on the last 1x1 conv the layers are badly scaled and fine-tuning diverges.
        root = lam.abs().clamp_min(1e-30) ** 0.25  # (R,)
        sign = torch.sign(lam) + (lam == 0).to(lam.dtype)  # (R,)
        first.weight.copy_((a_in * root).t().reshape(rank, c, 1, 1))  # (R, C, 1, 1)
        vert.weight.copy_((a_h * root).t().reshape(rank, 1, kh, 1))  # (R, 1, kh, 1)
        horiz.weight.copy_((a_w * root).t().reshape(rank, 1, 1, kw))  # (R, 1, 1, kw)
        last.weight.copy_((a_out * (sign * root)).reshape(n, rank, 1, 1))  # (N, R, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, vert, horiz, last).to(device=w.device, dtype=w.dtype)
