"""Structured mutations of ``.ncz`` files, to fuzz the decoder past its CRC checks.

Random bytes rarely get past a CRC32 and a deflate stream, so a plain byte fuzzer exercises
little more than the framing. These mutations edit a *valid* file where it is parsed and then
make it consistent again (section CRCs recomputed as the file's version defines them, the
header re-deflated), so every check behind the framing sees hostile input:

* ``header_value``: one field of a header entry (or of its ``codes`` / ``index`` reference)
  set to a hostile value: huge, negative, off by one, wrong type, deep nesting, 17 dims...
* ``header_delete`` / ``header_duplicate_key``: a field removed; a field written twice.
* ``stream_field``: one of the leading varints / bytes of a stream section (symbol count,
  alphabet, code length, block size, width...) replaced by a hostile value.
* ``section_bytes``: a few bytes of one section changed; ``section_resize``: a section cut
  short or extended; ``codebook_values``: hostile floats (0, NaN, inf, unsorted) in a codebook.
* ``section_swap`` (CRCs recomputed), ``section_move`` (frames moved with their CRCs: the
  index-bound CRCs of format 1.1 must catch it), ``section_drop`` / ``section_duplicate``,
  ``splice`` (a section of another file at the same index, its CRC valid there).
* ``prefix``: version or section count changed.

:func:`fuzz_decoder` runs mutations and counts the outcomes; the contract is that every
mutated file either decodes (to tensors within ``max_bytes``) or raises ``FormatError``, in
time and memory linear in the file and its declared output. ``tests/test_format_hostile.py``
runs it briefly in CI and ``benchmarks/fuzz_decoder.py`` for 100,000+ files.
"""

from __future__ import annotations

import json
import time
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .decode import decode_bytes
from .errors import FormatError
from .format import _FRAME, _PREFIX, MAGIC, section_crc

__all__ = [
    "MUTATIONS",
    "FuzzStats",
    "NczParts",
    "fuzz_bases",
    "fuzz_decoder",
    "memory_bound",
    "mutate",
    "to_v10",
]


@dataclass
class NczParts:
    """A valid ``.ncz`` file taken apart: version, section payloads, header and metadata."""

    major: int
    minor: int
    payloads: list[bytes]

    @classmethod
    def parse(cls, data: bytes) -> NczParts:
        _, major, minor, count = _PREFIX.unpack_from(data, 0)
        pos, payloads = _PREFIX.size, []
        for _ in range(count):
            length, _crc = _FRAME.unpack_from(data, pos)
            payloads.append(data[pos + _FRAME.size : pos + _FRAME.size + length])
            pos += _FRAME.size + length
        return cls(major, minor, payloads)

    @property
    def header(self) -> Any:
        return json.loads(zlib.decompress(self.payloads[0]))

    def assemble(self, crcs: list[int] | None = None, count: int | None = None) -> bytes:
        """The file's bytes with valid CRCs (or the given ones)."""
        frames = []
        for i, p in enumerate(self.payloads):
            crc = crcs[i] if crcs is not None else section_crc(i, p, self.minor)
            frames.append(_FRAME.pack(len(p), crc) + p)
        n = len(self.payloads) if count is None else count
        return _PREFIX.pack(MAGIC, self.major, self.minor, n) + b"".join(frames)


def to_v10(data: bytes) -> bytes:
    """The same file written as format 1.0 (CRCs over the payload alone)."""
    parts = NczParts.parse(data)
    parts.minor = 0
    return parts.assemble()


def fuzz_bases() -> list[bytes]:
    """Valid files to mutate: a small state dict (4-D conv codebook, sparse FC, dense bias,
    bool, int64 scalar, float16) with every codec x layout x order, fp16 storage, one format
    1.0 file, a file with the 'context' layout (1.4), two files with a product-quantized
    tensor (scheme 'pq', 1.1), two with an ``affine`` tensor and its ``alias`` (1.3) and two
    with pruned float tensors (scheme 'sparse', 1.5)."""
    import torch

    from .config import EncodeConfig
    from .encode import encode_state_dict

    state = {
        "conv.weight": torch.tensor([0.0, 0.5, -0.5, 1.0] * 54).reshape(6, 1, 6, 6),
        "fc.weight": torch.where(
            torch.arange(600).reshape(20, 30) % 7 == 0, torch.tensor(0.25), torch.tensor(0.0)
        ),
        "fc.bias": torch.linspace(-1, 1, 20),
        "mask": torch.arange(12) % 3 == 0,
        "steps": torch.tensor(11, dtype=torch.int64),
        "half": torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=torch.float16),
    }
    out = []
    for codec in ("huffman", "ans", "raw"):
        for layout, order in (("dense", "auto"), ("sparse", "C"), ("sparse", "F")):
            cfg = EncodeConfig(
                codec=codec,
                layout=layout,
                order=order,
                codec_fallback=False,
                scheme={"fc.weight": "codebook"},  # not the float 'sparse' scheme (below)
            )
            out.append(encode_state_dict(state, cfg, {"m": [1, 2]})[0])
    cfg = EncodeConfig(codec="huffman", codebook_dtype="fp16", dense_dtype="fp16")
    out.append(encode_state_dict(state, cfg)[0])
    out.append(to_v10(out[0]))
    # the context layout (format 1.4): significance map and codes in one context stream
    cfg = EncodeConfig(
        codec="context", layout="context", codec_fallback=False, scheme={"fc.weight": "codebook"}
    )
    out.append(encode_state_dict(state, cfg, {"m": [1, 2]})[0])
    # product-quantized tensors (scheme 'pq', format 1.1): 4-subvectors from 5 codewords
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 4, generator=g)[torch.randint(5, (48,), generator=g)]  # (48, 4)
    rows[:6] = 0
    pq_state = {"pq.weight": rows.reshape(12, 16), "pq.bias": torch.zeros(12)}
    for codec in ("huffman", "raw"):
        cfg = EncodeConfig(codec=codec, pq_block_size={"pq.weight": 4}, codec_fallback=False)
        out.append(encode_state_dict(pq_state, cfg)[0])
    out += [_affine_file(transpose) for transpose in (False, True)]
    # the context layout (format 1.4): significance map and codes coded together
    cfg = EncodeConfig(
        codec="context", layout="context", codec_fallback=False, scheme={"fc.weight": "codebook"}
    )
    out.append(encode_state_dict(state, cfg)[0])
    # a pruned float tensor (scheme 'sparse', format 1.5): positions + byte-plane values
    w = torch.randn(24, 20, generator=g) * (torch.rand(24, 20, generator=g) < 0.15)
    sparse_state = {"sp.weight": w, "sp.half": w[:4].half()}
    for codec in ("huffman", "raw"):
        cfg = EncodeConfig(codec=codec, scheme={"sp": "sparse"}, codec_fallback=False)
        out.append(encode_state_dict(sparse_state, cfg)[0])
    return out


def _affine_file(transpose: bool) -> bytes:
    """A format 1.3 file with an ``affine`` tensor (4-bit codes, zero points, fp16 scales per
    group of 16) and an ``alias`` of it, assembled directly (the writer of these schemes lives
    in the quant family, which io may not import)."""
    from ..coding.bitpack import pack_bits, write_uvarint

    rows, cols, g = 8, 32, 16
    rng = np.random.default_rng(3)

    def raw(sym: np.ndarray) -> bytes:
        return write_uvarint(sym.size) + bytes([4]) + pack_bits(sym.astype(np.int64), 4)

    shape = [cols, rows] if transpose else [rows, cols]
    entry = {"name": "w", "dtype": "float16", "shape": shape, "scheme": "affine", "bits": 4,
             "rows": rows, "cols": cols, "group": g, "transpose": transpose,
             "codes": {"sec": 2, "codec": "raw"}, "zero": {"sec": 3, "codec": "raw"},
             "scale": 4}  # fmt: skip
    alias = {"name": "w_tied", "dtype": "float16", "shape": shape, "scheme": "alias", "of": "w"}
    header = {"format": "nncompress-ncz", "tensors": [entry, alias]}
    scale = (rng.random(rows * cols // g) + 0.01).astype("<f2").tobytes()
    payloads = [
        _deflate_json(header),
        _deflate_json(None),
        raw(rng.integers(0, 16, rows * cols)),
        raw(rng.integers(0, 16, rows * cols // g)),
        scale,
    ]
    return NczParts(1, 3, payloads).assemble()


def _deflate_json(obj: Any) -> bytes:
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 9)


def _hostile_values(rng: np.random.Generator, current: Any) -> Any:
    pool: list[Any] = [
        -1, 0, 1, 2, 7, 255, 256, 65535, 65536, 65537, 2**31 - 1, 2**31, 2**32, 2**40,
        2**63 - 1, 2**63, 2**64 + 1, 10**30, -(2**63), 1.5, 1e308, -0.0, True, False, None,
        "", "x" * 300, "C", "F", "raw", "huffman", "ans", "dense", "sparse", "codebook",
        "float16", "bool", [], {}, [2**20] * 3, [1] * 17, [[[[[[[]]]]]]], {"sec": 2},
        {"sec": 2, "codec": "raw"},
    ]  # fmt: skip
    if isinstance(current, int) and not isinstance(current, bool):
        pool += [current - 1, current + 1, current * 2, current // 2, -current, current << 20]
    if isinstance(current, list) and all(isinstance(d, int) for d in current):
        pool += [current[::-1], current + [1], current[:-1], [d * 1024 for d in current]]
    return pool[int(rng.integers(len(pool)))]


def _mutate_header_value(parts: NczParts, rng: np.random.Generator) -> None:
    header = parts.header
    entries = header.get("tensors") or []
    if not entries or rng.random() < 0.05:
        key = ["format", "tensors"][int(rng.integers(2))]
        header[key] = _hostile_values(rng, header.get(key))
    else:
        target = entries[int(rng.integers(len(entries)))]
        refs = [v for v in target.values() if isinstance(v, dict)]
        if refs and rng.random() < 0.3:
            target = refs[int(rng.integers(len(refs)))]
        key = sorted(target)[int(rng.integers(len(target)))]
        target[key] = _hostile_values(rng, target[key])
    parts.payloads[0] = _deflate_json(header)


def _mutate_header_delete(parts: NczParts, rng: np.random.Generator) -> None:
    header = parts.header
    entries = header["tensors"]
    target = entries[int(rng.integers(len(entries)))]
    del target[sorted(target)[int(rng.integers(len(target)))]]
    parts.payloads[0] = _deflate_json(header)


def _mutate_header_duplicate_key(parts: NczParts, rng: np.random.Generator) -> None:
    text = zlib.decompress(parts.payloads[0]).decode()
    starts = [i for i, c in enumerate(text) if c == "{"]
    i = starts[int(rng.integers(len(starts)))]
    dup = ['"name":"x",', '"scheme":"dense",', '"k":1,', '"sec":2,', '"format":"x",']
    text = text[: i + 1] + dup[int(rng.integers(len(dup)))] + text[i + 1 :]
    parts.payloads[0] = zlib.compress(text.encode(), 9)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _data_index(parts: NczParts, rng: np.random.Generator) -> int | None:
    if len(parts.payloads) <= 2:
        return None
    return 2 + int(rng.integers(len(parts.payloads) - 2))


def _mutate_stream_field(parts: NczParts, rng: np.random.Generator) -> None:
    """Replace one of the first few fields of a data section: varints are read greedily from
    the start (the symbol count, alphabet, ... of a stream), and one is rewritten."""
    i = _data_index(parts, rng)
    if i is None:
        return
    p = parts.payloads[i]
    fields, pos = [], 0
    while pos < len(p) and len(fields) < 6:
        start = pos
        while pos < len(p) and p[pos] & 0x80 and pos - start < 9:
            pos += 1
        pos += 1
        fields.append((start, min(pos, len(p))))
    if not fields:
        return
    a, b = fields[int(rng.integers(len(fields)))]
    old = 0
    for j, byte in enumerate(p[a:b]):
        old |= (byte & 0x7F) << (7 * j)
    choices = [0, 1, 2, 24, 25, 33, 40, 41, 255, old + 1, max(0, old - 1), old * 2, old << 16,
               2**32, 2**40, 2**63, 2**70]  # fmt: skip
    new = choices[int(rng.integers(len(choices)))]
    enc = _varint(new) if (b - a > 1 or new > 255 or rng.random() < 0.5) else bytes([new & 0xFF])
    parts.payloads[i] = p[:a] + enc + p[b:]


def _mutate_section_bytes(parts: NczParts, rng: np.random.Generator) -> None:
    i = int(rng.integers(len(parts.payloads)))
    p = bytearray(parts.payloads[i])
    if not p:
        return
    for _ in range(int(rng.integers(1, 5))):
        j = int(rng.integers(len(p)))
        if rng.random() < 0.5:
            p[j] ^= 1 << int(rng.integers(8))
        else:
            p[j] = int(rng.integers(256))
    parts.payloads[i] = bytes(p)


def _mutate_section_resize(parts: NczParts, rng: np.random.Generator) -> None:
    i = _data_index(parts, rng)
    if i is None:
        return
    p = parts.payloads[i]
    if rng.random() < 0.5 and p:
        parts.payloads[i] = p[: int(rng.integers(len(p)))]
    else:
        parts.payloads[i] = p + rng.integers(0, 256, int(rng.integers(1, 64)), np.uint8).tobytes()


def _mutate_codebook_values(parts: NczParts, rng: np.random.Generator) -> None:
    header = parts.header
    books = [e for e in header["tensors"] if e.get("scheme") == "codebook" and e.get("k")]
    if not books:
        return
    e = books[int(rng.integers(len(books)))]
    dt = "<f2" if e.get("cb") == "float16" else "<f4"
    vals = np.frombuffer(parts.payloads[e["codebook"]], dtype=dt).copy()
    big = 6e4 if dt == "<f2" else 1e30
    hostile = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, big, -big], dtype=dt)
    kind = int(rng.integers(3))
    if kind == 0:
        vals[int(rng.integers(vals.size))] = hostile[int(rng.integers(hostile.size))]
    elif kind == 1:
        vals = vals[::-1].copy()
    else:
        vals[:] = vals[int(rng.integers(vals.size))]
    parts.payloads[e["codebook"]] = vals.tobytes()


def _two(parts: NczParts, rng: np.random.Generator) -> tuple[int, int] | None:
    n = len(parts.payloads)
    if n < 2:
        return None
    i, j = (int(v) for v in rng.choice(n, 2, replace=False))
    return i, j


def _mutate_section_swap(parts: NczParts, rng: np.random.Generator) -> None:
    pair = _two(parts, rng)
    if pair:
        i, j = pair
        parts.payloads[i], parts.payloads[j] = parts.payloads[j], parts.payloads[i]


def _mutate_section_drop(parts: NczParts, rng: np.random.Generator) -> None:
    del parts.payloads[int(rng.integers(len(parts.payloads)))]


def _mutate_section_duplicate(parts: NczParts, rng: np.random.Generator) -> None:
    i = int(rng.integers(len(parts.payloads)))
    parts.payloads.insert(int(rng.integers(len(parts.payloads) + 1)), parts.payloads[i])


MUTATIONS = {
    "header_value": _mutate_header_value,
    "header_delete": _mutate_header_delete,
    "header_duplicate_key": _mutate_header_duplicate_key,
    "stream_field": _mutate_stream_field,
    "section_bytes": _mutate_section_bytes,
    "section_resize": _mutate_section_resize,
    "codebook_values": _mutate_codebook_values,
    "section_swap": _mutate_section_swap,
    "section_drop": _mutate_section_drop,
    "section_duplicate": _mutate_section_duplicate,
    # below: mutations that do not recompute CRCs (handled in mutate())
    "section_move": None,
    "splice": None,
    "prefix": None,
}


def mutate(
    base: bytes, rng: np.random.Generator, others: list[bytes] = (), kind: str | None = None
) -> tuple[bytes, str]:
    """One structured mutation of the valid file ``base``: ``(bytes, kind)``.

    ``others`` are other valid files (for ``splice``). Every kind but ``section_move`` and
    ``prefix`` leaves valid CRCs, so the decoder's later checks see the damage.
    """
    names = sorted(MUTATIONS)
    kind = kind or names[int(rng.integers(len(names)))]
    parts = NczParts.parse(base)
    if kind == "section_move":  # frames moved with their CRCs
        crcs = [section_crc(i, p, parts.minor) for i, p in enumerate(parts.payloads)]
        pair = _two(parts, rng)
        if pair:
            i, j = pair
            parts.payloads[i], parts.payloads[j] = parts.payloads[j], parts.payloads[i]
            crcs[i], crcs[j] = crcs[j], crcs[i]
        return parts.assemble(crcs), kind
    if kind == "splice":
        donor = NczParts.parse(others[int(rng.integers(len(others)))]) if others else parts
        i = int(rng.integers(min(len(parts.payloads), len(donor.payloads))))
        parts.payloads[i] = donor.payloads[i]
        return parts.assemble(), kind
    if kind == "prefix":
        choice = int(rng.integers(4))
        if choice == 0:
            parts.minor = int(rng.choice([0, 1, 2, 255, 65535]))
        elif choice == 1:
            parts.major = int(rng.choice([0, 2, 65535]))
        count = len(parts.payloads) + int(rng.choice([-2, -1, 1, 2**20])) if choice >= 2 else None
        crcs = [section_crc(i, p, parts.minor) for i, p in enumerate(parts.payloads)]
        if choice == 0:  # CRCs still those of the original version
            crcs = [section_crc(i, p) for i, p in enumerate(NczParts.parse(base).payloads)]
        return parts.assemble(crcs, count=count), kind
    MUTATIONS[kind](parts, rng)
    if rng.random() < 0.15:  # sometimes a second, different mutation
        other = [k for k, f in MUTATIONS.items() if f is not None and k != kind]
        try:
            MUTATIONS[other[int(rng.integers(len(other)))]](parts, rng)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, zlib.error):
            pass  # the first mutation left nothing this one can parse

    return parts.assemble(), kind


@dataclass
class FuzzStats:
    """Outcome counts of a fuzzing run (``bad`` must stay empty)."""

    files: int = 0
    decoded: int = 0
    refused: int = 0
    unchanged: int = 0
    by_kind: Counter = field(default_factory=Counter)
    refused_by_kind: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    max_seconds: float = 0.0
    max_peak_over_bound: float = 0.0
    memory_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "decoded": self.decoded,
            "refused_with_format_error": self.refused,
            "unchanged": self.unchanged,
            "by_kind": dict(sorted(self.by_kind.items())),
            "refused_by_kind": dict(sorted(self.refused_by_kind.items())),
            "top_reasons": dict(self.reasons.most_common(25)),
            "other_exceptions": self.bad[:50],
            "max_seconds_per_file": self.max_seconds,
            "memory_checked": self.memory_checked,
            "max_peak_over_bound": self.max_peak_over_bound,
        }


def _reason(msg: str) -> str:
    """A short class of a FormatError message (its text without numbers and names)."""
    words = [w for w in msg.replace(":", " ").split() if not any(c.isdigit() for c in w)]
    return " ".join(w for w in words if "'" not in w)[:60]


def memory_bound(file_bytes: int, declared_bytes: int) -> int:
    """The most a decode may allocate: the declared tensors plus 128 bytes per byte of file
    (Huffman streams are decoded whole; their symbols are at most their payload bits) plus
    8 MiB of fixed overhead (tables, chunks, the JSON header)."""
    return declared_bytes + 128 * file_bytes + (8 << 20)


def fuzz_decoder(
    bases: list[bytes],
    n: int,
    seed: int = 0,
    *,
    max_bytes: int = 64 << 20,
    memory_every: int = 0,
    progress: Any = None,
) -> FuzzStats:
    """Decode ``n`` structured mutations of the valid files ``bases``; count the outcomes.

    Every file must decode (tensors within ``max_bytes``) or raise ``FormatError``; anything
    else is recorded in ``stats.bad``. With ``memory_every=k``, every k-th decode runs under
    ``tracemalloc`` and its peak is compared with :func:`memory_bound` (``max_peak_over_bound``
    > 1 would be a violation, recorded in ``bad``).
    """
    rng = np.random.default_rng(seed)
    stats = FuzzStats()
    for i in range(n):
        base = bases[int(rng.integers(len(bases)))]
        data, kind = mutate(base, rng, bases)
        stats.files += 1
        stats.by_kind[kind] += 1
        if data == base:
            stats.unchanged += 1
        track = memory_every and i % memory_every == 0
        if track:
            tracemalloc.start()
        t0 = time.perf_counter()
        try:
            state, _ = decode_bytes(data, max_bytes=max_bytes)
            declared = sum(t.numel() * t.element_size() for t in state.values())
            if declared > max_bytes:
                stats.bad.append(f"{kind}: decoded {declared} bytes > max_bytes")
            stats.decoded += 1
        except FormatError as exc:
            declared = max_bytes
            stats.refused += 1
            stats.refused_by_kind[kind] += 1
            stats.reasons[_reason(str(exc))] += 1
        except Exception as exc:  # noqa: BLE001 - the contract under test: record, never raise
            declared = max_bytes
            stats.bad.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
        finally:
            dt = time.perf_counter() - t0
            if track:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                ratio = peak / memory_bound(len(data), declared)
                stats.memory_checked += 1
                stats.max_peak_over_bound = max(stats.max_peak_over_bound, ratio)
                if ratio > 1:
                    stats.bad.append(f"{kind}: peak {peak} bytes over the memory bound")
        stats.max_seconds = max(stats.max_seconds, dt)
        if progress is not None:
            progress(i + 1, n)
    return stats
