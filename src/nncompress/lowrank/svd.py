"""Truncated SVD of fully connected layers (survey section 4; Denton et al. 2014, Xue et al. 2013).

``W (out x in) ~ U_r S_r V_r^T``: a Linear layer becomes ``Linear(in, r, bias=False)`` with
weight ``S_r^{1/2} V_r^T`` followed by ``Linear(r, out)`` with weight ``U_r S_r^{1/2}`` and the
original bias. Parameters drop from ``in*out`` to ``r*(in+out)``; by Eckart-Young this is the
best rank-``r`` approximation of ``W`` in Frobenius and spectral norm.

A 1x1 convolution (``groups=1``) is the same matrix ``W (C_out x C_in)`` applied at every
position: :func:`svd_conv1x1` factors it into two 1x1 convolutions, the first keeping the
layer's stride and padding (a copy of the layer itself when it is an ``nn.Conv2d`` subclass
that pads in its ``forward``), the second the bias.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["svd_conv1x1", "svd_linear", "svd_linear_cost", "truncated_svd"]


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors of a matrix: ``w ~ b @ a``.

    ``a = S_r^{1/2} V_r^T`` (rank x n) and ``b = U_r S_r^{1/2}`` (m x rank), from
    ``torch.linalg.svd``, computed in float64 and returned in ``w``'s dtype.

    Parameters
    ----------
    w : (m, n) matrix.
    rank : 1 <= rank <= min(m, n).
    """
    if w.dim() != 2:
        raise ValueError(f"truncated_svd: w must be 2-D, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank={rank}: must be in [1, {min(w.shape)}] for shape {tuple(w.shape)}")
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)  # (m,k) (k,) (k,n)
    root = s[:rank].sqrt()  # (r,)
    a = root[:, None] * vh[:rank]  # (r, n)
    b = u[:, :rank] * root[None, :]  # (m, r)
    return a.to(w.dtype), b.to(w.dtype)


def svd_linear_cost(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    """Parameters of the factorised layer: ``rank * (in + out)`` (+ ``out`` for the bias)."""
    return rank * (in_features + out_features) + (out_features if bias else 0)


def svd_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Replace ``linear`` by ``Sequential(Linear(in, r, bias=False), Linear(r, out, bias))``.

    At ``rank = min(in, out)`` the result reproduces the layer to float rounding.
    """
    w = linear.weight.detach()  # (out, in)
    a, b = truncated_svd(w, rank)  # (r, in), (out, r)
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if linear.bias is not None:
            second.bias.copy_(linear.bias.detach())
    return nn.Sequential(first, second).to(device=w.device, dtype=w.dtype)


def svd_conv1x1(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Replace a 1x1 ``conv`` (``groups=1``) by ``Sequential(1x1 C->r, no bias; 1x1 r->N)``.

    The first factor has no bias, so zero padding commutes with it: it keeps ``conv``'s stride
    and padding (for a Conv2d subclass that pads in ``forward``, it is a copy of ``conv``
    holding the factor, see :func:`nncompress.core.convs.resized_conv`). At
    ``rank = min(C, N)`` the block reproduces ``conv`` to float rounding.
    """
    from ..core.convs import is_conv_subclass, resized_conv

    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
        raise ValueError(
            f"svd_conv1x1: needs a 1x1 kernel and groups=1, got kernel {tuple(conv.kernel_size)}"
            f", groups={conv.groups}"
        )
    w = conv.weight.detach()  # (N, C, 1, 1)
    n, c = w.shape[:2]
    a, b = truncated_svd(w.reshape(n, c), rank)  # (r, C), (N, r)
    if is_conv_subclass(conv):
        first = resized_conv(conv, a.reshape(rank, c, 1, 1), None)
    else:
        first = nn.Conv2d(
            c, rank, 1, conv.stride, conv.padding, conv.dilation, bias=False,
            padding_mode=conv.padding_mode,
        )  # fmt: skip
        with torch.no_grad():
            first.weight.copy_(a.reshape(rank, c, 1, 1))  # (r, C, 1, 1)
    second = nn.Conv2d(rank, n, 1, bias=conv.bias is not None)
    with torch.no_grad():
        second.weight.copy_(b.reshape(n, rank, 1, 1))  # (N, r, 1, 1)
        if conv.bias is not None:
            second.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, second).to(device=w.device, dtype=w.dtype)
