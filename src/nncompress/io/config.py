"""How a state dict is written into a ``.ncz`` file (a frozen, validated, JSON-able config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..coding.sparse import MAX_INDEX_BITS
from ..core.errors import ConfigError
from ..core.validate import check as _check
from ..core.validate import is_int as _is_int
from .pq_scheme import DEFAULT_BLOCK_SIZES, PQ_MAX_D

__all__ = ["CODECS", "EncodeConfig", "SCHEMES"]

CODECS = ("huffman", "ans", "raw", "context")
SCHEMES = ("auto", "dense", "codebook", "pq", "sparse")
ORDERS = ("auto", "C", "F")
LAYOUTS = ("auto", "sparse", "dense", "context")
DTYPES = ("fp32", "fp16")
MAX_CODEBOOK_BITS = 16


@dataclass(frozen=True)
class EncodeConfig:
    """Options of :func:`nncompress.io.encode_state_dict`.

    Attributes
    ----------
    codec : entropy coder of the weight-code and relative-index streams: 'huffman'
        (canonical Huffman, Deep Compression), 'ans' (constriction's ANS, closer to the
        entropy), 'raw' (fixed-width, the paper's "P+Q" storage) or 'context' (codebook
        weights of 2+ dimensions may also use the 'context' layout, chosen by size; every
        other stream is ANS-coded; format 1.4).
    codec_fallback : store a stream fixed-width instead when that is smaller than its coded
        form (tiny layers, where the code table costs more than it saves).
    index_bits_conv, index_bits_fc : relative-index bits b for conv weights (ndim >= 3) and
        for everything else (Deep Compression: 8 and 5).
    index_bits : per-tensor overrides of b; a key is a tensor name ('fc1.weight') or a module
        name ('fc1', which matches 'fc1.weight' and 'fc1.bias').
    auto_index_bits : instead of the conv/FC defaults, try every b in [2, 12] per tensor and
        keep the smallest (more bits mean fewer fillers; entropy coding makes the larger
        alphabet cheap). Per-tensor ``index_bits`` overrides still win.
    scheme : per-tensor overrides of the storage scheme: 'auto' (smallest wins), 'dense',
        'codebook' (error if the tensor has more than 2**max_codebook_bits distinct values).
    layout : positions of codebook tensors: 'auto' (smallest wins), 'sparse' (relative
        indices + a code per nonzero), 'dense' (a code per element, zero being a code) or
        'context' (weights of 2+ dimensions: significance map and codes coded together with
        density-class contexts, :mod:`nncompress.coding.context`; format 1.4).
    order : flattening order of sparse layers: 'auto' (smallest wins), 'C' (row-major over the
        weight as stored, CSR-like) or 'F' (column-major, CSC-like).
    codebook_dtype : 'fp32' stores codebooks exactly in the tensor's dtype; 'fp16' rounds them
        to float16 (lossy unless the model went through ``round_for_storage_``).
    dense_dtype : 'fp32' stores dense tensors exactly; 'fp16' rounds float32 tensors to
        float16 (integer buffers are always exact).
    max_codebook_bits : a floating tensor with at most 2**max_codebook_bits distinct nonzero
        values may be stored as a codebook plus codes.
    pq_block_sizes : subvector sizes ``d`` tried for the 'pq' scheme (product quantization:
        a codebook of distinct ``d``-value subvectors plus a code per subvector) on every
        float tensor of 2+ dims; the block size of a product-quantized layer of the model
        being encoded is always tried. Empty: only those.
    pq_block_size : per-tensor ``d`` (a tensor name, or a module name: then its tensors of 2+
        dims): forces the 'pq' scheme with that block size.
    """

    codec: str = "huffman"
    codec_fallback: bool = True
    index_bits_conv: int = 8
    index_bits_fc: int = 5
    index_bits: dict[str, int] = field(default_factory=dict)
    auto_index_bits: bool = False
    scheme: dict[str, str] = field(default_factory=dict)
    layout: str = "auto"
    order: str = "auto"
    codebook_dtype: str = "fp32"
    dense_dtype: str = "fp32"
    max_codebook_bits: int = 8
    pq_block_sizes: tuple[int, ...] = DEFAULT_BLOCK_SIZES
    pq_block_size: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.codec in CODECS, "codec", self.codec, f"must be one of {CODECS}")
        _check(
            isinstance(self.codec_fallback, bool),
            "codec_fallback",
            self.codec_fallback,
            "must be true or false",
        )
        bits_rule = f"must be an integer in [1, {MAX_INDEX_BITS}]"
        for name in ("index_bits_conv", "index_bits_fc"):
            v = getattr(self, name)
            _check(_is_int(v) and 1 <= v <= MAX_INDEX_BITS, name, v, bits_rule)
        _check(isinstance(self.index_bits, dict), "index_bits", self.index_bits, "a mapping")
        _check(
            isinstance(self.auto_index_bits, bool),
            "auto_index_bits",
            self.auto_index_bits,
            "must be true or false",
        )
        for k, v in self.index_bits.items():
            _check(isinstance(k, str) and k != "", "index_bits key", k, "must be a name")
            _check(_is_int(v) and 1 <= v <= MAX_INDEX_BITS, f"index_bits['{k}']", v, bits_rule)
        _check(isinstance(self.scheme, dict), "scheme", self.scheme, "must be a mapping")
        for k, v in self.scheme.items():
            _check(isinstance(k, str) and k != "", "scheme key", k, "must be a name")
            _check(v in SCHEMES, f"scheme['{k}']", v, f"must be one of {SCHEMES}")
        _check(self.layout in LAYOUTS, "layout", self.layout, f"must be one of {LAYOUTS}")
        _check(self.order in ORDERS, "order", self.order, f"must be one of {ORDERS}")
        for name in ("codebook_dtype", "dense_dtype"):
            v = getattr(self, name)
            _check(v in DTYPES, name, v, f"must be one of {DTYPES}")
        _check(
            _is_int(self.max_codebook_bits) and 1 <= self.max_codebook_bits <= MAX_CODEBOOK_BITS,
            "max_codebook_bits",
            self.max_codebook_bits,
            f"must be an integer in [1, {MAX_CODEBOOK_BITS}]",
        )

        d_rule = f"must be an integer in [1, {PQ_MAX_D}]"
        _check(
            isinstance(self.pq_block_sizes, (tuple, list)),
            "pq_block_sizes",
            self.pq_block_sizes,
            "must be a list of block sizes",
        )
        object.__setattr__(self, "pq_block_sizes", tuple(self.pq_block_sizes))
        for v in self.pq_block_sizes:
            _check(_is_int(v) and 1 <= v <= PQ_MAX_D, "pq_block_sizes entry", v, d_rule)
        _check(
            isinstance(self.pq_block_size, dict), "pq_block_size", self.pq_block_size, "a mapping"
        )
        for k, v in self.pq_block_size.items():
            _check(isinstance(k, str) and k != "", "pq_block_size key", k, "must be a name")
            _check(_is_int(v) and 1 <= v <= PQ_MAX_D, f"pq_block_size['{k}']", v, d_rule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncodeConfig:
        """Build from a mapping (JSON/YAML); unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"encode config={data!r}: must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"encode config: unknown field(s) {unknown}; allowed: {sorted(known)}"
            )
        return cls(**data)


def match_override(overrides: dict[str, Any], name: str) -> Any | None:
    """The override for tensor ``name``: exact key first, then the longest module prefix."""
    if name in overrides:
        return overrides[name]
    best = None
    for key in overrides:
        if name.startswith(key + ".") and (best is None or len(key) > len(best)):
            best = key
    return overrides[best] if best is not None else None


def check_overrides(config: EncodeConfig, names: list[str]) -> None:
    """Every override key must match at least one tensor (else ConfigError naming it)."""
    for fname in ("index_bits", "scheme", "pq_block_size"):
        for key in getattr(config, fname):
            if not any(n == key or n.startswith(key + ".") for n in names):
                raise ConfigError(
                    f"{fname}['{key}']: no tensor of the state dict has this name or prefix "
                    f"(tensors: {', '.join(names[:8])}{'...' if len(names) > 8 else ''})"
                )
