"""The ``pq`` scheme of the .ncz container: bit-exact round trips, a product-quantized model
decoded bit for bit, size accounting = file bytes, overrides, and damaged files."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ncz_damage import FILES_PER_EXAMPLE, damage_section, decode_or_format_error, mutate, sections
from nncompress.engine import ConfigError, strip_parametrizations
from nncompress.io import (
    EncodeConfig,
    FormatError,
    decode_bytes,
    encode_state_dict,
    inspect_file,
    save_compressed,
)
from nncompress.io.fuzz import NczParts
from nncompress.quant import PQConfig, pq_quantize_


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def _pq_tensor(shape, d, k, seed, *, zero_rows=0, fp16=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(k, d, generator=g)
    if fp16:
        cb = cb.half().float()
    n = int(np.prod(shape)) // d
    codes = torch.randint(k, (n,), generator=g)
    rows = cb[codes]  # (n, d)
    rows[:zero_rows] = 0
    return rows.reshape(shape)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": _pq_tensor((16, 8, 3, 3), 9, 12, seed, zero_rows=10),
        "fc.weight": _pq_tensor((10, 64), 8, 5, seed + 1, fp16=True),
        "fc.bias": torch.randn(10, generator=torch.Generator().manual_seed(seed)),
    }


@pytest.mark.parametrize("codec", ["huffman", "ans", "raw"])
def test_pq_round_trip_bit_exact(codec):
    state = _state()
    data, report = encode_state_dict(state, EncodeConfig(codec=codec))
    back, _ = decode_bytes(data)
    for name, t in state.items():
        assert torch.equal(_bits(back[name]), _bits(t)), name
    conv, fc = report.tensor("conv.weight"), report.tensor("fc.weight")
    assert (conv.scheme, conv.block_size, conv.codebook_size) == ("pq", 9, 12)
    assert conv.codebook_dtype == "float32"  # random fp32 codewords: stored exactly
    assert (fc.scheme, fc.block_size, fc.codebook_dtype) == ("pq", 8, "float16")  # fp16-exact
    # 12 codewords + the reserved all-zero code: 4-bit fixed-width codes
    assert conv.weight_bits_pq == 128 * 4
    assert report.total_bytes == len(data)
    assert data[10:12] == struct.pack("<H", 2)  # every file written now is 1.2 (bound CRCs)
    plain, _ = encode_state_dict({"b": state["fc.bias"]})
    # 1.0 / 1.1 files carry exactly the minor their contents need (like ZIP's "version
    # needed"): 1.1 with a pq tensor, 1.0 without
    old_pq, old_plain = _as_version(data, 1), _as_version(plain, 0)
    assert decode_bytes(old_pq)[0]["fc.weight"].equal(back["fc.weight"])
    with pytest.raises(FormatError, match="need 1.1"):
        decode_bytes(_as_version(data, 0))
    with pytest.raises(FormatError, match="need 1.0"):
        decode_bytes(_as_version(plain, 1))
    assert decode_bytes(old_plain)[0]["b"].equal(state["fc.bias"])


def _as_version(data: bytes, minor: int) -> bytes:
    parts = NczParts.parse(data)
    parts.minor = minor
    return parts.assemble()


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 24, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 6),
    )


def test_quantized_model_decodes_to_the_evaluated_weights(tmp_path):
    torch.manual_seed(0)
    model = _tiny_net()
    batches = [(torch.randn(8, 3, 8, 8), torch.zeros(8)) for _ in range(3)]
    cfg = PQConfig(k=8, em_iters=4, calibration_batches=2, layer_steps=2, global_steps=2)
    report = pq_quantize_(model, cfg, batches)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        y = model(x)
    path = tmp_path / "m.ncz"
    enc = save_compressed(model, path)
    assert enc.total_bytes == path.stat().st_size  # size accounting = file bytes
    state, _ = decode_bytes(path.read_bytes())
    evaluated = strip_parametrizations(model).state_dict()
    assert list(state) == list(evaluated)
    for name, t in evaluated.items():
        assert torch.equal(_bits(state[name]), _bits(t)), name  # bit for bit
    for r in report.layers:
        t = enc.tensor(f"{r.name}.weight")
        assert t.scheme == "pq" and t.block_size == r.block_size, r.name
        assert t.codebook_size <= r.k
        assert t.bits_per_weight == pytest.approx(8 * t.total_bytes / t.numel)
    fresh = _tiny_net().eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    rep = inspect_file(path)
    headers, rows = rep.rows()
    assert "d" in headers and "bits/w" in headers
    row = rows[[r[0] for r in rows].index("0.weight")]
    assert row[1] == "pq" and row[headers.index("d")] == 9


def test_block_size_hint_from_the_model_and_overrides():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    batches = [torch.randn(16, 12) for _ in range(2)]
    cfg = PQConfig(
        k=4,
        block_size_fc=6,
        per_layer_block_size={"2": 4},
        em_iters=3,
        calibration_batches=1,
        layer_steps=0,
    )
    pq_quantize_(model, cfg, batches, filter="0")
    no_auto = EncodeConfig(pq_block_sizes=())
    _, rep = encode_state_dict(model, no_auto)  # d=6 comes from the model's parametrization
    assert rep.tensor("0.weight").scheme == "pq" and rep.tensor("0.weight").block_size == 6
    plain = strip_parametrizations(model).state_dict()
    _, rep = encode_state_dict(plain, no_auto)  # a plain state dict: no hint, no pq
    assert rep.tensor("0.weight").scheme != "pq"
    data, rep = encode_state_dict(plain, EncodeConfig(pq_block_size={"0": 3}))
    assert rep.tensor("0.weight").block_size == 3
    assert torch.equal(decode_bytes(data)[0]["0.weight"], plain["0.weight"])
    with pytest.raises(ConfigError, match=r"pq_block_size\['2.weight'\]=5: does not divide"):
        encode_state_dict(plain, EncodeConfig(pq_block_size={"2": 5}))
    with pytest.raises(ConfigError, match="more than 65536 distinct"):
        encode_state_dict({"w": torch.randn(300, 1000)}, EncodeConfig(pq_block_size={"w": 1}))
    with pytest.raises(ConfigError, match="conflicts"):
        encode_state_dict(plain, EncodeConfig(pq_block_size={"0": 3}, scheme={"0": "dense"}))
    with pytest.raises(ConfigError, match="no tensor"):
        encode_state_dict(plain, EncodeConfig(pq_block_size={"nope": 3}))
    with pytest.raises(ConfigError, match="pq_block_sizes entry"):
        EncodeConfig(pq_block_sizes=(4, 0))
    assert EncodeConfig.from_dict({"pq_block_sizes": [4, 9]}).pq_block_sizes == (4, 9)


def test_dense_tensors_never_use_pq_and_fp16_option_rounds():
    w = torch.randn(64, 36)
    _, rep = encode_state_dict({"w": w})
    assert rep.tensor("w").scheme == "dense"
    pq = _pq_tensor((32, 36), 9, 6, 3)
    data, rep = encode_state_dict({"w": pq}, EncodeConfig(codebook_dtype="fp16"))
    assert rep.tensor("w").codebook_dtype == "float16"
    assert torch.equal(decode_bytes(data)[0]["w"], pq.half().float())


# ----------------------------------------------------------------------------- damaged files

BASE = {
    codec: encode_state_dict(_state(5), EncodeConfig(codec=codec, codec_fallback=False))[0]
    for codec in ("huffman", "ans", "raw")
}


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BASE)), st.integers(0, 2**63 - 1))
def test_fuzz_mutated_pq_files_raise_format_error(codec, seed):
    rng = np.random.default_rng(seed)
    for _ in range(FILES_PER_EXAMPLE):
        data = mutate(BASE[codec], rng)
        if data != BASE[codec]:
            with pytest.raises(FormatError):
                decode_bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BASE)), st.integers(0, 2**63 - 1))
def test_fuzz_pq_sections_behind_valid_crcs(codec, seed):
    rng = np.random.default_rng(seed)
    for _ in range(FILES_PER_EXAMPLE):
        data = damage_section(BASE[codec], rng)
        if data is not None:
            decode_or_format_error(data)


def _rebuild(header, sections: list[bytes]) -> bytes:
    body = [zlib.compress(json.dumps(header).encode()), zlib.compress(b"null"), *sections]
    return NczParts(1, 1, body).assemble()  # format 1.1: valid CRCs


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e.update(d=0), "d=0"),
        (lambda e: e.update(d=7), "d=7 does not divide"),
        (lambda e: e.update(d=2**13), "d=8192"),
        (lambda e: e.update(k=0), "k=0"),
        (lambda e: e.update(k=2**16 + 1), "k=65537"),
        (lambda e: e.update(k=e["k"] + 1), "codebook has"),
        (lambda e: e.update(zero=1), "'zero'=1 has the wrong type"),
        (lambda e: e.update(zero=False), "symbol out of range|values; expected"),
        (lambda e: e.update(cb="int8"), "codebook dtype"),
        (lambda e: e.update(dtype="int64"), "pq scheme for dtype"),
        (lambda e: e.pop("codes"), "'codes' missing"),
        (lambda e: e["codes"].update(codec="zip"), "codec"),
        (lambda e: e.update(shape=[16, 8, 3, 6]), "symbol count|symbols over"),
    ],
)
def test_crafted_pq_headers_raise_format_error(edit, message):
    data = BASE["huffman"]
    secs = sections(data)
    header = json.loads(zlib.decompress(data[secs[0][0] : secs[0][0] + secs[0][1]]))
    payloads = [data[s : s + n] for s, n in secs[2:]]
    entry = next(e for e in header["tensors"] if e["name"] == "conv.weight")
    assert entry["scheme"] == "pq" and entry["zero"] is True
    edit(entry)
    with pytest.raises(FormatError, match=message):
        decode_bytes(_rebuild(header, payloads))
