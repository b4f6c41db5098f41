"""The compressed file format ``.ncz`` (Deep Compression stage 3 storage): encode a state dict
with codebooks, relative-index sparse positions and entropy-coded streams; decode it back
bit-exactly; itemise its size. See docs/format.md for the byte-level specification."""

from .checkpoint import (
    ArchitectureMissing,
    checkpoint_metadata,
    decode_to_checkpoint,
    load_model_file,
)
from .config import EncodeConfig
from .container import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ELEMENTS,
    decode_bytes,
    decode_file,
    encode_state_dict,
    inspect_bytes,
    inspect_file,
    load_compressed,
    pq_block_hints,
    round_for_storage_,
    save_compressed,
)
from .errors import FormatError
from .report import EncodeReport, StreamReport, TensorReport

__all__ = [
    "ArchitectureMissing",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ELEMENTS",
    "EncodeConfig",
    "EncodeReport",
    "FormatError",
    "StreamReport",
    "TensorReport",
    "checkpoint_metadata",
    "decode_bytes",
    "decode_file",
    "decode_to_checkpoint",
    "encode_state_dict",
    "inspect_bytes",
    "inspect_file",
    "load_compressed",
    "load_model_file",
    "pq_block_hints",
    "round_for_storage_",
    "save_compressed",
]
