"""Range observers for activation (and weight) quantization.

An observer is a small ``nn.Module`` that passes its input through unchanged while recording
statistics of it, then turns them into :class:`~nncompress.quant.primitives.QParams`. Activation
observers are fed calibration batches from the held-out split (post-training quantization) or
every training batch (quantization-aware training). Four ways to choose the range:

- :class:`MinMaxObserver` - the extremes seen (per tensor or per channel; weights use this);
- :class:`MovingAverageMinMaxObserver` - exponential moving average of per-batch extremes
  (what QAT uses: robust to one odd batch);
- :class:`PercentileObserver` - clip ``|x|`` at a percentile of a histogram of all values seen;
- :class:`KLObserver` - the clipping threshold minimising the KL divergence between the
  histogram and its quantized version (entropy calibration, Migacz 2017 "8-bit Inference with
  TensorRT").

The histogram observers keep a fixed number of bins over ``[0, max |x|]``; when a later batch has
a larger ``|x|`` the range grows and old counts are moved to the new bin holding their old bin
centre (an approximation of at most half a new bin, the same one ONNX Runtime's calibrator makes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .primitives import QParams, affine_qparams, qrange

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "KLObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "kl_threshold",
    "make_observer",
    "percentile_threshold",
]


class Observer(nn.Module):
    """Base class: records ``min_val``/``max_val`` buffers; ``forward`` returns its input."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    @property
    def observed(self) -> bool:
        return bool(torch.isfinite(self.min_val).all())

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.axis is None:
            return x.min(), x.max()
        flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)  # (C, rest)
        return flat.min(1).values, flat.max(1).values

    def _first_batch(self, mn: torch.Tensor, mx: torch.Tensor) -> bool:
        """The first batch's range becomes the observed range; True when this was it."""
        if self.observed:
            return False
        self.min_val, self.max_val = mn.clone(), mx.clone()
        return True

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen ``(min, max)`` clipping range."""
        return self.min_val, self.max_val

    def calculate_qparams(
        self, dtype: str = "int8", *, symmetric: bool = False, reduce_range: bool = False
    ) -> QParams:
        """Affine parameters for the observed range (see :func:`affine_qparams`)."""
        if not self.observed:
            raise RuntimeError(f"{type(self).__name__}: no data observed yet (run calibration)")
        mn, mx = self.range()
        return affine_qparams(
            mn, mx, dtype, symmetric=symmetric, axis=self.axis, reduce_range=reduce_range
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return x

    def observe(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum of everything observed (per tensor or along ``axis``)."""

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_range(x)
        if self._first_batch(mn, mx):
            return
        self.min_val = torch.minimum(self.min_val, mn)
        self.max_val = torch.maximum(self.max_val, mx)


class MovingAverageMinMaxObserver(Observer):
    """``min <- min + c (min_batch - min)`` (same for max); the first batch sets the range."""

    def __init__(self, averaging_constant: float = 0.01, axis: int | None = None) -> None:
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant={averaging_constant}: must be in (0, 1]")
        super().__init__(axis)
        self.averaging_constant = averaging_constant

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        mn, mx = self._batch_range(x)
        if self._first_batch(mn, mx):
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (mn - self.min_val)
        self.max_val = self.max_val + c * (mx - self.max_val)


def percentile_threshold(hist: torch.Tensor, bin_width: float, percentile: float) -> float:
    """Smallest bin edge ``t`` such that at least ``percentile`` % of the counts lie below it."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile}: must be in (0, 100]")
    cdf = torch.cumsum(hist.double(), 0)  # (bins,)
    total = float(cdf[-1])
    if total <= 0:
        raise ValueError("percentile_threshold: empty histogram")
    idx = int(torch.searchsorted(cdf, torch.tensor(total * percentile / 100.0, dtype=cdf.dtype)))
    return (min(idx, len(hist) - 1) + 1) * bin_width


def kl_threshold(
    hist: torch.Tensor | np.ndarray,
    bin_width: float,
    levels: int = 128,
    *,
    candidates: Iterable[int] | None = None,
) -> float:
    """Entropy calibration: the clipping threshold of minimum KL divergence (TensorRT).

    For every candidate ``i`` (number of histogram bins kept, from ``levels`` to ``len(hist)``,
    or the given ``candidates``):

    - reference ``P = hist[:i]`` with the clipped outliers ``sum(hist[i:])`` added to ``P[i-1]``;
    - candidate ``Q``: ``hist[:i]`` merged into ``levels`` equal groups of bins (the last group
      takes the remainder), each group's count spread evenly over the group's bins that are
      non-empty in ``P``, i.e. what quantizing to ``levels`` values keeps;
    - ``KL(P || Q) = sum p log(p / q)`` over normalised ``P``, ``Q`` (candidates where ``Q`` misses
      mass that ``P`` has are skipped).

    Returns ``i* x bin_width`` for the ``i*`` of least divergence (Migacz 2017, "8-bit Inference
    with TensorRT", GTC). Written with numpy ``reduceat`` group sums (no library offers it).
    """
    h = np.asarray(hist, dtype=np.float64)  # (bins,)
    nbins = len(h)
    if levels < 2 or levels > nbins:
        raise ValueError(f"levels={levels}: must be in [2, {nbins}]")
    if h.sum() <= 0:
        raise ValueError("kl_threshold: empty histogram")
    cum = np.cumsum(h)
    total = cum[-1]
    best_i, best_kl = nbins, math.inf
    cands = range(levels, nbins + 1) if candidates is None else candidates
    for i in cands:
        if not levels <= i <= nbins:
            raise ValueError(f"candidate {i}: must be in [{levels}, {nbins}]")
        p = h[:i].copy()  # (i,)
        p[i - 1] += total - cum[i - 1]
        nonzero = p > 0  # (i,)
        starts = np.arange(levels) * (i // levels)  # (levels,) group starts
        counts = np.add.reduceat(h[:i], starts)  # (levels,) the last group takes the rest
        members = np.add.reduceat(nonzero.astype(np.float64), starts)  # (levels,)
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)  # (i,)
        q = np.where(nonzero, counts[group] / np.maximum(members[group], 1), 0.0)  # (i,)
        if q.sum() <= 0 or np.any(q[nonzero] <= 0):
            continue
        pn, qn = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * bin_width


class HistogramObserver(Observer):
    """Histogram of ``|x|`` over ``[0, max|x|]`` with ``bins`` bins, plus the raw min/max.

    Subclasses choose a threshold ``t`` from the histogram; the range is then
    ``[max(min, -t), min(max, t)]``.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError(f"bins={bins}: must be >= 16")
        super().__init__(None)
        self.bins = bins
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("hist_max", torch.tensor(0.0))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        mn, mx = x.min(), x.max()
        if not self.observed:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)
        a = x.abs().reshape(-1)  # (n,)
        amax = float(a.max())
        if amax > float(self.hist_max):
            self._grow(amax)
        top = float(self.hist_max)
        if top <= 0:
            self.hist[0] += a.numel()
            return
        self.hist += torch.histc(a, self.bins, 0.0, top).double()

    def _grow(self, new_max: float) -> None:
        """Move old counts to the new bin containing their old bin centre."""
        old_max = float(self.hist_max)
        if old_max > 0 and float(self.hist.sum()) > 0:
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (old_max / self.bins)
            idx = torch.clamp((centres / (new_max / self.bins)).long(), max=self.bins - 1)
            self.hist = torch.zeros_like(self.hist).index_add_(0, idx, self.hist)
        self.hist_max = torch.tensor(new_max)

    @property
    def bin_width(self) -> float:
        return float(self.hist_max) / self.bins

    def threshold(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if float(self.hist_max) <= 0:
            return self.min_val, self.max_val
        t = torch.tensor(self.threshold())
        return torch.maximum(self.min_val, -t), torch.minimum(self.max_val, t)


class PercentileObserver(HistogramObserver):
    """Clip ``|x|`` at its ``percentile`` (e.g. 99.99) over all calibration data."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile={percentile}: must be in (0, 100]")
        super().__init__(bins)
        self.percentile = percentile

    def threshold(self) -> float:
        return percentile_threshold(self.hist, self.bin_width, self.percentile)


class KLObserver(HistogramObserver):
    """Entropy (KL-divergence) calibration over a histogram of ``|x|`` (TensorRT).

    ``levels`` is the number of quantized values available on the kept side: 128 for signed
    8-bit data, 256 for one-sided (non-negative, e.g. after ReLU) data with an 8-bit type. With
    ``levels=None`` it is chosen from ``dtype`` at :meth:`calculate_qparams` time.
    """

    def __init__(self, levels: int | None = None, bins: int = 2048) -> None:
        super().__init__(bins)
        self.levels = levels
        self._dtype = "int8"

    def calculate_qparams(
        self, dtype: str = "int8", *, symmetric: bool = False, reduce_range: bool = False
    ) -> QParams:
        self._dtype = dtype
        return super().calculate_qparams(dtype, symmetric=symmetric, reduce_range=reduce_range)

    def threshold(self) -> float:
        levels = self.levels
        if levels is None:
            qmin, qmax = qrange(self._dtype)
            n = qmax - qmin + 1
            levels = n if float(self.min_val) >= 0 else n // 2
        levels = min(levels, self.bins)
        hist = self.hist.numpy()
        # coarse-to-fine search (every 16th candidate, then every one around the best):
        # ~20x fewer divergences than the exhaustive scan and the same optimum on smooth
        # histograms; kl_threshold() itself is exhaustive by default.
        step = 16
        coarse = kl_threshold(hist, 1.0, levels, candidates=range(levels, self.bins + 1, step))
        c = int(coarse)
        fine = range(max(levels, c - step), min(self.bins, c + step) + 1)
        return kl_threshold(hist, self.bin_width, levels, candidates=fine)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "kl": KLObserver,
}


def make_observer(name: str, **kwargs) -> Observer:
    """Build an observer by name: one of :data:`OBSERVERS`."""
    if name not in OBSERVERS:
        raise ValueError(f"observer={name!r}: must be one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](**kwargs)
