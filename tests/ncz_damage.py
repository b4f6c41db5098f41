"""Damaged .ncz files for the fuzz tests of test_container*.py: byte-level mutations, and damage
inside one section behind a recomputed (valid) CRC."""

from __future__ import annotations

import struct

import numpy as np
import torch

from nncompress.io import FormatError, decode_bytes
from nncompress.io.container import MAGIC
from nncompress.io.format import section_crc

FILES_PER_EXAMPLE = 8  # each hypothesis example checks this many damaged files


def sections(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of each section payload."""
    count = struct.unpack_from("<I", data, 12)[0]
    pos, out = 16, []
    for _ in range(count):
        length = struct.unpack_from("<I", data, pos)[0]
        out.append((pos + 8, length))
        pos += 8 + length
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """1-3 random damages: truncation, bit flip, byte insertion, deletion, or random bytes."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(0, 5)
        i = int(rng.integers(0, len(out) + 1))
        if kind == 0:
            out = out[:i]
        elif kind == 1 and out:
            out[min(i, len(out) - 1)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            out[i:i] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
        elif kind == 3:
            del out[i : i + int(rng.integers(1, 17))]
        else:
            out = bytearray(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8))
            if rng.random() < 0.5:
                out[:8] = MAGIC[: len(out[:8])]  # get past the magic sometimes
    return bytes(out)


def damage_section(base: bytes, rng: np.random.Generator) -> bytes | None:
    """1-4 random bytes of one section replaced and its CRC recomputed, so the parsers past
    the CRC check see the damage; None when the drawn section is empty."""
    secs = sections(base)
    i = int(rng.integers(0, len(secs)))
    start, length = secs[i]
    if length == 0:
        return None
    data = bytearray(base)
    for _ in range(int(rng.integers(1, 5))):
        data[start + int(rng.integers(0, length))] = int(rng.integers(0, 256))
    struct.pack_into("<I", data, start - 4, section_crc(i, bytes(data[start : start + length])))
    return bytes(data)


def decode_or_format_error(data: bytes) -> None:
    """The file decodes to tensors or raises FormatError with a message; nothing else."""
    try:
        state, _ = decode_bytes(data)
    except FormatError as exc:
        assert str(exc)
    else:
        assert all(isinstance(v, torch.Tensor) for v in state.values())
