"""Tucker-2 decomposition of convolutions on the channel modes (Kim et al., ICLR 2016).

``W (N, C, k_h, k_w) ~ G x_0 U_out x_1 U_in`` with core ``G (R_out, R_in, k_h, k_w)`` and factor
matrices ``U_out (N, R_out)``, ``U_in (C, R_in)``; as layers:

    1x1 conv C -> R_in (weight U_in^T)  ->  k_h x k_w conv R_in -> R_out (weight G, the
    original stride/padding/dilation)  ->  1x1 conv R_out -> N (weight U_out, original bias).

The decomposition is TensorLy's ``partial_tucker`` (HOOI, SVD initialisation) on modes 0 and 1,
run with the PyTorch backend set locally. Kim et al. choose ``(R_out, R_in)`` by VBMF on the
mode-0 and mode-1 unfoldings (:func:`tucker2_vbmf_ranks`).
"""

from __future__ import annotations

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import nn

from ..core.convs import is_conv_subclass, resized_conv
from .rank import evbmf, rank_for_energy

__all__ = [
    "tucker2",
    "tucker2_conv",
    "tucker2_cost",
    "tucker2_energy_ranks",
    "tucker2_vbmf_ranks",
]


def tucker2(
    w: torch.Tensor, ranks: tuple[int, int], *, n_iter_max: int = 100, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a 4-D kernel on its two channel modes: ``(core, U_out, U_in)``.

    Minimises ``||W - G x_0 U_out x_1 U_in||_F`` with orthonormal ``U_out (N, R_out)`` and
    ``U_in (C, R_in)`` by higher-order orthogonal iteration (tensorly ``partial_tucker``),
    in float64, results cast back to ``w``'s dtype.
    """
    n, c = w.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= n and 1 <= r_in <= c):
        raise ValueError(
            f"ranks={ranks}: must be in [1, {n}] x [1, {c}] for kernel {tuple(w.shape)}"
        )
    x = w.detach().to("cpu", torch.float64)  # (N, C, kh, kw)
    with tl.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = partial_tucker(
            x, rank=[r_out, r_in], modes=[0, 1], n_iter_max=n_iter_max, tol=tol, init="svd"
        )
    # core (R_out, R_in, kh, kw), u_out (N, R_out), u_in (C, R_in)
    cast = {"device": w.device, "dtype": w.dtype}
    return core.to(**cast), u_out.to(**cast), u_in.to(**cast)


def _unfold(w: torch.Tensor, mode: int) -> torch.Tensor:
    return w.detach().movedim(mode, 0).reshape(w.shape[mode], -1)  # (dim_mode, rest)


def tucker2_vbmf_ranks(w: torch.Tensor) -> tuple[int, int]:
    """``(R_out, R_in)`` by EVBMF on the mode-0 and mode-1 unfoldings (Kim et al. 2016).

    A rank of 0 (all spectrum judged noise) is returned as is; callers apply a minimum rank.
    """
    return evbmf(_unfold(w, 0)).rank, evbmf(_unfold(w, 1)).rank


def tucker2_energy_ranks(w: torch.Tensor, energy: float) -> tuple[int, int]:
    """``(R_out, R_in)`` keeping ``energy`` of each unfolding's squared singular values."""
    s0 = torch.linalg.svdvals(_unfold(w, 0).double())
    s1 = torch.linalg.svdvals(_unfold(w, 1).double())
    return rank_for_energy(s0, energy), rank_for_energy(s1, energy)


def tucker2_cost(
    conv: nn.Conv2d,
    ranks: tuple[int, int],
    in_hw: tuple[int, int] | None,
    out_hw: tuple[int, int] | None,
) -> tuple[int, int | None]:
    """``(params, MACs per sample)`` of the three-conv Tucker-2 block.

    params ``= C R_in + R_out R_in k_h k_w + N R_out (+ N)``; the first 1x1 runs at the input
    resolution, the core and last 1x1 at the output resolution.
    """
    n, c, kh, kw = conv.weight.shape
    r_out, r_in = ranks
    params = c * r_in + r_out * r_in * kh * kw + n * r_out + (n if conv.bias is not None else 0)
    if in_hw is None or out_hw is None:
        return params, None
    hw_in, hw_out = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    macs = hw_in * c * r_in + hw_out * (r_out * r_in * kh * kw + n * r_out)
    return params, macs


def tucker2_conv(conv: nn.Conv2d, ranks: tuple[int, int]) -> nn.Sequential:
    """Replace ``conv`` by ``Sequential(1x1 C->R_in, k x k R_in->R_out, 1x1 R_out->N)``.

    Requires ``groups == 1``. At full ranks ``(N, C)`` the block reproduces ``conv``.
    """
    if conv.groups != 1:
        raise ValueError(f"tucker2_conv: needs groups=1, got groups={conv.groups}")
    w = conv.weight.detach()  # (N, C, kh, kw)
    n, c, kh, kw = w.shape
    r_out, r_in = ranks
    core, u_out, u_in = tucker2(w, (r_out, r_in))
    first = nn.Conv2d(c, r_in, 1, bias=False)
    if is_conv_subclass(conv):
        # the core keeps the subclass and the padding its forward applies; the first factor
        # has no bias, so zero padding commutes with it
        middle = resized_conv(conv, core, None)
        last = nn.Conv2d(r_out, n, 1, bias=conv.bias is not None)
        with torch.no_grad():
            first.weight.copy_(u_in.t().reshape(r_in, c, 1, 1))  # (R_in, C, 1, 1)
            last.weight.copy_(u_out.reshape(n, r_out, 1, 1))  # (N, R_out, 1, 1)
            if conv.bias is not None:
                last.bias.copy_(conv.bias.detach())
        return nn.Sequential(first, middle, last).to(device=w.device, dtype=w.dtype)
    middle = nn.Conv2d(
        r_in,
        r_out,
        (kh, kw),
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=False,
        padding_mode=conv.padding_mode,
    )
    last = nn.Conv2d(r_out, n, 1, bias=conv.bias is not None)
    with torch.no_grad():
        first.weight.copy_(u_in.t().reshape(r_in, c, 1, 1))  # (R_in, C, 1, 1)
        middle.weight.copy_(core)  # (R_out, R_in, kh, kw)
        last.weight.copy_(u_out.reshape(n, r_out, 1, 1))  # (N, R_out, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    return nn.Sequential(first, middle, last).to(device=w.device, dtype=w.dtype)
