"""GPTQ: second-order error feedback for weight-only quantization (Frantar, Ashkboos, Hoefler &
Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023), and the Hessians it needs.

Objective (the seeds' "reconstruct the layer's output, not its weights"): for a layer with
weight ``W`` (out x in) and calibration inputs ``X`` (n x in), find quantized ``Q`` minimising

    ||X W^T - X Q^T||_F^2 = tr((W - Q) H (W - Q)^T),     H = 2 X^T X / n.

GPTQ quantizes the columns one at a time (Optimal Brain Quantization): after column ``i`` is
rounded, its error ``e = (w_i - q_i) / [H^-1]_ii`` is spread over the columns not yet
quantized, ``W[:, j] -= e [H^-1]_ij`` (j > i), which is the least-squares correction given the
remaining inverse Hessian. The paper's three tricks are implemented: one column order for all
rows, the inverse Hessian's rows taken from the upper Cholesky factor of ``H^-1`` (numerically
stable), and lazy batch updates (the correction inside a block of ``block_size`` columns, one
matrix product for the rest). ``damp`` adds ``damp * mean(diag H)`` to the diagonal;
``act_order`` quantizes columns in decreasing ``diag(H)`` with group parameters fixed up front
("static groups"), so the stored codes keep the natural column order.

No maintained library offers this on CPU for arbitrary ``nn.Module`` graphs without extra
CUDA-only dependencies (auto-gptq, optimum), and the solver is ~60 lines, so it is written
here.
"""

from __future__ import annotations

import logging

import torch

from .groupwise import (
    QuantizedWeight,
    _check_bits,
    group_qparams,
    resolve_group_size,
)

__all__ = ["HessianAccumulator", "gptq_quantize", "layer_output_error"]

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = 2 X^T X / n`` over layer inputs ``x`` of shape (..., in)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (n, in)
        self.sum += (rows.T @ rows).to(torch.float64)  # (in, in)
        self.n += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("HessianAccumulator: no inputs were recorded")
        return 2.0 * self.sum / self.n  # (in, in)


def layer_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W_hat`` (out x in):
    the squared output error of the layer on the calibration inputs, relative to its output
    energy."""
    h = hessian.to(torch.float64)
    d = (w.detach() - w_hat.detach()).to(torch.float64)  # (out, in)
    num = float(((d @ h) * d).sum())
    den = float(((w.to(torch.float64) @ h) * w.to(torch.float64)).sum())
    return num / max(den, 1e-300)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1`` (float64), raising lambda until it
    is positive definite."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * mean_diag
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)  # (in, in)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        lam = max(lam * 10.0, 1e-8 * max(mean_diag, 1.0))
        log.debug("GPTQ: Hessian not positive definite, damping raised to %g", lam)
    raise ValueError(
        "GPTQ: the Hessian stays singular after damping (calibration inputs all zero?)"
    )


def _block_for(g: int, block_size: int) -> int:
    """Lazy-update block: a multiple of the group size ``g`` when groups are smaller than
    ``block_size``, else the largest divisor of ``g`` not above ``block_size`` (every group
    then starts at a block start)."""
    if g < block_size:
        return (block_size // g) * g
    return max(d for d in range(1, block_size + 1) if g % d == 0)


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    mse_clip: bool = False,
) -> QuantizedWeight:
    """Quantize an (out x in) matrix with GPTQ given the Hessian of its layer's inputs.

    Parameters
    ----------
    w : (out, in) weight.
    hessian : (in, in) ``2 X^T X / n`` of the calibration inputs (:class:`HessianAccumulator`).
    bits, group_size, symmetric, mse_clip : as :func:`~nncompress.quant.groupwise.rtn_quantize`.
    block_size : columns per lazy-update block (rounded down to a multiple of the group size
        when groups are smaller, so a group never spans two blocks).
    damp : relative diagonal damping (GPTQ: 0.01).
    act_order : quantize columns in decreasing ``diag(H)`` (static groups).

    Returns
    -------
    QuantizedWeight with the codes in the natural column order.
    """
    _check_bits(bits)
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gptq_quantize: w {tuple(w.shape)} must be (out, in) and hessian "
            f"{tuple(hessian.shape)} (in, in)"
        )
    if not damp > 0:
        raise ValueError(f"damp={damp!r}: must be > 0")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r}: must be a positive integer")
    out_f, in_f = w.shape
    g = resolve_group_size(in_f, group_size)
    maxq = 2**bits - 1
    W = w.detach().to(torch.float32).clone()  # (out, in)
    H = hessian.detach().to(torch.float64).clone()  # (in, in)
    dead = H.diagonal() == 0  # inputs never active: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = in_f // g
    scale = torch.empty(out_f, n_groups, dtype=torch.float32, device=W.device)
    zero = torch.empty_like(scale)
    if act_order:
        scale, zero = group_qparams(W, bits, g, symmetric, mse_clip=mse_clip)  # static groups
        perm = torch.argsort(H.diagonal(), descending=True)  # (in,)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(in_f, device=W.device)
    U = _inverse_hessian_factor(H, damp).to(torch.float32)  # (in, in) upper
    group_of = perm // g  # (in,) group of each processed column
    block = _block_for(g, block_size)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()  # (out, B)
        E1 = torch.zeros_like(W1)  # (out, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            col = i1 + i
            grp = int(group_of[col])
            if not act_order and col % g == 0:
                # parameters from the group's current (error-corrected) weights: a group starts
                # at a block start or lies inside one, so the part beyond this block has no
                # pending lazy update yet
                cur = W1[:, i : i + g]
                if col + g > i2:
                    cur = torch.cat([cur, W[:, i2 : col + g]], dim=1)
                s, z = group_qparams(cur, bits, None, symmetric, mse_clip=mse_clip)
                scale[:, grp], zero[:, grp] = s[:, 0], z[:, 0]
            s, z = scale[:, grp], zero[:, grp]  # (out,)
            wc = W1[:, i]  # (out,)
            q = torch.clamp(torch.round(wc / s) + z, 0, maxq)  # (out,)
            deq = (q - z) * s
            codes[:, perm[col]] = q.to(torch.uint8)
            err = (wc - deq) / U1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return QuantizedWeight(
        codes=codes,
        scale=scale.to(torch.float16),
        zero=None if symmetric else zero.to(torch.uint8),
        bits=bits,
        group_size=g,
    )
