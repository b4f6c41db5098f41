"""The .ncz container: exact round trips, scheme choice, size accounting, determinism,
fp16 rounding (decoded == evaluated), checkpoints, CLI, and damaged files -> FormatError."""

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
from nncompress.engine import ConfigError
from nncompress.io import (
    EncodeConfig,
    FormatError,
    decode_bytes,
    decode_file,
    encode_state_dict,
    inspect_bytes,
    inspect_file,
    load_compressed,
    round_for_storage_,
    save_compressed,
)
from nncompress.io.container import MAGIC
from nncompress.io.fuzz import NczParts


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bit patterns (so -0.0 != 0.0 and NaN == NaN)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def assert_bit_exact(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _shared(w: torch.Tensor, keep: float, k: int, seed: int) -> torch.Tensor:
    """Prune to ``keep`` by magnitude and share the survivors among ``k`` linear centroids."""
    g = torch.Generator().manual_seed(seed)
    w = w.clone()
    thr = w.abs().flatten().kthvalue(max(1, int(w.numel() * (1 - keep)))).values
    mask = w.abs() > thr
    nz = w[mask]
    cb = torch.linspace(float(nz.min()), float(nz.max()), k) + 1e-3 * torch.rand(k, generator=g)
    idx = (nz[:, None] - cb[None]).abs().argmin(1)
    out = torch.zeros_like(w)
    out[mask] = cb[idx]
    return out


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": _shared(torch.randn(6, 3, 3, 3, generator=g), 0.6, 16, seed),
        "conv.bias": torch.randn(6, generator=g),
        "bn.running_mean": torch.randn(6, generator=g),
        "bn.num_batches_tracked": torch.tensor(1234, dtype=torch.int64),
        "fc.weight": _shared(torch.randn(10, 40, generator=g), 0.1, 8, seed + 1),
        "fc.bias": torch.zeros(10),
    }


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", ["huffman", "ans", "raw"])
def test_roundtrip_bit_exact_all_codecs(codec):
    sd = small_state()
    data, report = encode_state_dict(sd, EncodeConfig(codec=codec), metadata={"a": [1, 2]})
    back, meta = decode_bytes(data)
    assert_bit_exact(back, sd)
    assert meta == {"a": [1, 2]}
    assert report.total_bytes == len(data)
    fc = report.tensor("fc.weight")
    distinct = torch.unique(sd["fc.weight"][sd["fc.weight"] != 0]).numel()
    assert fc.scheme == "codebook" and fc.codebook_size == distinct > 4
    assert fc.nonzeros == int((sd["fc.weight"] != 0).sum())
    assert report.tensor("bn.num_batches_tracked").scheme == "dense"


def test_roundtrip_odd_dtypes_and_shapes():
    g = torch.Generator().manual_seed(5)
    sd = {
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "b": torch.rand(7, generator=g) > 0.5,
        "bf": torch.randn(5, generator=g).to(torch.bfloat16),
        "f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "half": torch.tensor([0.0, 1.5, -2.0, 1.5, 0.0], dtype=torch.float16),
        "nan": torch.tensor([float("nan"), 1.0, 0.0, float("inf"), 1.0, 0.0]),
        "zeros": torch.zeros(30, 30),
        "same": torch.full((4, 50), 0.25),
        "wide": torch.randn(3, 100, generator=g),  # > 256 distinct values: dense
    }
    for codec in ("huffman", "ans", "raw"):
        data, report = encode_state_dict(sd, EncodeConfig(codec=codec))
        assert_bit_exact(decode_bytes(data)[0], sd)
    assert report.tensor("wide").scheme == "dense"
    assert report.tensor("zeros").scheme == "codebook"
    assert report.tensor("zeros").total_bytes < 40  # 900 zeros in a few bytes


def test_negative_zero_is_zero_in_codebook_scheme():
    w = torch.tensor([[0.5, -0.0, 0.0, -0.5] * 8] * 8)  # masked negative weights give -0.0
    # (periodic rows: the pq scheme would be smaller, so the codebook scheme is forced)
    data, report = encode_state_dict({"w": w}, EncodeConfig(scheme={"w": "codebook"}))
    back = decode_bytes(data)[0]["w"]
    assert report.tensor("w").scheme == "codebook" and report.tensor("w").codebook_size == 2
    assert torch.equal(back, w)  # equal values ...
    assert not torch.signbit(back[back == 0]).any()  # ... decoded as +0.0


def test_same_input_same_bytes(tmp_path):
    sd = small_state(3)
    cfg = EncodeConfig(codec="ans")
    r1 = save_compressed(sd, tmp_path / "a.ncz", cfg, {"x": 1})
    r2 = save_compressed({k: v.clone() for k, v in sd.items()}, tmp_path / "b.ncz", cfg, {"x": 1})
    assert (tmp_path / "a.ncz").read_bytes() == (tmp_path / "b.ncz").read_bytes()
    assert r1.to_dict() == r2.to_dict()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_report_sums_and_inspect_agree(tmp_path):
    sd = small_state(1)
    path = tmp_path / "m.ncz"
    report = save_compressed(sd, path, EncodeConfig())
    assert path.stat().st_size == report.total_bytes
    parts = report.prefix_bytes + report.header_bytes + report.metadata_bytes
    assert parts + sum(t.total_bytes for t in report.tensors) == report.total_bytes
    assert report.original_bytes == sum(v.numel() * v.element_size() for v in sd.values())
    inspected = inspect_file(path)
    assert inspected.to_dict()["tensors"] == report.to_dict()["tensors"]
    for t in report.tensors:
        if t.scheme == "codebook":
            assert t.codebook_bits == 32 * t.codebook_size
            for s in t.streams:
                assert s.total_bits == 8 * (
                    (t.weight_bits if s.role == "codes" else t.index_bits_coded) // 8
                )
                assert s.entropy <= max(s.bits_per_symbol, 0) + 1e-9 or s.symbols == 0
            if t.layout == "sparse":
                assert t.index_bits_pq == t.index_bits * (t.nonzeros + t.fillers)
                assert t.weight_bits_pq == t.nonzeros * int(np.ceil(np.log2(t.codebook_size)))


def test_sparse_layout_and_order_choice():
    # a (300, 100) layer whose nonzeros fill 2 adjacent columns: row-major (CSR) needs 3
    # fillers per row for the gap of 98 zeros, column-major (CSC) one run of 500 zeros, so
    # 'auto' must pick F; forcing C must cost more bytes (identical rows: the codebook scheme
    # is forced, the pq scheme would store one subvector)
    w = torch.zeros(300, 100)
    w[:, [5, 6]] = torch.tensor([0.5, -0.25]).repeat(300, 1)
    cb = {"w": "codebook"}
    data, rep = encode_state_dict({"w": w}, EncodeConfig(codec="raw", scheme=cb))
    t = rep.tensor("w")
    assert (t.layout, t.order) == ("sparse", "F")
    forced = encode_state_dict({"w": w}, EncodeConfig(codec="raw", order="C", scheme=cb))
    forced = forced[1].tensor("w")
    assert forced.order == "C" and forced.fillers > t.fillers
    assert forced.total_bytes > t.total_bytes
    assert torch.equal(decode_bytes(data)[0]["w"], w)
    for layout in ("dense", "sparse"):
        data, rep = encode_state_dict({"w": w}, EncodeConfig(layout=layout, scheme=cb))
        assert rep.tensor("w").layout == layout
        assert torch.equal(decode_bytes(data)[0]["w"], w)


def test_index_bits_defaults_and_overrides():
    sd = small_state()
    rep = encode_state_dict(sd, EncodeConfig(codec="raw", order="C"))[1]
    if rep.tensor("conv.weight").layout == "sparse":
        assert rep.tensor("conv.weight").index_bits == 8
    cfg = EncodeConfig(codec="raw", index_bits={"fc": 3}, scheme={"fc.weight": "codebook"})
    data, rep = encode_state_dict(sd, cfg)
    fc = rep.tensor("fc.weight")
    if fc.layout == "sparse":
        assert fc.index_bits == 3
    assert_bit_exact(decode_bytes(data)[0], sd)
    dense = encode_state_dict(sd, EncodeConfig(scheme={"fc": "dense"}))[1]
    assert dense.tensor("fc.weight").scheme == "dense"


def test_auto_index_bits_never_loses():
    g = torch.Generator().manual_seed(11)
    sd = {"fc.weight": _shared(torch.randn(60, 200, generator=g), 0.05, 16, 4)}
    fixed = encode_state_dict(sd, EncodeConfig(codec="huffman"))
    data, rep = encode_state_dict(sd, EncodeConfig(codec="huffman", auto_index_bits=True))
    assert len(data) <= len(fixed[0])
    assert 2 <= rep.tensor("fc.weight").index_bits <= 12
    assert_bit_exact(decode_bytes(data)[0], sd)
    pinned = EncodeConfig(auto_index_bits=True, index_bits={"fc": 3}, layout="sparse")
    assert encode_state_dict(sd, pinned)[1].tensor("fc.weight").index_bits == 3


def test_config_validation_names_the_field():
    for kwargs, field in [
        ({"codec": "zip"}, "codec='zip'"),
        ({"index_bits_fc": 0}, "index_bits_fc=0"),
        ({"index_bits_conv": 17}, "index_bits_conv=17"),
        ({"index_bits": {"fc1": 40}}, "index_bits['fc1']=40"),
        ({"scheme": {"fc1": "zip"}}, "scheme['fc1']='zip'"),
        ({"codebook_dtype": "int8"}, "codebook_dtype='int8'"),
        ({"max_codebook_bits": 0}, "max_codebook_bits=0"),
        ({"order": "Z"}, "order='Z'"),
        ({"layout": "csr"}, "layout='csr'"),
    ]:
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            EncodeConfig(**kwargs)
    with pytest.raises(ConfigError, match="unknown field"):
        EncodeConfig.from_dict({"codex": "ans"})
    assert EncodeConfig.from_dict(EncodeConfig(codec="ans").to_dict()) == EncodeConfig(codec="ans")
    with pytest.raises(ConfigError, match=r"index_bits\['nope'\]"):
        encode_state_dict(small_state(), EncodeConfig(index_bits={"nope": 4}))
    with pytest.raises(ConfigError, match="distinct nonzero values"):
        encode_state_dict({"w": torch.randn(20, 30)}, EncodeConfig(scheme={"w": "codebook"}))
    with pytest.raises(ValueError, match="JSON"):
        encode_state_dict(small_state(), metadata={"x": object()})


def test_fp16_options_and_round_for_storage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    with torch.no_grad():
        model[0].weight.copy_(_shared(model[0].weight, 0.3, 16, 0) / 3.0)  # not fp16-exact
    cfg = EncodeConfig(codebook_dtype="fp16", dense_dtype="fp16")
    lossy = decode_bytes(encode_state_dict(model, cfg)[0])[0]
    assert not torch.equal(lossy["2.weight"], model.state_dict()["2.weight"])  # it did round
    changes = round_for_storage_(model, cfg)
    assert changes["2.weight"] > 0 and changes["2.weight"] < 1e-3
    x = torch.randn(8, 20)
    evaluated = model(x)
    data, report = encode_state_dict(model, cfg)
    assert report.tensor("2.weight").dense_store == "float16"
    decoded = decode_bytes(data)[0]
    assert_bit_exact(decoded, model.state_dict())  # decoded == evaluated, bit for bit
    clone = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    clone.load_state_dict(decoded)
    assert torch.equal(clone(x), evaluated)
    assert round_for_storage_(model, cfg)["2.weight"] == 0.0  # idempotent


def test_save_load_compressed_and_checkpoint_bridge(tmp_path):
    from nncompress.engine import load_checkpoint, save_checkpoint
    from nncompress.io import checkpoint_metadata, decode_to_checkpoint
    from nncompress.models import create

    model = create("lenet-300-100", in_features=64, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.copy_(_shared(p, 0.1, 32, 0))
    ckpt = save_checkpoint(
        model,
        tmp_path / "m.safetensors",
        model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 10},
        metrics={"acc": 0.5},
    )
    loaded, sidecar = load_checkpoint(ckpt)
    report = save_compressed(loaded, tmp_path / "m.ncz", metadata=checkpoint_metadata(sidecar))
    assert report.ratio > 5
    fresh = create("lenet-300-100", in_features=64, num_classes=10)
    meta = load_compressed(fresh, tmp_path / "m.ncz")
    assert meta["checkpoint"]["metrics"] == {"acc": 0.5}
    assert_bit_exact(fresh.state_dict(), model.state_dict())
    out = decode_to_checkpoint(tmp_path / "m.ncz", tmp_path / "d.safetensors")
    m2, side2 = load_checkpoint(out)
    assert_bit_exact(m2.state_dict(), model.state_dict())
    assert side2["metrics"] == {"acc": 0.5}
    with pytest.raises(ValueError, match="do not fit"):
        load_compressed(nn.Linear(3, 3), tmp_path / "m.ncz")
    with pytest.raises(ValueError, match="checkpoint"):
        save_compressed(small_state(), tmp_path / "x.ncz")
        decode_to_checkpoint(tmp_path / "x.ncz", tmp_path / "x.safetensors")


def test_cli_encode_inspect_decode(tmp_path, capsys):
    from nncompress.cli import main
    from nncompress.engine import load_checkpoint, save_checkpoint
    from nncompress.models import create

    model = create("lenet-300-100", in_features=64, num_classes=10)
    with torch.no_grad():
        model.fc1.weight.copy_(_shared(model.fc1.weight, 0.1, 32, 0))
    ckpt = save_checkpoint(
        model,
        tmp_path / "m.safetensors",
        model_name="lenet-300-100",
        model_kwargs={"in_features": 64, "num_classes": 10},
    )
    ncz = tmp_path / "m.ncz"
    assert (
        main(
            ["encode", str(ckpt), "--out", str(ncz), "--codec", "ans", "--auto-index-bits"]
            + ["--quiet", "--json"]
        )
        == 0
    )
    enc = json.loads(capsys.readouterr().out)
    assert enc["total_bytes"] == ncz.stat().st_size
    assert main(["inspect", str(ncz), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == enc["tensors"]
    assert main(["inspect", str(ncz), "--streams"]) == 0
    assert "fc1.weight" in capsys.readouterr().out
    assert main(["decode", str(ncz), "--out", str(tmp_path / "d.safetensors")]) == 0
    m2, _ = load_checkpoint(tmp_path / "d.safetensors")
    assert_bit_exact(m2.state_dict(), model.state_dict())
    ctx = tmp_path / "ctx.ncz"
    args = ["--codec", "context", "--layout", "context", "--quiet"]
    assert main(["encode", str(ckpt), "--out", str(ctx), *args]) == 0
    capsys.readouterr()
    assert main(["inspect", str(ctx), "--streams"]) == 0
    text = capsys.readouterr().out
    assert "context" in text and "map" in text and "classes" in text
    assert main(["decode", str(ctx), "--out", str(tmp_path / "c.safetensors")]) == 0
    m3, _ = load_checkpoint(tmp_path / "c.safetensors")
    assert_bit_exact(m3.state_dict(), model.state_dict())
    bad = tmp_path / "bad.ncz"
    bad.write_bytes(ncz.read_bytes()[:-3])
    assert main(["inspect", str(bad)]) == 2
    assert "error" in capsys.readouterr().err


# ----------------------------------------------------------------------------- damaged files

BASE_STATE = {
    "w": _shared(torch.randn(30, 40, generator=torch.Generator().manual_seed(9)), 0.05, 8, 2),
    "c": _shared(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(8)), 0.5, 6, 3),
    "b": torch.randn(5, generator=torch.Generator().manual_seed(7)),
    "n": torch.tensor(7, dtype=torch.int64),
}
BASES = {
    codec: encode_state_dict(BASE_STATE, EncodeConfig(codec=codec, codec_fallback=False), {"m": 1})[
        0
    ]
    for codec in ("huffman", "ans", "raw")
}
BASES["context"] = encode_state_dict(
    BASE_STATE, EncodeConfig(codec="context", layout="context"), {"m": 1}
)[0]


def _rebuild(header, metadata, sections: list[bytes], minor: int = 0) -> bytes:
    """A file with valid CRCs around arbitrary (possibly absurd) contents."""

    def js(o) -> bytes:
        return zlib.compress(json.dumps(o).encode())

    return NczParts(1, minor, [js(header), js(metadata), *sections]).assemble()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BASES)), st.integers(0, 2**63 - 1))
def test_fuzz_mutated_files_raise_format_error(codec, seed):
    """400 examples x 8 files = 3200 damaged files: each must raise FormatError."""
    rng = np.random.default_rng(seed)
    for _ in range(FILES_PER_EXAMPLE):
        data = mutate(BASES[codec], rng)
        if data == BASES[codec]:
            continue
        with pytest.raises(FormatError):
            decode_bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(BASES)), st.integers(0, 2**63 - 1))
def test_fuzz_mutations_behind_valid_crcs(codec, seed):
    """Damage inside a section with its CRC recomputed, so the parsers past the CRC check
    see it (100 x 8 = 800 files): each must decode or raise FormatError, nothing else."""
    rng = np.random.default_rng(seed)
    for _ in range(FILES_PER_EXAMPLE):
        data = damage_section(BASES[codec], rng)
        if data is not None:
            decode_or_format_error(data)


def test_wrong_magic_version_and_trailing_bytes():
    data = BASES["huffman"]
    with pytest.raises(FormatError, match="magic"):
        decode_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(FormatError, match="version 2."):
        decode_bytes(data[:8] + struct.pack("<H", 2) + data[10:])
    with pytest.raises(FormatError, match="unexpected bytes"):
        decode_bytes(data + b"\x00")
    with pytest.raises(FormatError, match="too short"):
        decode_bytes(b"")
    with pytest.raises(FormatError, match="CRC32"):
        decode_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FormatError, match="section count"):
        decode_bytes(data[:12] + struct.pack("<I", 2**31) + data[16:])


def _header_of(data: bytes):
    secs = sections(data)
    h = json.loads(zlib.decompress(data[secs[0][0] : secs[0][0] + secs[0][1]]))
    payloads = [data[s : s + n] for s, n in secs[2:]]
    return h, payloads


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e.update(shape=[10**6, 10**6]), "max_elements"),
        (lambda e: e.update(shape=[2**14, 2**13]), "implausible"),
        (lambda e: e.update(shape=[-1, 20]), "shape"),
        (lambda e: e.update(shape="12x20"), "wrong type"),
        (lambda e: e.update(dtype="complex64"), "dtype"),
        (lambda e: e.update(scheme="zip"), "scheme"),
        (lambda e: e.update(k=10**9), "k="),
        (lambda e: e.update(nnz=10**7), "nnz="),
        (lambda e: e.update(b=0), "b=0"),
        (lambda e: e.update(entries=10**12), "entries="),
        (lambda e: e.pop("codes"), "'codes' missing"),
        (lambda e: e["codes"].update(sec=0), "sec=0"),
        (lambda e: e["codes"].update(codec="lzma"), "codec"),
        (lambda e: e.update(order="Z"), "order"),
        (lambda e: e.update(nnz=e["nnz"] - 1, entries=e["nnz"] - 1), "symbol count"),
        (lambda e: e.update(nnz=e["nnz"] - 1), "symbol count=60: larger"),
        (lambda e: e.update(k=e["k"] + 1), "codebook has"),
    ],
)
def test_crafted_headers_raise_format_error(edit, message):
    header, payloads = _header_of(BASES["huffman"])
    entry = next(e for e in header["tensors"] if e["name"] == "w")
    assert entry["layout"] == "sparse"
    edit(entry)
    with pytest.raises(FormatError, match=message):
        decode_bytes(_rebuild(header, {"m": 1}, payloads))


def test_crafted_sections_raise_format_error():
    header, payloads = _header_of(BASES["huffman"])
    # a section referenced twice / one left unreferenced
    h2 = json.loads(json.dumps(header))
    h2["tensors"][1]["codebook"] = h2["tensors"][0]["codebook"]
    with pytest.raises(FormatError, match="referenced twice"):
        decode_bytes(_rebuild(h2, None, payloads))
    with pytest.raises(FormatError, match="references"):
        decode_bytes(_rebuild(header, None, [*payloads, b"extra"]))
    # a stream claiming 2**40 symbols must not allocate
    entry = next(e for e in header["tensors"] if e["name"] == "w")
    bad = list(payloads)
    bad[entry["codes"]["sec"] - 2] = b"\x80\x80\x80\x80\x80\x40" + b"\x00" * 8
    with pytest.raises(FormatError, match="codes"):
        decode_bytes(_rebuild(header, None, bad))
    # deflate bomb in the header is refused
    bomb = zlib.compress(b" " * (17 << 20))
    body = [bomb, zlib.compress(b"null"), *payloads]
    data = (
        MAGIC
        + struct.pack("<HHI", 1, 0, len(body))
        + b"".join(struct.pack("<II", len(p), zlib.crc32(p)) + p for p in body)
    )
    with pytest.raises(FormatError, match="larger than"):
        decode_bytes(data)
    with pytest.raises(FormatError, match="JSON"):
        decode_bytes(_rebuild_raw_header(b"[" * 100000, payloads))


def _rebuild_raw_header(text: bytes, payloads) -> bytes:
    body = [zlib.compress(text), zlib.compress(b"null"), *payloads]
    return (
        MAGIC
        + struct.pack("<HHI", 1, 0, len(body))
        + b"".join(struct.pack("<II", len(p), zlib.crc32(p)) + p for p in body)
    )


def test_decode_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_file(tmp_path / "none.ncz")
    rep = inspect_bytes(BASES["ans"])
    assert {t.name for t in rep.tensors} == set(BASE_STATE)


# ----------------------------------------------------------------------------- context layout


def _structured_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A magnitude-pruned fc layer with dead rows/columns and density structure, shared."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.exp(-(((torch.arange(200) - 100) / 50.0) ** 2))  # image-like inputs
    w = torch.randn(60, 200, generator=g) * cols * torch.rand(60, 1, generator=g)
    w[:5] = 0.0
    return {
        "fc.weight": _shared(w, 0.1, 16, seed),
        "fc.bias": torch.randn(60, generator=g),
        "conv.weight": _shared(torch.randn(8, 4, 3, 3, generator=g), 0.3, 8, seed),
    }


def test_context_layout_roundtrip_version_and_size():
    sd = _structured_state()
    old, rep_old = encode_state_dict(sd, EncodeConfig(codec="ans", auto_index_bits=True))
    data, rep = encode_state_dict(sd, EncodeConfig(codec="context", auto_index_bits=True))
    assert_bit_exact(decode_bytes(data)[0], sd)
    assert rep.tensor("fc.weight").layout == "context"
    assert struct.unpack_from("<HH", data, 8) == (1, 4)  # format 1.4 when the layout is used
    assert struct.unpack_from("<HH", old, 8) == (1, 2)  # and 1.2 otherwise
    assert len(data) < len(old)
    forced, rep_f = encode_state_dict(sd, EncodeConfig(layout="context"))
    assert_bit_exact(decode_bytes(forced)[0], sd)
    assert rep_f.tensor("conv.weight").layout == "context"  # 4-D: matrix (8, 36)
    assert rep_f.tensor("fc.bias").layout != "context"  # 1-D: falls back
    # the report's streams: classes, map, codes, tables, adding up to the section
    t = inspect_bytes(data).tensor("fc.weight")
    roles = [s.role for s in t.streams]
    assert roles == ["classes", "map", "codes", "tables"]
    assert sum(s.total_bits for s in t.streams) == t.weight_bits + t.index_bits_coded
    m = t.streams[1]
    assert m.symbols == 60 * 200 and m.bits_per_symbol < m.entropy  # contexts beat i.i.d.
    assert rep.tensor("fc.weight").total_bytes == t.total_bytes


def test_context_layout_refused_in_a_1_0_file_and_for_1_d():
    header, payloads = _header_of(BASES["context"])
    entry = next(e for e in header["tensors"] if e["name"] == "w")
    assert entry["layout"] == "context"
    assert (
        decode_bytes(_rebuild(header, {"m": 1}, payloads, minor=4))[0].keys() == BASE_STATE.keys()
    )
    with pytest.raises(FormatError, match="need 1.4"):
        decode_bytes(_rebuild(header, {"m": 1}, payloads, minor=2))
    entry["shape"] = [entry["shape"][0] * entry["shape"][1]]
    with pytest.raises(FormatError, match="2\\+ dimensions"):
        decode_bytes(_rebuild(header, {"m": 1}, payloads, minor=4))
    header, payloads = _header_of(BASES["context"])
    entry = next(e for e in header["tensors"] if e["name"] == "w")
    entry["codes"]["codec"] = "ans"
    with pytest.raises(FormatError, match="codec"):
        decode_bytes(_rebuild(header, {"m": 1}, payloads, minor=4))
    entry["codes"]["codec"] = "context"
    entry["nnz"] += 1
    with pytest.raises(FormatError, match="nonzeros"):
        decode_bytes(_rebuild(header, {"m": 1}, payloads, minor=4))


def test_context_layout_working_memory_is_bounded_by_max_bytes():
    import tracemalloc

    w = _shared(torch.randn(512, 512, generator=torch.Generator().manual_seed(0)), 0.9, 8, 0)
    data, rep = encode_state_dict({"w": w}, EncodeConfig(layout="context"))
    assert rep.tensor("w").layout == "context"
    out_bytes = w.numel() * 4
    with pytest.raises(FormatError, match="working memory"):  # the output alone would fit
        decode_bytes(data, max_bytes=4 * out_bytes)
    limit = 8 * out_bytes  # 32 bytes per element: the decoder's declared working bound
    tracemalloc.start()
    try:
        got = decode_bytes(data, max_bytes=limit)[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(got["w"], w)
    assert peak <= limit, (peak, limit)
