"""The ``.ncz`` container, as one import: the byte layout is in :mod:`.format`, writing in
:mod:`.encode`, reading in :mod:`.decode` (docs/format.md is the specification)."""

from .decode import (
    decode_bytes,
    decode_entry,
    decode_file,
    inspect_bytes,
    inspect_file,
    load_compressed,
)
from .encode import encode_state_dict, pq_block_hints, round_for_storage_, save_compressed
from .format import DEFAULT_MAX_BYTES, DEFAULT_MAX_ELEMENTS, MAGIC, VERSION

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "MAGIC",
    "VERSION",
    "decode_bytes",
    "decode_entry",
    "decode_file",
    "encode_state_dict",
    "inspect_bytes",
    "inspect_file",
    "load_compressed",
    "pq_block_hints",
    "round_for_storage_",
    "save_compressed",
]
