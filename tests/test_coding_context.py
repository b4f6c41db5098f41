"""The context coder (coding/context.py): exact round trips for every model, the model cost
against the bytes actually written, the choice of the model, and damaged streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompress.coding import CodingError
from nncompress.coding.context import (
    CODE_CONTEXTS,
    MAP_BITS,
    ContextConfig,
    best_context_config,
    context_decode,
    context_encode,
)


def _layer(rng, R, C, keep, k, dead_rows=0, dead_cols=0):
    """A pruned layer with row/column density structure: -1 = zero, else a code."""
    row_s = rng.gamma(1.0, size=R)
    col_s = np.exp(-(((np.arange(C) - C / 2) / (C / 4)) ** 2))  # an image-like input profile
    p = np.clip(keep * np.outer(row_s, col_s) / (row_s.mean() * col_s.mean()), 0, 1)
    mask = rng.random((R, C)) < p
    mask[:dead_rows] = False
    mask[:, :dead_cols] = False
    codes = np.full((R, C), -1)
    probs = np.exp(-np.arange(k) / 3.0)
    codes[mask] = rng.choice(k, size=int(mask.sum()), p=probs / probs.sum())
    return codes


def _roundtrip(codes, k, cfg):
    stream = context_encode(codes, k, cfg)
    data = stream.to_bytes()
    mask, vals, back = context_decode(data, *codes.shape, k, int((codes >= 0).sum()))
    np.testing.assert_array_equal(mask, codes >= 0)
    np.testing.assert_array_equal(vals, codes[codes >= 0])
    assert back.config == stream.config and back.to_bytes() == data
    return stream, data


@pytest.mark.parametrize("ctx", CODE_CONTEXTS)
@pytest.mark.parametrize("g", MAP_BITS)
def test_every_model_roundtrips(ctx, g):
    rng = np.random.default_rng(0)
    codes = _layer(rng, 37, 53, 0.15, 9, dead_rows=3, dead_cols=5)
    for nr, nc in [(1, 1), (3, 2), (6, 8)]:
        _roundtrip(codes, 9, ContextConfig(nr, nc, ctx, g))


matrices = st.builds(
    lambda seed, R, C, keep, k: _layer(np.random.default_rng(seed), R, C, keep, k),
    st.integers(0, 10**6),
    st.integers(1, 30),
    st.integers(1, 30),
    st.sampled_from([0.0, 0.02, 0.3, 1.0]),
    st.integers(1, 20),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matrices, st.sampled_from(MAP_BITS), st.sampled_from(CODE_CONTEXTS))
def test_roundtrip_property(codes, g, ctx):
    k = 20
    _roundtrip(codes, k, ContextConfig(4, 3, ctx, g))
    cfg, est = best_context_config(codes, k, choices=(1, 2, 4))
    stream, data = _roundtrip(codes, k, cfg)
    assert abs(8 * len(data) - est) <= 64 + 0.002 * est  # the model cost is the real size


def test_contexts_beat_iid_on_structured_layer():
    rng = np.random.default_rng(1)
    codes = _layer(rng, 120, 300, 0.08, 16, dead_rows=10, dead_cols=40)
    _, iid = _roundtrip(codes, 16, ContextConfig(1, 1, "none", 1))
    cfg, _ = best_context_config(codes, 16)
    _, best = _roundtrip(codes, 16, cfg)
    assert len(best) < 0.93 * len(iid)
    # the chosen model is never bigger than any other candidate (up to the speed tolerance)
    for nr, nc, ctx in [(4, 4, "none"), (8, 8, "row"), (2, 6, "col")]:
        _, other = _roundtrip(codes, 16, ContextConfig(nr, nc, ctx, 1))
        assert len(best) <= len(other) * 1.003 + 8


def test_damaged_streams_raise_coding_error():
    rng = np.random.default_rng(2)
    codes = _layer(rng, 40, 60, 0.2, 8, dead_rows=2)
    nnz = int((codes >= 0).sum())
    data = context_encode(codes, 8, ContextConfig(3, 3, "row", 2)).to_bytes()
    with pytest.raises(CodingError):
        context_decode(data, 40, 60, 8, nnz + 1)  # the header's count disagrees
    with pytest.raises(CodingError):
        context_decode(data, 41, 60, 8, nnz)  # class counts do not add up
    for cut in range(0, len(data), max(1, len(data) // 25)):
        with pytest.raises(CodingError):
            context_decode(data[:cut], 40, 60, 8, nnz)
    caught = 0
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x24
        try:
            mask, vals, _ = context_decode(bytes(bad), 40, 60, 8, nnz)
        except CodingError:
            caught += 1
        else:  # a flip may decode to another valid matrix, never to a wrong size
            assert mask.shape == (40, 60) and vals.size == nnz == int(mask.sum())
    assert caught > len(data) // 2


def test_bad_config_and_input_are_refused():
    with pytest.raises(ValueError, match="map_bits"):
        ContextConfig(map_bits=3)
    with pytest.raises(ValueError, match="row_classes"):
        ContextConfig(row_classes=0)
    with pytest.raises(ValueError, match="code_context"):
        ContextConfig(code_context="left")
    with pytest.raises(ValueError, match="must be -1"):
        context_encode(np.array([[0, 5]]), 5)
