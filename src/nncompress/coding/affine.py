"""Group-wise affine codes: the one dequantization formula that weight-only quantized layers,
the ``.ncz`` encoder and its decoder share, so all three produce identical bits.

A matrix (out x in) is cut along its columns into groups of ``group_size``; each group of each
row has a float16 scale ``s`` and an integer zero point ``z`` (``2**(bits-1)`` for symmetric
codes, not stored), and ``w = (q - z) * s`` is computed in float32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dequantize_codes", "packed_nbytes"]


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - z) * s`` per group of ``group_size`` columns, in float32, cast to ``dtype``.

    Parameters
    ----------
    codes : (out, in) unsigned integer codes below ``2**bits``.
    scale : (out, in / group_size) float16 scales.
    zero : (out, in / group_size) integer zero points, or None for ``2**(bits-1)``.
    """
    out, inp = codes.shape
    q = codes.to(torch.float32).reshape(out, inp // group_size, group_size)  # (out, G, g)
    if zero is None:
        centered = q - float(2 ** (bits - 1))
    else:
        centered = q - zero.to(torch.float32)[..., None]
    w = centered * scale.to(torch.float32)[..., None]  # (out, G, g)
    return w.reshape(out, inp).to(dtype)


def packed_nbytes(shape: tuple[int, int], bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of a quantized (out x in) matrix at fixed width: codes ``ceil(out*in*bits/8)``,
    float16 scales, ``bits``-wide zero points (asymmetric only)."""
    out, inp = shape
    groups = out * (inp // group_size)
    zeros = 0 if symmetric else math.ceil(groups * bits / 8)
    return math.ceil(out * inp * bits / 8) + 2 * groups + zeros
