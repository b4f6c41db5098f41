import copy

import numpy as np
import pytest
import torch
from torch import nn

from nncompress.engine import ConfigError
from nncompress.engine.batches import main_output, run_model
from nncompress.io import decode_bytes, encode_state_dict
from nncompress.quant.gptq import HessianAccumulator, gptq_quantize, layer_output_error
from nncompress.quant.groupwise import group_qparams, rtn_quantize
from nncompress.quant.weight_only import (
    AffineWeight,
    WeightOnlyConfig,
    quantize_weights_,
    quantized_layers,
)


def _correlated(n=1024, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * 0.3
    return torch.randn(n, d, generator=g) @ mix + torch.randn(d, generator=g)


def _np_rtn(w, bits, g, sym):
    """Reference RTN in float64 numpy (same float16 rounding of the scale)."""
    out, inp = w.shape
    wg = w.reshape(out, inp // g, g).astype(np.float64)
    lo, hi = wg.min(2), wg.max(2)
    maxq = 2**bits - 1
    if sym:
        s = np.maximum(np.abs(lo), np.abs(hi)) / (2 ** (bits - 1) - 1)
    else:
        s = (hi - lo) / maxq
    s = np.clip(s, 2**-14, 65504).astype(np.float16).astype(np.float64)
    z = np.full_like(s, 2 ** (bits - 1)) if sym else np.clip(np.round(-lo / s), 0, maxq)
    q = np.clip(np.round(wg / s[..., None]) + z[..., None], 0, maxq)
    return ((q - z[..., None]) * s[..., None]).reshape(out, inp)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_numpy_reference(bits, group, sym):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    qw = rtn_quantize(w, bits, group, sym)
    g = group or 64
    ref = _np_rtn(w.numpy(), bits, g, sym)
    np.testing.assert_allclose(qw.dequantize().numpy(), ref, rtol=0, atol=1e-6)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) < 2**bits
    assert qw.scale.shape == (24, 64 // g) and (qw.zero is None) == sym
    # round to nearest: within half a step of every weight that is not clipped
    s = qw.scale.float().repeat_interleave(g, dim=1)
    assert bool(((qw.dequantize() - w).abs() <= s / 2 + 1e-6).float().mean() > 0.97)


def test_mse_clip_never_worse_than_plain_rtn():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    plain = rtn_quantize(w, 3, 16)
    clipped = rtn_quantize(w, 3, 16, mse_clip=True)
    assert float((clipped.dequantize() - w).pow(2).sum()) <= float(
        (plain.dequantize() - w).pow(2).sum()
    )
    s, z = group_qparams(w, 3, 16, mse_clip=True)
    assert s.shape == z.shape == (32, 4)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_at_most_rtn(bits, group, sym, act_order):
    x = _correlated()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    acc = HessianAccumulator(64)
    acc.add(x)
    h = acc.hessian
    rtn = rtn_quantize(w, bits, group, sym)
    q = gptq_quantize(w, h, bits, group, sym, block_size=24, act_order=act_order)
    e_rtn = layer_output_error(w, rtn.dequantize(), h)
    e_gptq = layer_output_error(w, q.dequantize(), h)
    assert e_gptq <= e_rtn
    # the objective really is the output error on the calibration inputs
    direct = ((x @ (w - q.dequantize()).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert abs(float(direct) - e_gptq) <= 1e-3 * max(e_gptq, 1e-9) + 1e-9


def test_gptq_with_diagonal_hessian_is_rtn():
    """No correlations to exploit: the error feedback is zero and GPTQ rounds like RTN."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    h = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(4)) + 0.5)
    for group in (None, 8):
        q = gptq_quantize(w, h, 4, group, damp=1e-6)
        assert torch.equal(q.codes, rtn_quantize(w, 4, group).codes)


def test_hessian_accumulator_matches_definition():
    x = _correlated(300, 8)
    acc = HessianAccumulator(8)
    acc.add(x[:100].reshape(10, 10, 8))
    acc.add(x[100:])
    np.testing.assert_allclose(
        acc.hessian.numpy(), (2 * x.double().T @ x.double() / 300).numpy(), rtol=1e-5
    )


class _DictNet(nn.Module):
    """A model that takes keyword arguments, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)
        )
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def _dict_batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (8, 12), generator=g)} for _ in range(n)]


def _out(model, batches):
    with torch.no_grad():
        return torch.cat([main_output(run_model(model, b)) for b in batches])


def test_quantize_weights_8bit_matches_float_and_gptq_beats_rtn():
    torch.manual_seed(0)
    net = _DictNet().eval()
    calib = _dict_batches()
    ref = _out(net, calib)
    m8 = copy.deepcopy(net)
    quantize_weights_(m8, WeightOnlyConfig(bits=8, group_size=None), calib)
    rel8 = float((_out(m8, calib) - ref).norm() / ref.norm())
    assert rel8 < 5e-3
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(net)
        rep = quantize_weights_(m, WeightOnlyConfig(bits=3, group_size=16, method=method), calib)
        errs[method] = float((_out(m, calib) - ref).norm() / ref.norm())
        assert {r.method for r in rep.layers if r.kind != "embedding"} == {method}
    assert errs["gptq"] <= errs["rtn"]


def test_tied_weights_stay_tied_and_are_stored_once():
    net = _DictNet().eval()
    rep = quantize_weights_(net, WeightOnlyConfig(bits=4, group_size=16), _dict_batches())
    layers = quantized_layers(net)
    assert layers["emb"] is layers["head"]  # one parametrization for the tied pair
    assert net.emb.weight.data_ptr() != 0 and torch.equal(net.emb.weight, net.head.weight)
    tied = [r for r in rep.layers if r.tied]
    assert len(tied) == 1 and tied[0].name == "head" and tied[0].tied == ["emb"]
    data, report = encode_state_dict(net)
    schemes = {t.name: t.scheme for t in report.tensors}
    assert schemes["head.weight"] == "alias" and schemes["emb.weight"] == "affine"
    state, _ = decode_bytes(data)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if "parametrizations" not in name:
                assert torch.equal(state[name], t), name
        assert torch.equal(state["emb.weight"], net.emb.weight)
        assert torch.equal(state["head.weight"], net.emb.weight)


def test_affine_storage_is_compact_and_bit_exact():
    net = _DictNet().eval()
    quantize_weights_(net, WeightOnlyConfig(bits=4, group_size=16, method="rtn"))
    data, report = encode_state_dict(net)
    state, _ = decode_bytes(data)
    for i in range(2):
        for j in (0, 2):
            w = net.blocks[i][j].weight
            assert torch.equal(state[f"blocks.{i}.{j}.weight"], w)
            t = report.tensor(f"blocks.{i}.{j}.weight")
            assert t.scheme == "affine"
            # 4-bit codes + fp16 scale + 4-bit zero per 16 weights, at most, plus frames
            assert t.total_bytes <= w.numel() * (4 + 20 / 16) / 8 + 3 * 8 + 1


def test_config_errors_are_raised_before_work():
    net = _DictNet()
    with pytest.raises(ConfigError, match="bits=9"):
        WeightOnlyConfig(bits=9)
    with pytest.raises(ConfigError, match="method='gptq'"):
        quantize_weights_(net, WeightOnlyConfig())
    with pytest.raises(ConfigError, match="group_size=24"):
        quantize_weights_(net, WeightOnlyConfig(group_size=24, method="rtn"))
    with pytest.raises(ConfigError, match=r"per_layer\['nope\*'\]"):
        quantize_weights_(net, WeightOnlyConfig(method="rtn", per_layer={"nope*": 4}))
    with pytest.raises(ConfigError, match="different bits"):
        quantize_weights_(net, WeightOnlyConfig(method="rtn", per_layer={"head": 3}))
    assert not quantized_layers(net)


def test_per_layer_wildcards_and_skip():
    net = _DictNet()
    rep = quantize_weights_(
        net,
        WeightOnlyConfig(
            bits=4, method="rtn", group_size=16, per_layer={"blocks.0.*": 8, "blocks.1.2": None}
        ),
    )
    bits = {r.name: r.bits for r in rep.layers}
    assert bits["blocks.0.0"] == bits["blocks.0.2"] == 8 and bits["blocks.1.0"] == 4
    assert "blocks.1.2" in rep.skipped and "blocks.1.2" not in quantized_layers(net)
    assert isinstance(quantized_layers(net)["blocks.0.0"], AffineWeight)


def test_damaged_affine_and_alias_files_decode_or_raise_format_error():
    """Bit flips anywhere (CRCs recomputed so the damage reaches the parsers): decode or
    FormatError, never another exception."""
    import struct

    from nncompress.io import FormatError
    from nncompress.io.format import section_crc

    net = _DictNet().eval()
    quantize_weights_(net, WeightOnlyConfig(bits=3, group_size=16, method="rtn"))
    data, report = encode_state_dict(net)
    assert {"affine", "alias"} <= {t.scheme for t in report.tensors}
    # section boundaries: 16-byte prefix, then (u32 length, u32 crc, payload)*
    secs, pos = [], 16
    while pos < len(data):
        length = struct.unpack_from("<I", data, pos)[0]
        secs.append((pos + 8, length))
        pos += 8 + length
    rng = np.random.default_rng(0)
    for _ in range(300):
        buf = bytearray(data)
        k = int(rng.integers(0, len(secs)))
        start, length = secs[k]
        if length == 0:
            continue
        for _ in range(int(rng.integers(1, 4))):
            buf[start + int(rng.integers(0, length))] = int(rng.integers(0, 256))
        # the CRC as format 1.2+ defines it (bound to the section index)
        struct.pack_into("<I", buf, start - 4, section_crc(k, bytes(buf[start : start + length])))
        try:
            decode_bytes(bytes(buf))
        except FormatError:
            pass


def test_weight_only_recipe_stage(digits_data):
    from nncompress.models import create
    from nncompress.stages import stage_entry
    from nncompress.stages.base import StageContext

    cls, run = stage_entry("weight_only")
    cfg = cls(bits=4, group_size=16, per_channel_fallback=True, calibration=128, batch_size=32)
    assert cfg.algorithm == WeightOnlyConfig(bits=4, group_size=16, per_channel_fallback=True)
    model = create("lenet-300-100", in_features=64).eval()
    from nncompress.engine import TrainConfig

    ctx = StageContext(model, digits_data, "lenet-300-100", {}, TrainConfig(), None)
    out = run(ctx, cfg)
    assert [r["name"] for r in out["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(r["method"] == "gptq" for r in out["layers"])
    assert set(quantized_layers(model)) == {"fc1", "fc2", "fc3"}
    with pytest.raises(ConfigError, match="calibration=0"):
        cls(calibration=0)
