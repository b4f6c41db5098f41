"""Affine quantization primitives against hand-computed values and torch's own quant ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nncompress.quant.primitives import (
    affine_qparams,
    dequantize_affine,
    fake_quantize,
    lsq_fake_quantize,
    pack_int4,
    qrange,
    quantize_affine,
    unpack_int4,
)


def test_hand_computed_qparams():
    qp = affine_qparams(-1.0, 3.0, "uint8", symmetric=False)
    assert math.isclose(float(qp.scale), 4 / 255, rel_tol=1e-6)
    assert int(qp.zero_point) == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    qp = affine_qparams(-2.0, 1.0, "int8", symmetric=True)
    assert math.isclose(float(qp.scale), 2 / 127, rel_tol=1e-6) and int(qp.zero_point) == 0
    qp = affine_qparams(-0.7, 0.35, "int4", symmetric=True)
    assert math.isclose(float(qp.scale), 0.1, rel_tol=1e-6) and int(qp.zero_point) == 0
    # the range is widened to contain 0: [2, 4] -> [0, 4]
    qp = affine_qparams(2.0, 4.0, "uint8", symmetric=False)
    assert math.isclose(float(qp.scale), 4 / 255, rel_tol=1e-6) and int(qp.zero_point) == 0
    # hand-computed quantize / dequantize
    q = quantize_affine(torch.tensor([0.0, 0.1, -0.26, 5.0]), 0.1, 3, "int4")
    assert q.tolist() == [3, 4, 0, 7]  # round(-2.6) + 3 = 0; 50 + 3 clipped to 7
    assert dequantize_affine(q, 0.1, 3).tolist() == pytest.approx([0.0, 0.1, -0.3, 0.4])


def test_asymmetric_qparams_match_torch_observer():
    from torch.ao.quantization import MinMaxObserver

    x = torch.randn(1000) * 3 + 1
    for dtype, tdtype in (("uint8", torch.quint8), ("int8", torch.qint8)):
        obs = MinMaxObserver(dtype=tdtype, qscheme=torch.per_tensor_affine)
        obs(x)
        ts, tz = obs.calculate_qparams()
        qp = affine_qparams(x.min(), x.max(), dtype, symmetric=False)
        assert float(qp.scale) == pytest.approx(float(ts), rel=1e-6)
        assert int(qp.zero_point) == int(tz)


@pytest.mark.parametrize("dtype,tdtype", [("uint8", torch.quint8), ("int8", torch.qint8)])
def test_quantize_matches_torch_quantize_per_tensor(dtype, tdtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 2
    x[:3] = torch.tensor([1e3, -1e3, 0.0])
    scale, zp = 0.1, (3 if dtype == "uint8" else -2)
    ours = quantize_affine(x, scale, zp, dtype)
    ref = torch.quantize_per_tensor(x, scale, zp, tdtype).int_repr()
    assert torch.equal(ours, ref)
    assert torch.allclose(
        dequantize_affine(ours, scale, zp),
        torch.quantize_per_tensor(x, scale, zp, tdtype).dequantize(),
    )


def test_ties_round_half_to_even_like_onnx():
    # ONNX QuantizeLinear: round(x / scale) + zero_point, ties to even (scale 0.5: exact ties)
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25])
    assert quantize_affine(x, 0.5, 0, "int8").tolist() == [0, 2, 0, -2, 2]
    assert quantize_affine(x, 0.5, 3, "int8").tolist() == [3, 5, 3, 1, 5]
    ref = torch.quantize_per_tensor(x, 0.5, 0, torch.qint8).int_repr()
    assert quantize_affine(x, 0.5, 0, "int8").tolist() == ref.tolist()


def test_quantize_matches_torch_per_channel():
    x = torch.randn(8, 3, 3, 3)
    qp = affine_qparams(x.amin((1, 2, 3)), x.amax((1, 2, 3)), "int8", symmetric=True, axis=0)
    ours = quantize_affine(x, qp.scale, qp.zero_point, "int8", axis=0)
    ref = torch.quantize_per_channel(
        x, qp.scale.double(), qp.zero_point.long(), 0, torch.qint8
    ).int_repr()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
def test_fake_quantize_matches_torch(dtype):
    qmin, qmax = qrange(dtype)
    x = (torch.randn(64, 5) * 2).requires_grad_(True)
    scale, zp = torch.tensor(0.07), torch.tensor((qmin + qmax) // 2 + 1, dtype=torch.int32)
    y = fake_quantize(x, scale, zp, dtype)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.fake_quantize_per_tensor_affine(x2, scale, zp, qmin, qmax)
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, x2.grad)
    # per channel
    s = torch.rand(5) * 0.1 + 0.01
    z = torch.randint(qmin, qmax + 1, (5,), dtype=torch.int32)
    y = fake_quantize(x.detach(), s, z, dtype, axis=1)
    ref = torch.fake_quantize_per_channel_affine(x.detach(), s, z, 1, qmin, qmax)
    assert torch.allclose(y, ref, atol=1e-6)


def test_ste_gradient_passes_inside_and_is_zero_outside():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 0.9, 5.0], requires_grad=True)
    # int8 symmetric scale 0.01: representable range [-1.28, 1.27]
    fake_quantize(x, 0.01, 0, "int8").sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_round_trip_error_is_at_most_half_a_step(dtype, symmetric, per_channel):
    x = torch.randn(16, 50) * torch.linspace(0.1, 3, 16)[:, None]
    if per_channel:
        qp = affine_qparams(x.amin(1), x.amax(1), dtype, symmetric=symmetric, axis=0)
    else:
        qp = affine_qparams(x.min(), x.max(), dtype, symmetric=symmetric)
    q = quantize_affine(x, qp.scale, qp.zero_point, dtype, axis=qp.axis)
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax
    err = (x - dequantize_affine(q, qp.scale, qp.zero_point, axis=qp.axis)).abs()
    scale = qp.scale[:, None] if per_channel else qp.scale
    # unsigned symmetric grids put zero in the middle: everything is still in range
    assert bool((err <= scale / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_is_exact(dtype, symmetric):
    x = torch.randn(200) * 0.3 + 0.2
    x[::3] = 0.0
    qp = affine_qparams(x.min(), x.max(), dtype, symmetric=symmetric)
    y = dequantize_affine(
        quantize_affine(x, qp.scale, qp.zero_point, dtype), qp.scale, qp.zero_point
    )
    assert bool((y[::3] == 0).all())


def test_lsq_gradients_follow_the_paper():
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.234, -0.051, 2.0, -3.0], requires_grad=True)
    y = lsq_fake_quantize(x, s, 0, "int4")  # Qn = -8, Qp = 7
    assert torch.allclose(y, torch.tensor([0.2, -0.1, 0.7, -0.8]), atol=1e-6)
    y.sum().backward()
    g = 1 / math.sqrt(4 * 7)
    v = x.detach() / 0.1
    expected = (
        torch.tensor(
            [round(float(v[0])) - float(v[0]), round(float(v[1])) - float(v[1]), 7.0, -8.0]
        ).sum()
        * g
    )
    assert float(s.grad) == pytest.approx(float(expected), rel=1e-4)
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_pack_int4_known_bytes():
    packed = pack_int4(torch.tensor([1, -1, 7], dtype=torch.int8))
    assert packed.tolist() == [0xF1, 0x07]
    with pytest.raises(ValueError, match="4 bits"):
        pack_int4(torch.tensor([16, 0], dtype=torch.int16))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pack_unpack_int4_round_trip(data):
    signed = data.draw(st.booleans())
    lo, hi = (-8, 7) if signed else (0, 15)
    vals = data.draw(st.lists(st.integers(lo, hi), max_size=101))
    q = torch.tensor(vals, dtype=torch.int8 if signed else torch.uint8)
    packed = pack_int4(q)
    assert packed.numel() == (len(vals) + 1) // 2
    back = unpack_int4(packed, len(vals), signed=signed)
    assert back.tolist() == vals
    # onnx decodes our bytes as the same INT4/UINT4 tensor
    from onnx import TensorProto, helper, numpy_helper

    dt = TensorProto.INT4 if signed else TensorProto.UINT4
    t = helper.make_tensor("t", dt, [len(vals)], packed.numpy().tobytes(), raw=True)
    assert np.asarray(numpy_helper.to_array(t)).astype(np.int64).tolist() == vals
