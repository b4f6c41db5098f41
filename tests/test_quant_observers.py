"""Range observers against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from nncompress.quant.observers import (
    HistogramObserver,
    KLObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PercentileObserver,
    kl_threshold,
    make_observer,
    percentile_threshold,
)


def _batches(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 4, 6, generator=g) * (i + 1) - i for i in range(n)]


def test_minmax_per_tensor_and_per_channel():
    xs = _batches()
    obs, chan = MinMaxObserver(), MinMaxObserver(axis=1)
    for x in xs:
        assert obs(x) is x
        chan(x)
    allx = np.concatenate([x.numpy() for x in xs])
    assert float(obs.min_val) == allx.min() and float(obs.max_val) == allx.max()
    assert np.allclose(chan.min_val.numpy(), allx.min(axis=(0, 2)))
    assert np.allclose(chan.max_val.numpy(), allx.max(axis=(0, 2)))
    qp = obs.calculate_qparams("uint8")
    assert float(qp.scale) == pytest.approx((allx.max() - allx.min()) / 255, rel=1e-6)


def test_moving_average_recurrence():
    xs = _batches()
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1)
    mn, mx = None, None
    for x in xs:
        obs(x)
        bmin, bmax = float(x.min()), float(x.max())
        mn = bmin if mn is None else mn + 0.1 * (bmin - mn)
        mx = bmax if mx is None else mx + 0.1 * (bmax - mx)
    assert float(obs.min_val) == pytest.approx(mn, rel=1e-5)
    assert float(obs.max_val) == pytest.approx(mx, rel=1e-5)
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)


def test_histogram_keeps_counts_when_range_grows():
    obs = HistogramObserver(bins=256)
    xs = _batches()
    for x in xs:
        obs(x)
    assert float(obs.hist.sum()) == sum(x.numel() for x in xs)
    assert float(obs.hist_max) == pytest.approx(max(float(x.abs().max()) for x in xs))


def test_percentile_threshold_matches_numpy():
    g = np.random.default_rng(0)
    a = np.abs(g.standard_normal(200_000))
    bins = 2048
    hist, edges = np.histogram(a, bins=bins, range=(0, a.max()))
    t = percentile_threshold(torch.from_numpy(hist), edges[1], 99.0)
    assert abs(t - np.percentile(a, 99.0)) <= 2 * edges[1]
    obs = PercentileObserver(99.0, bins=bins)
    obs(torch.from_numpy(g.standard_normal(100_000).astype(np.float32)))
    lo, hi = obs.range()
    assert float(hi) == pytest.approx(
        np.percentile(np.abs(g.standard_normal(400_000)), 99), rel=0.02
    )
    assert float(lo) == pytest.approx(-float(hi))


def _kl_reference(hist: np.ndarray, levels: int) -> int:
    """Straightforward TensorRT entropy calibration, one loop per candidate and per group."""
    best_i, best = len(hist), np.inf
    for i in range(levels, len(hist) + 1):
        ref = hist[:i].astype(np.float64).copy()
        ref[i - 1] += hist[i:].sum()
        group = i // levels
        cand = np.zeros(i)
        for j in range(levels):
            lo = j * group
            hi = i if j == levels - 1 else (j + 1) * group
            chunk = hist[lo:hi]
            nz = ref[lo:hi] > 0
            if nz.sum():
                cand[lo:hi][nz] = chunk.sum() / nz.sum()
        if cand.sum() <= 0 or np.any((cand == 0) & (ref > 0)):
            continue
        kl = entropy(ref / ref.sum(), cand / cand.sum())
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_kl_threshold_matches_numpy_reference_and_clips_outliers():
    g = np.random.default_rng(1)
    # Laplace bulk plus a few large outliers: entropy calibration must clip the tail
    x = np.concatenate([g.laplace(0, 1, 100_000), g.uniform(20, 40, 20)])
    bins, levels = 512, 64
    hist, edges = np.histogram(np.abs(x), bins=bins, range=(0, np.abs(x).max()))
    width = edges[1]
    i_ref = _kl_reference(hist, levels)
    t = kl_threshold(torch.from_numpy(hist), width, levels)
    assert t == pytest.approx(i_ref * width)
    assert t < 0.5 * np.abs(x).max()  # outliers clipped
    assert t > np.percentile(np.abs(x), 99)  # the bulk kept


def test_kl_observer_one_sided_uses_all_levels():
    g = torch.Generator().manual_seed(0)
    obs = KLObserver(bins=1024)
    obs(torch.relu(torch.randn(50_000, generator=g)))
    qp = obs.calculate_qparams("uint8")
    assert int(qp.zero_point) == 0
    lo, hi = obs.range()
    assert float(lo) == 0.0 and 0 < float(hi) <= float(obs.max_val)


def test_make_observer_errors():
    with pytest.raises(ValueError, match="observer='nope'"):
        make_observer("nope")
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver().calculate_qparams()
    with pytest.raises(ValueError, match="percentile=101"):
        PercentileObserver(101)
