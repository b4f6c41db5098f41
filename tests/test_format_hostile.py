"""Hostile ``.ncz`` files (issue 19): decompression bombs and bounded decoding, sections
moved to another place, the reader and docs/format.md agreeing strictly, and a structured
fuzz target of the decoder. Every file here is crafted by the test itself."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nncompress.coding.bitpack import pack_bits, write_uvarint
from nncompress.coding.huffman import huffman_encode
from nncompress.io import (
    DEFAULT_MAX_BYTES,
    EncodeConfig,
    FormatError,
    decode_bytes,
    encode_state_dict,
    inspect_bytes,
)
from nncompress.io.format import BOUND_CRC_MINOR, section_crc
from nncompress.io.fuzz import NczParts, fuzz_bases, fuzz_decoder, memory_bound, mutate, to_v10

MAGIC = b"\x89NCZ\r\n\x1a\n"


def build(
    header, metadata, payloads, minor: int = BOUND_CRC_MINOR, raw_header: bytes | None = None
):
    """A file with valid frames and CRCs (as version 1.``minor`` defines them)."""
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    body = [zlib.compress(head), zlib.compress(json.dumps(metadata).encode()), *payloads]
    frames = b"".join(
        struct.pack("<II", len(p), section_crc(i, p, minor)) + p for i, p in enumerate(body)
    )
    return MAGIC + struct.pack("<HHI", 1, minor, len(body)) + frames


def entry(name, shape, **fields):
    return {"name": name, "dtype": "float32", "shape": list(shape), **fields}


def huffman_constant(n: int, symbol: int) -> bytes:
    """A Huffman stream of ``n`` copies of ``symbol`` (no payload: L = 0)."""
    return write_uvarint(n) + write_uvarint(symbol + 1) + b"\x00"


def raw_stream(symbols, alphabet: int) -> bytes:
    w = max(0, alphabet - 1).bit_length()
    return write_uvarint(len(symbols)) + bytes([w]) + pack_bits(np.asarray(symbols, np.int64), w)


def peak_of(fn):
    tracemalloc.start()
    try:
        out = fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, peak


# ------------------------------------------------------------------ 2. decompression bombs


def test_declared_output_beyond_max_bytes_is_refused_before_allocating():
    # a 40-byte constant stream declaring 4 GiB of float32
    numel = 1 << 30
    hdr = {"format": "nncompress-ncz", "tensors": [
        entry("w", [1 << 15, 1 << 15], scheme="codebook", k=1, cb="float32", nnz=numel,
              codebook=2, layout="dense", codes={"sec": 3, "codec": "huffman"}),
    ]}  # fmt: skip
    data = build(hdr, None, [np.float32([1.5]).tobytes(), huffman_constant(numel, 0)])
    assert len(data) < 300
    with pytest.raises(FormatError, match="max_bytes"):
        _, peak = peak_of(lambda: decode_bytes(data, max_elements=1 << 31))
    _, peak = peak_of(lambda: pytest.raises(FormatError, decode_bytes, data, max_elements=1 << 31))
    assert peak < 1 << 20  # nothing was allocated for it
    # the caller's limit applies, in elements and in bytes
    small = (1 << 20) * 4
    hdr["tensors"][0].update(shape=[1 << 10, 1 << 10], nnz=1 << 20)
    data = build(hdr, None, [np.float32([1.5]).tobytes(), huffman_constant(1 << 20, 0)])
    assert decode_bytes(data)[0]["w"].shape == (1024, 1024)
    with pytest.raises(FormatError, match=f"max_bytes={small - 1}"):
        decode_bytes(data, max_bytes=small - 1)
    with pytest.raises(FormatError, match="more than max_elements=1048575"):
        decode_bytes(data, max_elements=(1 << 20) - 1)
    with pytest.raises(ValueError, match="max_bytes=-1"):
        decode_bytes(data, max_bytes=-1)
    assert DEFAULT_MAX_BYTES == 1 << 31


@pytest.mark.parametrize("layout", ["dense", "sparse-C", "sparse-F"])
def test_bomb_within_limits_allocates_only_the_declared_output(layout):
    """A ~100-byte file declaring a 32 MiB constant tensor: decoding allocates the tensor and
    nothing proportional to it besides (no int64 code array, no second copy)."""
    numel = 1 << 23
    shape = [1 << 12, 1 << 11]
    if layout == "dense":
        e = entry("w", shape, scheme="codebook", k=1, cb="float32", nnz=numel, codebook=2,
                  layout="dense", codes={"sec": 3, "codec": "ans"})  # fmt: skip
        streams = [np.float32([2.5]).tobytes(), _ans_constant(numel, 0)]
    else:
        # every entry real with gap 0: a sparse layout that is in fact dense
        e = entry("w", shape, scheme="codebook", k=1, cb="float32", nnz=numel, codebook=2,
                  layout="sparse", order=layout[-1], b=4, entries=numel,
                  codes={"sec": 3, "codec": "huffman"}, index={"sec": 4, "codec": "ans"})  # fmt: skip
        streams = [
            np.float32([2.5]).tobytes(),
            huffman_constant(numel, 0),
            _ans_constant(numel, 0),
        ]
    data = build({"format": "nncompress-ncz", "tensors": [e]}, None, streams)
    assert len(data) < 300
    (state, _), peak = peak_of(lambda: decode_bytes(data))
    out_bytes = 4 * numel
    assert torch.equal(state["w"], torch.full(tuple(shape), 2.5))
    assert peak < 1.1 * out_bytes + (2 << 20), (peak, out_bytes)
    assert peak <= memory_bound(len(data), out_bytes)


def _ans_constant(n: int, symbol: int) -> bytes:
    counts = np.zeros(symbol + 1, np.int64)
    counts[symbol] = n
    w = n.bit_length()
    return write_uvarint(n) + write_uvarint(symbol + 1) + bytes([w]) + pack_bits(counts, w)


def test_stream_cannot_declare_more_symbols_than_its_bits_hold():
    """A Huffman stream of T payload bits yields at most T symbols; a raw stream exactly its
    packed count; a sparse layout at most as many nonzeros as index entries."""
    base = {"w": torch.tensor([[0.0, 1.0, 0.0, 2.0]] * 4)}
    data, _ = encode_state_dict(base, EncodeConfig(codec="huffman", layout="dense"))
    parts = NczParts.parse(data)
    hdr = parts.header
    e = hdr["tensors"][0]
    big = 1 << 24
    e.update(shape=[1 << 12, 1 << 12], nnz=big // 2)
    hs = huffman_encode(np.array([0, 1, 2] * 6))  # 18 codes, ~29 payload bits
    fake = bytearray(hs.to_bytes())
    fake[0:1] = b""  # replace n by 2**24 (the rest unchanged)
    fake = write_uvarint(big) + bytes(fake)
    parts.payloads[e["codes"]["sec"]] = fake
    parts.payloads[0] = zlib.compress(json.dumps(hdr).encode())
    with pytest.raises(FormatError, match="codes"):
        decode_bytes(parts.assemble())
    # sparse: nnz may not exceed the entries of the index stream
    sp = {"format": "nncompress-ncz", "tensors": [
        entry("w", [100], scheme="codebook", k=1, cb="float32", nnz=5, codebook=2,
              layout="sparse", order="C", b=4, entries=4,
              codes={"sec": 3, "codec": "raw"}, index={"sec": 4, "codec": "raw"}),
    ]}  # fmt: skip
    payloads = [np.float32([1.0]).tobytes(), raw_stream([0] * 5, 1), raw_stream([1] * 4, 16)]
    with pytest.raises(FormatError, match="entries=4 outside"):
        decode_bytes(build(sp, None, payloads))


# ------------------------------------------------------------------ 4. moved sections


def _two_layer_file():
    g = torch.Generator().manual_seed(0)
    cb1 = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    cb2 = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    state = {
        "fc1.weight": cb1[torch.randint(0, 4, (20, 30), generator=g)],
        "fc2.weight": cb2[torch.randint(0, 4, (10, 20), generator=g)],
    }
    data, _ = encode_state_dict(state, EncodeConfig(codec="huffman", layout="dense"))
    return state, data


def test_swapped_codebooks_are_refused_and_old_files_still_read():
    state, data = _two_layer_file()
    parts = NczParts.parse(data)
    hdr = parts.header
    a, b = (e["codebook"] for e in hdr["tensors"])
    assert len(parts.payloads[a]) == len(parts.payloads[b])  # same size: only the CRC can tell
    crcs = [section_crc(i, p) for i, p in enumerate(parts.payloads)]
    parts.payloads[a], parts.payloads[b] = parts.payloads[b], parts.payloads[a]
    crcs[a], crcs[b] = crcs[b], crcs[a]
    with pytest.raises(FormatError, match=f"section {a}: CRC32 mismatch.*moved"):
        decode_bytes(parts.assemble(crcs))
    # the same swap in a version 1.0 file went unnoticed (why 1.1 binds CRCs to indices)
    old = NczParts.parse(to_v10(data))
    old.payloads[a], old.payloads[b] = old.payloads[b], old.payloads[a]
    swapped, _ = decode_bytes(old.assemble())
    assert not torch.equal(swapped["fc1.weight"], state["fc1.weight"])
    # version 1.0 files are still read, bit for bit
    v10 = to_v10(data)
    assert struct.unpack_from("<HH", v10, 8) == (1, 0)
    assert struct.unpack_from("<HH", data, 8) == (1, BOUND_CRC_MINOR)  # no newer scheme inside
    for name, t in decode_bytes(v10)[0].items():
        assert torch.equal(t, state[name])
    # a 1.1 file whose CRCs are 1.0-style is damaged
    with pytest.raises(FormatError, match="CRC32"):
        decode_bytes(v10[:10] + struct.pack("<H", BOUND_CRC_MINOR) + v10[12:])


# ------------------------------------------------------------------ 11. reader = spec


def _sparse_file(codebook: np.ndarray, cb="float32"):
    hdr = {"format": "nncompress-ncz", "tensors": [
        entry("w", [2, 8], scheme="codebook", k=int(codebook.size), cb=cb, nnz=3, codebook=2,
              layout="sparse", order="C", b=4, entries=3,
              codes={"sec": 3, "codec": "raw"}, index={"sec": 4, "codec": "raw"}),
    ]}  # fmt: skip
    k = int(codebook.size)
    return hdr, [codebook.tobytes(), raw_stream([0, k - 1, 0], k), raw_stream([1, 0, 5], 16)]


def test_codebook_rules_of_the_spec():
    hdr, p = _sparse_file(np.float32([-1.0, 0.5, 2.0]))
    w = decode_bytes(build(hdr, None, p))[0]["w"].reshape(-1)
    assert w[[1, 2, 8]].tolist() == [-1.0, 2.0, -1.0] and int((w != 0).sum()) == 3
    for bad, msg in [
        (np.float32([-1.0, 0.0, 2.0]), "holds a zero"),
        (np.float32([-1.0, -0.0, 2.0]), "holds a zero"),
        (np.float32([2.0, 0.5, -1.0]), "not sorted"),
        (np.float32([0.5, 0.5, 2.0]), "not sorted"),
        (np.float32([np.nan, 0.5, 2.0]), "NaN before a number"),
        (np.float32([0.5, np.nan, np.nan]), "same NaN twice"),
    ]:
        hdr, p = _sparse_file(bad)
        with pytest.raises(FormatError, match=msg):
            decode_bytes(build(hdr, None, p))
    # NaNs last, with distinct payloads, are allowed (they are kept bit-exactly)
    nans = np.array([0x7FC00000, 0x7FC00001], np.uint32).view(np.float32)
    hdr, p = _sparse_file(np.concatenate([np.float32([0.5]), nans]))
    assert decode_bytes(build(hdr, None, p))[0]["w"].isnan().sum() == 1
    # an empty codebook for a tensor with nonzeros
    hdr, p = _sparse_file(np.float32([1.0]))
    hdr["tensors"][0]["k"] = 0
    with pytest.raises(FormatError, match="k=0 inconsistent"):
        decode_bytes(build(hdr, None, p))


def test_bool_bytes_must_be_0_or_1():
    hdr = {"format": "nncompress-ncz", "tensors": [
        {"name": "m", "dtype": "bool", "shape": [4], "scheme": "dense", "store": "raw",
         "data": 2},
    ]}  # fmt: skip
    assert decode_bytes(build(hdr, None, [b"\x00\x01\x01\x00"]))[0]["m"].tolist() == [
        False, True, True, False,
    ]  # fmt: skip
    with pytest.raises(FormatError, match="bool bytes must be 0 or 1, found 2"):
        decode_bytes(build(hdr, None, [b"\x00\x01\x02\x00"]))


def test_padding_bits_must_be_zero():
    # raw stream: 3 symbols of 4 bits = 12 bits; the last 4 bits of the 2nd byte are padding
    hdr, p = _sparse_file(np.float32([-1.0, 0.5, 2.0]))
    good = build(hdr, None, p)
    decode_bytes(good)
    idx = bytearray(p[2])
    idx[-1] |= 0x01
    with pytest.raises(FormatError, match="nonzero padding bits"):
        decode_bytes(build(hdr, None, [p[0], p[1], bytes(idx)]))
    # huffman payload and code-length table
    sym = np.array([0, 1, 1, 2, 2, 2, 2])
    hs = huffman_encode(sym).to_bytes()
    hdr = {"format": "nncompress-ncz", "tensors": [
        entry("w", [7], scheme="codebook", k=3, cb="float32", nnz=7, codebook=2,
              layout="dense", codes={"sec": 3, "codec": "huffman"}),
    ]}  # fmt: skip
    cb = np.float32([1.0, 2.0, 3.0]).tobytes()
    assert decode_bytes(build(hdr, None, [cb, hs]))[0]["w"].tolist() == [1, 2, 2, 3, 3, 3, 3]
    payload_bits = 1 * 4 + 2 * 2 + 2 * 1  # lengths 2, 2, 1 for symbols 0, 1, 2
    assert payload_bits % 8
    bad = bytearray(hs)
    bad[-1] |= 0x01
    with pytest.raises(FormatError, match="huffman payload: nonzero padding"):
        decode_bytes(build(hdr, None, [cb, bytes(bad)]))
    bad = bytearray(hs)
    bad[4] |= 0x01  # after n, A, L: 3 x 5 bits of code lengths in 2 bytes
    with pytest.raises(FormatError, match="huffman code lengths: nonzero padding"):
        decode_bytes(build(hdr, None, [cb, bytes(bad)]))


def test_count_widths_follow_the_spec():
    """ANS counts are stored in 1..32 bits (docs/format.md 3); 33 is refused by name."""
    counts = np.array([3, 4], np.int64)
    words = np.zeros(1, np.uint32)
    hdr = {"format": "nncompress-ncz", "tensors": [
        entry("w", [7], scheme="codebook", k=2, cb="float32", nnz=7, codebook=2,
              layout="dense", codes={"sec": 3, "codec": "ans"}),
    ]}  # fmt: skip
    cb = np.float32([1.0, 2.0]).tobytes()
    for w in (33, 40):
        stream = (
            write_uvarint(7)
            + write_uvarint(2)
            + bytes([w])
            + b"\x00" * 9
            + b"\x01"
            + (words.tobytes())
        )
        with pytest.raises(FormatError, match=r"ans count width=\d+: must be in \[1, 32\]"):
            decode_bytes(build(hdr, None, [cb, stream]))
    assert counts.sum() == 7
    # huffman block-length widths likewise stop at 32
    hs = huffman_encode(np.arange(40) % 3, block_size=8)
    raw = hs.to_bytes()
    width_at = len(write_uvarint(40)) + len(write_uvarint(3)) + 1 + 2 + len(write_uvarint(8))
    assert raw[width_at] == int(hs.block_bits[:-1].max()).bit_length()
    bad = raw[:width_at] + bytes([33]) + raw[width_at + 1 :]
    hdr["tensors"][0].update(k=3, nnz=40, shape=[40], codes={"sec": 3, "codec": "huffman"})
    cb3 = np.float32([1.0, 2.0, 3.0]).tobytes()
    decode_bytes(build(hdr, None, [cb3, raw]))
    with pytest.raises(FormatError, match="block-length width=33: must be <= 32"):
        decode_bytes(build(hdr, None, [cb3, bad]))


def test_duplicate_json_keys_are_refused():
    hdr, p = _sparse_file(np.float32([-1.0, 0.5, 2.0]))
    text = json.dumps(hdr)
    dup = text.replace('"name": "w"', '"name": "w", "name": "v"', 1)
    with pytest.raises(FormatError, match="header: not valid JSON .*duplicate key 'name'"):
        decode_bytes(build(None, None, p, raw_header=dup.encode()))
    meta_dup = build(hdr, None, p)
    parts = NczParts.parse(meta_dup)
    parts.payloads[1] = zlib.compress(b'{"a": 1, "a": 2}')
    with pytest.raises(FormatError, match="metadata: not valid JSON .*duplicate key 'a'"):
        decode_bytes(parts.assemble())


# ------------------------------------------------------------------ fuzz target (CI)

BASES = fuzz_bases()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**63 - 1))
def test_fuzz_structured_mutations(seed):
    """40 examples x 25 files = 1,000 structured mutations per CI run (valid CRCs, hostile
    header values, stream fields, codebooks, section moves/swaps/splices), memory checked on
    every 5th: each decodes within max_bytes or raises FormatError, within the memory bound.
    The long run (100,000+ files) is benchmarks/fuzz_decoder.py; counts in docs/format.md."""
    stats = fuzz_decoder(BASES, 25, seed, memory_every=5)
    assert stats.bad == []
    assert stats.decoded + stats.refused == stats.files


def test_every_mutation_kind_runs():
    rng = np.random.default_rng(0)
    from nncompress.io.fuzz import MUTATIONS

    for kind in MUTATIONS:
        for _ in range(5):
            data, got = mutate(BASES[0], rng, BASES, kind=kind)
            assert got == kind
            try:
                decode_bytes(data)
            except FormatError:
                pass


# ------------------------------------------------------------------ 1. linear decoding


def _huffman_file(block_size: int | None, n: int) -> bytes:
    sym = np.random.default_rng(0).choice(8, n, p=[0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.01])
    hs = huffman_encode(sym, block_size=block_size)
    hdr = {"format": "nncompress-ncz", "tensors": [
        entry("w", [n], scheme="codebook", k=8, cb="float32", nnz=n, codebook=2,
              layout="dense", codes={"sec": 3, "codec": "huffman"}),
    ]}  # fmt: skip
    return build(hdr, None, [np.arange(1, 9, dtype=np.float32).tobytes(), hs.to_bytes()])


def test_one_block_huffman_decodes_as_fast_as_many_blocks():
    """Issue 19 item 1: a valid file whose single Huffman block holds every symbol must not
    decode one Python step per symbol. Needs the linear decoder of the 'coding' branch
    (nncompress.coding.huffman_parse); skipped until it is merged."""
    pytest.importorskip("nncompress.coding.huffman_parse")
    n = 1 << 18
    one, many = _huffman_file(n, n), _huffman_file(None, n)
    assert decode_bytes(one)[0]["w"].equal(decode_bytes(many)[0]["w"])

    def best(data):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode_bytes(data)
            times.append(time.perf_counter() - t0)
        return min(times)

    assert best(one) < 5 * best(many)


def test_inspect_counts_streams_chunkwise():
    data = BASES[1]
    rep = inspect_bytes(data)
    fc = next(t for t in rep.tensors if t.name == "fc.weight")
    codes, index = fc.streams
    assert codes.symbols == fc.nonzeros and index.role == "index"
    assert 0 <= codes.entropy <= 1


# ------------------------------------------------------------------ affine (format 1.3)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_affine_decodes_chunkwise_bit_exact(transpose, dtype):
    """An ``affine`` tensor larger than a decoding chunk (3 chunks of 65,536), transposed or
    not: the chunked dequantization equals ``dequantize_codes`` on the whole tensor, bit for
    bit, with and without zero points."""
    from nncompress.coding.affine import dequantize_codes

    rows, cols, g, bits = 96, 2048, 64, 4
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, rows * cols)
    zero = rng.integers(0, 16, rows * cols // g)
    scale = rng.random(rows * cols // g).astype(np.float16) + np.float16(0.01)
    shape = [cols, rows] if transpose else [rows, cols]
    for with_zero in (True, False):
        e = {"name": "w", "dtype": dtype, "shape": shape, "scheme": "affine", "bits": bits,
             "rows": rows, "cols": cols, "group": g, "transpose": transpose,
             "codes": {"sec": 2, "codec": "raw"}, "scale": 3 + with_zero}  # fmt: skip
        payloads = [raw_stream(q, 16)]
        if with_zero:
            e["zero"] = {"sec": 3, "codec": "raw"}
            payloads.append(raw_stream(zero, 16))
        payloads.append(scale.tobytes())
        hdr = {"format": "nncompress-ncz", "tensors": [e]}
        got = decode_bytes(build(hdr, None, payloads, minor=3))  # affine: format 1.3
        z = torch.from_numpy(zero.astype(np.uint8)).reshape(rows, -1) if with_zero else None
        ref = dequantize_codes(
            torch.from_numpy(q.astype(np.uint8)).reshape(rows, cols),
            torch.from_numpy(scale).reshape(rows, -1),
            z,
            bits,
            g,
            getattr(torch, dtype),
        )
        ref = ref.T.contiguous() if transpose else ref
        w = got[0]["w"]
        assert w.dtype == ref.dtype and w.shape == ref.shape and w.is_contiguous()
        assert torch.equal(w.view(torch.int16), ref.view(torch.int16))
