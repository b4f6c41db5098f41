"""Affine (linear) integer quantization primitives: ``real = scale * (q - zero_point)``.

This is the gemmlowp / TFLite / ONNX scheme (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference"): a real value ``x`` is stored
as an integer ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and read back as
``scale * (q - zero_point)``. ``scale`` and ``zero_point`` are either one pair per tensor or one
pair per slice along ``axis`` (per output channel for weights).

Rounding is round-half-to-even (``torch.round``), the rule of ``torch.quantize_per_tensor`` and of
ONNX ``QuantizeLinear``, so the PyTorch simulation and the exported integer model agree exactly.

4-bit values are stored two per byte (:func:`pack_int4`), low nibble first, which is the ONNX
``INT4``/``UINT4`` tensor layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "DTYPES",
    "QParams",
    "affine_qparams",
    "dequantize_affine",
    "fake_quantize",
    "lsq_fake_quantize",
    "pack_int4",
    "qrange",
    "quantize_affine",
    "unpack_int4",
]

#: Integer formats and their (qmin, qmax).
DTYPES: dict[str, tuple[int, int]] = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
}


def qrange(dtype: str, reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``dtype``; ``reduce_range`` drops one bit (fbgemm's overflow guard)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    qmin, qmax = DTYPES[dtype]
    if reduce_range:
        if qmin < 0:
            qmin, qmax = qmin // 2, qmax // 2
        else:
            qmax = qmax // 2
    return qmin, qmax


def _storage(dtype: str) -> torch.dtype:
    return torch.uint8 if dtype.startswith("u") else torch.int8


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor.

    Attributes
    ----------
    scale : float32 tensor, shape ``()`` per tensor or ``(C,)`` per channel.
    zero_point : int32 tensor of the same shape; an integer in ``[qmin, qmax]``.
    dtype : one of :data:`DTYPES`.
    axis : channel axis for per-channel parameters, ``None`` per tensor.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    dtype: str
    axis: int | None = None
    reduce_range: bool = False

    def __post_init__(self) -> None:
        qrange(self.dtype)
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(
                f"scale shape {tuple(self.scale.shape)} != zero_point shape "
                f"{tuple(self.zero_point.shape)}"
            )
        if self.axis is None and self.scale.dim() != 0:
            raise ValueError(f"per-tensor QParams need a 0-d scale, got {tuple(self.scale.shape)}")
        if self.axis is not None and self.scale.dim() != 1:
            raise ValueError(f"per-channel QParams need a 1-d scale, got {tuple(self.scale.shape)}")

    @property
    def qmin(self) -> int:
        return qrange(self.dtype, self.reduce_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.dtype, self.reduce_range)[1]

    @property
    def bits(self) -> int:
        return 4 if self.dtype.endswith("4") else 8


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel parameter ``(C,)`` so it broadcasts along ``axis`` of ``x``."""
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def affine_qparams(
    min_val: torch.Tensor | float,
    max_val: torch.Tensor | float,
    dtype: str = "int8",
    *,
    symmetric: bool = True,
    axis: int | None = None,
    reduce_range: bool = False,
    eps: float = 1e-12,
) -> QParams:
    """Scale and zero point that map ``[min_val, max_val]`` onto the integer grid of ``dtype``.

    The range is first widened to contain 0, so that 0 is exactly representable (padding and
    pruned weights stay exactly zero). With ``qmin, qmax`` the integer limits:

    - asymmetric: ``scale = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)`` (PyTorch's MinMaxObserver);
    - symmetric, signed: ``scale = max(|min|, |max|) / qmax``, ``zero_point = 0`` (the
      "restricted" grid ``[-qmax, qmax]``, as TensorRT and ONNX Runtime quantize weights);
    - symmetric, unsigned: ``scale = 2 max(|min|, |max|) / (qmax - qmin)``,
      ``zero_point = (qmin + qmax + 1) // 2``.

    Parameters
    ----------
    min_val, max_val : observed extremes; 0-d for per tensor, ``(C,)`` for per channel.
    axis : channel axis the ``(C,)`` parameters belong to (``None`` per tensor).
    """
    qmin, qmax = qrange(dtype, reduce_range)
    mn = torch.as_tensor(min_val, dtype=torch.float32)
    mx = torch.as_tensor(max_val, dtype=torch.float32)
    if mn.shape != mx.shape:
        raise ValueError(f"min shape {tuple(mn.shape)} != max shape {tuple(mx.shape)}")
    if axis is None and mn.dim() != 0:
        raise ValueError(f"per-tensor qparams need scalar min/max, got shape {tuple(mn.shape)}")
    if axis is not None and mn.dim() != 1:
        raise ValueError(f"per-channel qparams need (C,) min/max, got shape {tuple(mn.shape)}")
    if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
        raise ValueError("min_val/max_val must be finite (no data observed yet?)")
    mn = torch.minimum(mn, torch.zeros_like(mn))
    mx = torch.maximum(mx, torch.zeros_like(mx))
    if symmetric:
        amax = torch.maximum(-mn, mx)
        if qmin < 0:
            scale = torch.clamp(amax / qmax, min=eps)
            zp = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = torch.clamp(2 * amax / (qmax - qmin), min=eps)
            zp = torch.full_like(scale, (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = torch.clamp((mx - mn) / (qmax - qmin), min=eps)
        zp = torch.clamp(qmin - torch.round(mn / scale), qmin, qmax).to(torch.int32)
    return QParams(scale.float(), zp, dtype, axis, reduce_range)


def quantize_affine(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    dtype: str = "int8",
    *,
    axis: int | None = None,
    reduce_range: bool = False,
) -> torch.Tensor:
    """``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8 (signed) or uint8.

    4-bit values are returned unpacked, one per int8/uint8 element (see :func:`pack_int4`).
    """
    qmin, qmax = qrange(dtype, reduce_range)
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), x, axis)
    z = _broadcast(torch.as_tensor(zero_point, dtype=torch.float32), x, axis)
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return q.to(_storage(dtype))


def dequantize_affine(
    q: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    *,
    axis: int | None = None,
) -> torch.Tensor:
    """``real = scale * (q - zero_point)`` in float32."""
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), q, axis)
    z = _broadcast(torch.as_tensor(zero_point, dtype=torch.float32), q, axis)
    return s * (q.to(torch.float32) - z)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize with the straight-through estimator (Bengio et al. 2013).

    Backward: ``dL/dx = dL/dy`` where ``x / scale + zero_point`` lies in ``[qmin, qmax]``
    (before rounding) and 0 where it was clipped, as in ``torch.fake_quantize_per_*_affine``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # noqa: D102
        v = torch.round(x / scale) + zero_point
        ctx.save_for_backward((v >= qmin) & (v <= qmax))
        return (torch.clamp(v, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    dtype: str = "int8",
    *,
    axis: int | None = None,
    reduce_range: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, differentiable with the straight-through estimator.

    Forward equals :func:`dequantize_affine` of :func:`quantize_affine`; the gradient passes
    unchanged where ``x`` is inside the representable range and is zero where it was clipped.
    """
    qmin, qmax = qrange(dtype, reduce_range)
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32, device=x.device), x, axis)
    z = _broadcast(torch.as_tensor(zero_point, dtype=torch.float32, device=x.device), x, axis)
    return _FakeQuantSTE.apply(x, s.detach(), z.detach(), qmin, qmax)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | int,
    dtype: str = "int8",
    *,
    axis: int | None = None,
    reduce_range: bool = False,
) -> torch.Tensor:
    """Fake quantization with a learned step size (LSQ, Esser et al., ICLR 2020).

    ``y = s * (clamp(round(x / s) + z, qmin, qmax) - z)`` where ``round`` passes gradients
    straight through and the gradient reaching ``s`` is multiplied by
    ``g = 1 / sqrt(N * Q_p)`` (``N`` elements per scale, ``Q_p = qmax``), the paper's
    gradient scale. The gradient to ``x`` is the STE (1 inside the range, 0 outside), and
    ``dy/ds = round(x/s) - x/s`` inside the range, ``qmin - z`` or ``qmax - z`` outside.
    """
    qmin, qmax = qrange(dtype, reduce_range)
    n_per_scale = x.numel() / max(1, scale.numel())
    g = 1.0 / math.sqrt(n_per_scale * max(1, qmax))
    s = _broadcast(scale, x, axis)
    s = (s - s * g).detach() + s * g  # value s, gradient scaled by g
    z = _broadcast(torch.as_tensor(zero_point, dtype=torch.float32, device=x.device), x, axis)
    v = x / s + z
    v = torch.clamp(v, qmin, qmax)
    v = (torch.round(v) - v).detach() + v  # round with a straight-through gradient
    return (v - z) * s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit integers two per byte, low nibble first (the ONNX INT4/UINT4 layout).

    ``q`` holds values in [-8, 7] (int8 storage) or [0, 15] (uint8 storage), any shape; it is
    flattened and, for an odd count, padded with one zero nibble. Returns ``(ceil(n/2),)`` uint8.
    """
    flat = q.reshape(-1).to(torch.int16)  # (n,)
    if flat.numel() and (flat.min() < -8 or flat.max() > 15):
        raise ValueError(
            f"pack_int4: values must fit 4 bits, got range [{int(flat.min())}, {int(flat.max())}]"
        )
    nib = flat & 0xF  # two's complement nibble
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    pairs = nib.reshape(-1, 2)  # (ceil(n/2), 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int, *, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``n`` values, int8 (signed) or uint8."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed must be uint8, got {packed.dtype}")
    if not 0 <= n <= 2 * packed.numel():
        raise ValueError(f"unpack_int4: n={n} must be in [0, {2 * packed.numel()}]")
    p = packed.reshape(-1).to(torch.int16)
    nib = torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]  # (n,)
    if signed:
        nib = torch.where(nib >= 8, nib - 16, nib)
        return nib.to(torch.int8)
    return nib.to(torch.uint8)
