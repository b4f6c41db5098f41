"""Fake-quantization modules: the weight parametrization and the activation quantizer."""

from __future__ import annotations

import torch
from torch import nn

from .observers import Observer, make_observer
from .primitives import QParams, affine_qparams, fake_quantize, lsq_fake_quantize
from .qconfig import PTQConfig, QATConfig

__all__ = ["ActivationQuantizer", "WeightFakeQuant", "make_activation_quantizer"]


class WeightFakeQuant(nn.Module):
    """Parametrization ``w -> fake_quantize(w * mask)`` with symmetric min/max scales.

    Scales are recomputed from the current weight on every call (per output channel, axis 0,
    or per tensor): ``scale = max|w| / qmax``, ``zero_point = 0``. With ``lsq=True`` the scale is
    a learned parameter (initialised to the min/max scale) and gradients follow LSQ. ``mask``
    (optional, 0/1) pins pruned weights at exactly zero.
    """

    def __init__(
        self,
        dtype: str,
        weight: torch.Tensor,
        *,
        per_channel: bool = True,
        lsq: bool = False,
        mask: torch.Tensor | None = None,
        reduce_range: bool = False,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.reduce_range = reduce_range
        self.axis = 0 if per_channel else None
        self.lsq = lsq
        if mask is not None:
            self.register_buffer("mask", mask.to(weight.dtype))
        else:
            self.mask = None
        if lsq:
            self.scale = nn.Parameter(self.minmax_qparams(weight).scale.clone())

    def minmax_qparams(self, w: torch.Tensor) -> QParams:
        w = w.detach()
        if self.axis is None:
            mn, mx = w.min(), w.max()
        else:
            flat = w.reshape(w.shape[0], -1)  # (C_out, C_in*k*k)
            mn, mx = flat.min(1).values, flat.max(1).values
        return affine_qparams(
            mn, mx, self.dtype, symmetric=True, axis=self.axis, reduce_range=self.reduce_range
        )

    def qparams(self, w: torch.Tensor) -> QParams:
        """The parameters the forward pass uses for weight ``w`` (the unparametrized one)."""
        if self.lsq:
            s = self.scale.detach().abs().clamp(min=1e-12)
            return QParams(
                s.clone(),
                torch.zeros_like(s, dtype=torch.int32),
                self.dtype,
                self.axis,
                self.reduce_range,
            )
        return self.minmax_qparams(self._masked(w))

    def _masked(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask if self.mask is not None else w

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = self._masked(w)
        if self.lsq:
            return lsq_fake_quantize(
                w,
                self.scale.abs() + 1e-12,
                0,
                self.dtype,
                axis=self.axis,
                reduce_range=self.reduce_range,
            )
        qp = self.minmax_qparams(w)
        return fake_quantize(
            w, qp.scale, qp.zero_point, self.dtype, axis=self.axis, reduce_range=self.reduce_range
        )

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, axis={self.axis}, lsq={self.lsq}"


class ActivationQuantizer(nn.Module):
    """Observer plus fake quantization of one activation tensor (asymmetric, per tensor).

    Modes: ``'observe'`` (record ranges, pass through: PTQ calibration), ``'qat'`` (in training
    update the observer and fake-quantize with the current range; in eval use the frozen one),
    ``'lsq'`` (learned scale, fixed zero point), ``'quantize'`` (frozen parameters: after
    :func:`convert`). ``scale``/``zero_point`` buffers hold the frozen parameters.
    """

    def __init__(self, observer: Observer, dtype: str = "int8", mode: str = "observe") -> None:
        super().__init__()
        if mode not in ("observe", "qat", "lsq", "quantize"):
            raise ValueError(f"mode={mode!r}: must be 'observe', 'qat', 'lsq' or 'quantize'")
        self.observer = observer
        self.dtype = dtype
        self.mode = mode
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.lsq_scale: nn.Parameter | None = None

    def freeze(self) -> QParams:
        """Compute and store the parameters from the observer (or the learned LSQ scale)."""
        if self.mode == "lsq" and self.lsq_scale is not None:
            self.scale = self.lsq_scale.detach().abs().clamp(min=1e-12).clone()
        else:
            qp = self.observer.calculate_qparams(self.dtype, symmetric=False)
            self.scale, self.zero_point = qp.scale.clone(), qp.zero_point.clone()
        return self.qparams()

    def qparams(self) -> QParams:
        return QParams(self.scale.detach().clone(), self.zero_point.clone(), self.dtype)

    def start_lsq(self) -> None:
        """Switch to learned step size, initialised from the observer's range."""
        self.freeze()
        self.lsq_scale = nn.Parameter(self.scale.clone())
        self.mode = "lsq"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            return self.observer(x)
        if self.mode == "qat" and self.training:
            self.observer(x)
            self.freeze()
        if self.mode == "lsq" and self.lsq_scale is not None:
            return lsq_fake_quantize(x, self.lsq_scale.abs() + 1e-12, self.zero_point, self.dtype)
        return fake_quantize(x, self.scale, self.zero_point, self.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, mode={self.mode}"


def make_activation_quantizer(config: PTQConfig, dtype: str, qat: bool) -> ActivationQuantizer:
    if config.observer == "percentile":
        obs = make_observer("percentile", percentile=config.percentile)
    elif config.observer == "moving_average":
        avg = config.averaging_constant if isinstance(config, QATConfig) else 0.01
        obs = make_observer("moving_average", averaging_constant=avg)
    else:
        obs = make_observer(config.observer)
    return ActivationQuantizer(obs, dtype, mode="qat" if qat else "observe")
