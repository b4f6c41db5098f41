"""The ``sparse`` scheme of the .ncz container (format 1.5): pruned float tensors stored as
relative-index positions plus byte-plane-coded values; bit-exact round trips, the scheme
chosen for a pruned model, fp16 storage matching round_for_storage_, and damaged files."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nncompress as nc
from ncz_damage import FILES_PER_EXAMPLE, damage_section, decode_or_format_error, mutate
from nncompress.core.errors import ConfigError
from nncompress.io import (
    EncodeConfig,
    FormatError,
    decode_bytes,
    encode_state_dict,
    inspect_bytes,
    round_for_storage_,
)
from nncompress.io.format import SCHEME_MINOR
from nncompress.io.fuzz import NczParts


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def _pruned(shape, density, seed, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    keep = torch.rand(shape, generator=g) < density
    return (w * keep).to(dtype)  # pruned negative weights are -0.0 here


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    special = _pruned((40, 30), 0.1, seed + 3)
    special[0, 0], special[0, 1], special[1, 2] = float("nan"), float("inf"), -1e-40
    return {
        "conv.weight": _pruned((16, 8, 3, 3), 0.15, seed),
        "fc.weight": _pruned((64, 200), 0.08, seed + 1),
        "half.weight": _pruned((32, 32), 0.2, seed + 2, torch.float16),
        "special.weight": special,  # NaN, inf and a denormal survive bit for bit
        "fc.bias": torch.randn(64, generator=torch.Generator().manual_seed(seed)),
    }


def _expected(t: torch.Tensor) -> torch.Tensor:
    """What the file holds: the tensor with -0.0 written as +0.0 (the format's zero rule)."""
    return torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)


@pytest.mark.parametrize("codec", ["huffman", "ans", "raw"])
@pytest.mark.parametrize("auto_b", [False, True])
def test_sparse_round_trip_bit_exact(codec, auto_b):
    state = _state()
    config = EncodeConfig(codec=codec, auto_index_bits=auto_b, scheme={"fc.bias": "dense"})
    data, report = encode_state_dict(state, config)
    back, meta = decode_bytes(data)
    assert meta is None  # a state dict (not a module) gets no architecture
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(_bits(back[name]), _bits(_expected(t))), name
    schemes = {t.name: t.scheme for t in report.tensors}
    assert schemes["fc.weight"] == "sparse" and schemes["conv.weight"] == "sparse"
    assert struct.unpack_from("<H", data, 10)[0] == SCHEME_MINOR["sparse"] == 5
    # the itemised sizes add up to the file, and inspect agrees with the writer
    assert report.total_bytes == len(data)
    parts = report.prefix_bytes + report.header_bytes + report.metadata_bytes
    assert parts + sum(t.total_bytes for t in report.tensors) == len(data)
    seen = inspect_bytes(data)
    assert [t.to_dict() for t in seen.tensors] == [t.to_dict() for t in report.tensors]


def test_values_stored_as_fp16_only_when_exact_or_asked():
    exact = _pruned((50, 40), 0.1, 7).half().float()  # every value is a float16
    data, rep = encode_state_dict({"w": exact})
    assert rep.tensor("w").dense_store == "float16"
    assert torch.equal(_bits(decode_bytes(data)[0]["w"]), _bits(_expected(exact)))
    plain = _pruned((50, 40), 0.1, 7)
    assert encode_state_dict({"w": plain})[1].tensor("w").dense_store == "float32"
    data16, rep16 = encode_state_dict({"w": plain}, EncodeConfig(dense_dtype="fp16"))
    assert rep16.tensor("w").dense_store == "float16" and len(data16) < len(
        encode_state_dict({"w": plain})[0]
    )
    ref = _expected(plain).half().float()
    assert torch.equal(_bits(decode_bytes(data16)[0]["w"]), _bits(ref))


def test_pruned_model_is_stored_sparse_and_round_for_storage_matches():
    torch.manual_seed(0)
    model = nc.create_model("lenet-300-100")
    nc.prune_(model, nc.MagnitudeConfig(sparsity=0.92))
    plain = nc.prune.folded_copy(model)
    data, rep = encode_state_dict(plain)
    dense = sum(4 * p.numel() for p in plain.parameters())
    assert rep.tensor("fc1.weight").scheme == "sparse"
    # values + positions of 8% of the weights: well under a quarter of the dense bytes
    assert len(data) < 0.25 * dense
    back, meta = decode_bytes(data)
    assert meta["checkpoint"]["architecture"]["model"] == "lenet-300-100"
    for name, t in plain.state_dict().items():
        assert torch.equal(_bits(back[name]), _bits(_expected(t)))
    cfg = EncodeConfig(dense_dtype="fp16")
    round_for_storage_(plain, cfg)
    back16, _ = decode_bytes(encode_state_dict(plain, cfg)[0])
    for name, t in plain.state_dict().items():
        assert torch.equal(_bits(back16[name]), _bits(t)), name


def test_forced_scheme_and_dense_tensors():
    dense = torch.randn(30, 30)
    data, rep = encode_state_dict({"w": dense})
    assert rep.tensor("w").scheme == "dense"  # never tried above 75% nonzeros
    assert struct.unpack_from("<H", data, 10)[0] == 2  # 1.2 readers still read it
    with pytest.raises(ConfigError, match="scheme\\['w'\\]='sparse'"):
        encode_state_dict({"w": dense}, EncodeConfig(scheme={"w": "sparse"}))
    with pytest.raises(ConfigError, match="sparse"):
        encode_state_dict(
            {"i": torch.zeros(5, dtype=torch.int64)}, EncodeConfig(scheme={"i": "sparse"})
        )
    zero = torch.zeros(8, 8)
    data, _ = encode_state_dict({"z": zero}, EncodeConfig(scheme={"z": "sparse"}))
    assert torch.equal(decode_bytes(data)[0]["z"], zero)


# ------------------------------------------------------------------------ damaged files

BASE = {
    codec: encode_state_dict(
        _state(5), EncodeConfig(codec=codec, codec_fallback=False, scheme={"fc.bias": "dense"})
    )[0]
    for codec in ("huffman", "ans", "raw")
}


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BASE)), st.integers(0, 2**63 - 1))
def test_fuzz_mutated_sparse_files_raise_format_error(codec, seed):
    """100 examples x 8 = 800 damaged files: each must raise FormatError."""
    rng = np.random.default_rng(seed)
    for _ in range(FILES_PER_EXAMPLE):
        data = mutate(BASE[codec], rng)
        if data != BASE[codec]:
            with pytest.raises(FormatError):
                decode_bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BASE)), st.integers(0, 2**63 - 1))
def test_fuzz_sparse_sections_behind_valid_crcs(codec, seed):
    """Damage inside a section with its CRC recomputed (800 files): decode or FormatError."""
    rng = np.random.default_rng(seed)
    for _ in range(FILES_PER_EXAMPLE):
        data = damage_section(BASE[codec], rng)
        if data is not None:
            decode_or_format_error(data)


def _rebuild(header, sections: list[bytes], minor: int = 5) -> bytes:
    payloads = [zlib.compress(json.dumps(header).encode()), zlib.compress(b"null"), *sections]
    return NczParts(1, minor, payloads).assemble()  # valid (index-bound) CRCs


def _parts(data: bytes):
    parts = NczParts.parse(data)
    return parts.header, list(parts.payloads[2:])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e.update(nnz=e["nnz"] + 1), "nonzeros, header says|entries=|symbols? over"),
        (lambda e: e.update(nnz=10**9), "nnz=1000000000 outside"),
        (lambda e: e.update(b=0), "b=0 outside"),
        (lambda e: e.update(b=e["b"] + 1), "symbol|index|entries"),
        (lambda e: e.update(order="K"), "order='K'"),
        (lambda e: e.update(vals="float64"), "vals='float64'"),
        (lambda e: e.update(vals="float16"), "value planes"),
        (lambda e: e.update(planes=e["planes"][:3]), "3 value planes"),
        (lambda e: e["planes"][0].update(codec="zip"), "codec='zip'"),
        (lambda e: e.pop("index"), "'index' missing"),
        (lambda e: e.update(dtype="int32"), "sparse scheme for dtype"),
        (lambda e: e.update(entries=e["entries"] - 1), "entries=|symbol count|index"),
        (lambda e: e.update(shape=[64, 100]), "runs past|outside|nnz="),
    ],
)
def test_crafted_sparse_headers_raise_format_error(edit, message):
    header, payloads = _parts(BASE["huffman"])
    entry = next(e for e in header["tensors"] if e["name"] == "fc.weight")
    assert entry["scheme"] == "sparse" and entry["vals"] == "float32"
    edit(entry)
    with pytest.raises(FormatError, match=message):
        decode_bytes(_rebuild(header, payloads))


def test_version_and_zero_values_are_checked():
    header, payloads = _parts(BASE["raw"])
    with pytest.raises(FormatError, match="need 1.5"):
        decode_bytes(_rebuild(header, payloads, minor=4))
    # a stored value of zero is refused (zeros are positions, never values)
    entry = next(e for e in header["tensors"] if e["name"] == "fc.weight")
    sec = entry["planes"][0]["sec"] - 2
    raw = bytearray(payloads[sec])
    # raw stream: varint n, u8 width (8), then one byte per symbol: zero the first value
    n_len = 1
    while raw[n_len - 1] & 0x80:
        n_len += 1
    for plane in entry["planes"]:
        p = bytearray(payloads[plane["sec"] - 2])
        p[n_len + 1] = 0
        payloads[plane["sec"] - 2] = bytes(p)
    with pytest.raises(FormatError, match="stored value is zero"):
        decode_bytes(_rebuild(header, payloads))
