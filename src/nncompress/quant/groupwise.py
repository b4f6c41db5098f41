"""Group-wise affine quantization of weight matrices (the storage of weight-only low-bit models).

A weight matrix ``W`` (out x in; ``nn.Linear`` layout, an embedding's rows are its outputs) is
cut along the input dimension into groups of ``g`` columns (``g = in`` is per-channel: one
scale per output row). Each row of each group gets a scale ``s`` and an integer zero point
``z``, and every weight a ``b``-bit code ``q``:

    q = clamp(round(w / s) + z, 0, 2**b - 1),        w_hat = (q - z) * s

* asymmetric: ``s = (max - min) / (2**b - 1)``, ``z = clamp(round(-min / s), 0, 2**b - 1)``;
* symmetric: ``s = max|w| / (2**(b-1) - 1)``, ``z = 2**(b-1)`` for every group (not stored).

Scales are rounded to float16 when they are computed (they are stored as float16), so the
dequantized weight is a deterministic function of stored integers and float16 numbers: the
model evaluated and the model decoded from a ``.ncz`` file agree bit for bit. This is the
round-to-nearest (RTN) baseline of GPTQ (Frantar et al., ICLR 2023) and of most weight-only
low-bit schemes; ``mse_clip`` adds the per-group clipping search of the GPTQ code base (shrink
the range while the squared error drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..coding.affine import dequantize_codes, packed_nbytes

__all__ = [
    "MAX_WEIGHT_BITS",
    "QuantizedWeight",
    "dequantize_codes",
    "group_qparams",
    "packed_nbytes",
    "quantize_to_codes",
    "resolve_group_size",
    "rtn_quantize",
]

MAX_WEIGHT_BITS = 8
MIN_WEIGHT_BITS = 2
_FP16_MIN = 2.0**-14  # smallest normal float16: scales below it would lose precision
_FP16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits={bits!r}: must be an integer")
    if not MIN_WEIGHT_BITS <= bits <= MAX_WEIGHT_BITS:
        raise ValueError(f"bits={bits}: must be in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}]")


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """Columns per group: ``in_features`` for None (per-channel), else ``group_size``, which
    must divide ``in_features``."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or None")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size}: does not divide in_features={in_features} "
            "(use a divisor, or None for one scale per output channel)"
        )
    return group_size


@dataclass
class QuantizedWeight:
    """A quantized (out x in) matrix: ``codes`` uint8 (out, in), ``scale`` float16 (out, G),
    ``zero`` uint8 (out, G) or None for symmetric (implicit ``2**(bits-1)``), with
    ``G = in / group_size`` groups of consecutive columns."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(
            self.codes, self.scale, self.zero, self.bits, self.group_size, dtype
        )

    @property
    def nbytes(self) -> int:
        """Bytes at fixed width: codes ``ceil(out*in*b/8)``, float16 scales, b-bit zeros."""
        return packed_nbytes(self.shape, self.bits, self.group_size, self.symmetric)


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(out, inp // g, g)  # (out, G, g)


def _params_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """float16-representable scales and integer zero points (float32) for ranges [lo, hi]."""
    maxq = 2**bits - 1
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = amax / (2 ** (bits - 1) - 1)
    else:
        scale = (hi - lo) / maxq
    scale = scale.clamp(_FP16_MIN, _FP16_MAX).to(torch.float16).to(torch.float32)
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def group_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    *,
    mse_clip: bool = False,
    grid: int = 20,
    max_shrink: float = 0.8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (float16 values, as float32) and zero points (integers, as float32) of ``w``.

    Parameters
    ----------
    w : (out, in) matrix.
    bits : code width in [2, 8].
    group_size : columns per group (must divide ``in``); None for per-channel.
    symmetric : symmetric range around zero (zero point ``2**(bits-1)``).
    mse_clip : per group, try ranges shrunk by ``1 - i * max_shrink / grid`` (i < grid) and
        keep the one with the lowest squared error (GPTQ's ``mse`` option).

    Returns
    -------
    scale, zero : (out, G) each.
    """
    _check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    g = resolve_group_size(w.shape[1], group_size)
    wg = _grouped(w.detach().to(torch.float32), g)  # (out, G, g)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)  # (out, G)
    scale, zero = _params_from_range(lo, hi, bits, symmetric)
    if not mse_clip:
        return scale, zero
    maxq = 2**bits - 1
    best = torch.full_like(scale, math.inf)
    for i in range(grid):
        p = 1.0 - i * max_shrink / grid
        s, z = _params_from_range(lo * p, hi * p, bits, symmetric)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, maxq)
        err = ((q - z[..., None]) * s[..., None] - wg).pow(2).sum(dim=2)  # (out, G)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_to_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """uint8 codes ``clamp(round(w / s) + z, 0, 2**b - 1)`` of an (out, in) matrix."""
    wg = _grouped(w.detach().to(torch.float32), group_size)  # (out, G, g)
    q = torch.round(wg / scale[..., None]) + zero[..., None]
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(w.shape)


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    *,
    mse_clip: bool = False,
) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of an (out, in) matrix."""
    g = resolve_group_size(w.shape[1], group_size)
    scale, zero = group_qparams(w, bits, g, symmetric, mse_clip=mse_clip)
    codes = quantize_to_codes(w, scale, zero, bits, g)
    return QuantizedWeight(
        codes=codes,
        scale=scale.to(torch.float16),
        zero=None if symmetric else zero.to(torch.uint8),
        bits=bits,
        group_size=g,
    )
