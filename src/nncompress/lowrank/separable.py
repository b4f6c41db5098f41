"""Spatially separable convolutions (Jaderberg, Vedaldi and Zisserman, BMVC 2014, scheme 2).

A ``k_h x k_w`` convolution ``W (N, C, k_h, k_w)`` is approximated by a vertical ``k_h x 1``
convolution to ``r`` channels followed by a horizontal ``1 x k_w`` convolution to ``N``
channels:

    W[n, c, i, j] ~ sum_r H[n, r, j] V[r, c, i].

Tai et al. (ICLR 2016, "Convolutional neural networks with low-rank regularization") give the
closed-form optimum: reshape ``W`` to the ``(C*k_h) x (N*k_w)`` matrix
``M[(c, i), (n, j)] = W[n, c, i, j]`` and truncate its SVD ``M = U S V^T``:
``V[r, c, i] = U[(c, i), r] sqrt(s_r)`` and ``H[n, r, j] = V[(n, j), r] sqrt(s_r)``.
Stride, padding and dilation are split per axis, so outputs keep their size.
"""

from __future__ import annotations

import torch
from torch import nn

from .svd import truncated_svd

__all__ = [
    "separable_conv",
    "separable_cost",
    "separable_full_rank",
    "separable_matrix",
]


def require_plain_conv(conv: nn.Conv2d, who: str) -> None:
    """Factorisations that split a kernel into spatial pieces need an ungrouped convolution
    with numeric zero padding (the pieces pad separately)."""
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(
            f"{who}: needs groups=1, numeric padding and padding_mode='zeros'; got "
            f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )


def separable_matrix(w: torch.Tensor) -> torch.Tensor:
    """The ``(C*k_h) x (N*k_w)`` matrix ``M[(c,i),(n,j)] = W[n,c,i,j]`` of Tai et al."""
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)  # (C*kh, N*kw)


def separable_full_rank(conv: nn.Conv2d) -> int:
    """Rank at which the separable pair reproduces ``conv`` exactly: ``min(C k_h, N k_w)``."""
    n, c, kh, kw = conv.weight.shape
    return min(c * kh, n * kw)


def separable_cost(
    conv: nn.Conv2d, rank: int, in_hw: tuple[int, int] | None, out_hw: tuple[int, int] | None
) -> tuple[int, int | None]:
    """``(params, MACs per sample)`` of the separable pair at ``rank``.

    params ``= r C k_h + N r k_w (+ N bias)``; the vertical conv runs at ``(H_out, W_in)``, the
    horizontal one at ``(H_out, W_out)``.
    """
    n, c, kh, kw = conv.weight.shape
    params = rank * c * kh + n * rank * kw + (n if conv.bias is not None else 0)
    if in_hw is None or out_hw is None:
        return params, None
    macs = out_hw[0] * in_hw[1] * rank * c * kh + out_hw[0] * out_hw[1] * n * rank * kw
    return params, macs


def separable_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """``Sequential(Conv2d(C, r, (k_h, 1)), Conv2d(r, N, (1, k_w)))`` approximating ``conv``.

    Requires ``groups == 1``, numeric padding and ``padding_mode='zeros'``. At
    ``rank = separable_full_rank(conv)`` the output equals the original to float rounding.
    """
    require_plain_conv(conv, "separable_conv")
    w = conv.weight.detach()  # (N, C, kh, kw)
    n, c, kh, kw = w.shape
    a, b = truncated_svd(separable_matrix(w).t(), rank)  # (r, C*kh), (N*kw, r)
    vert_w = a.reshape(rank, c, kh, 1)  # (r, C, kh, 1)
    horiz_w = b.reshape(n, kw, rank).permute(0, 2, 1).reshape(n, rank, 1, kw)  # (N, r, 1, kw)
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    vert = nn.Conv2d(c, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
    horiz = nn.Conv2d(rank, n, (1, kw), (1, sw), (0, pw), (1, dw), bias=conv.bias is not None)
    with torch.no_grad():
        vert.weight.copy_(vert_w)
        horiz.weight.copy_(horiz_w)
        if conv.bias is not None:
            horiz.bias.copy_(conv.bias.detach())
    return nn.Sequential(vert, horiz).to(device=w.device, dtype=w.dtype)
