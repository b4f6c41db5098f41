"""Itemised size accounting of a ``.ncz`` file, per tensor and per coded stream.

The fields map onto Deep Compression's Tables 2-3 (Han et al., ICLR 2016): weights kept
(``nonzeros / numel``), weight bits per nonzero after P+Q (fixed ``ceil(log2 k)``) and after
H (actual coded bits), index bits per nonzero after P+Q (fixed ``b``, fillers included) and
after H, and the per-layer compression ``numel * bits_of_dtype / (8 * total_bytes)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EncodeReport", "StreamReport", "TensorReport"]


@dataclass(frozen=True)
class StreamReport:
    """One coded symbol stream.

    ``entropy`` is the empirical order-0 entropy in bits/symbol; ``payload_bits`` the bits of
    the codes themselves, ``table_bits`` everything else in the stream (counts, code tables,
    block table, padding), ``total_bits = payload_bits + table_bits``.
    """

    role: str  # 'codes' (weight codes) or 'index' (relative indices)
    codec: str
    symbols: int
    alphabet: int
    entropy: float
    payload_bits: int
    table_bits: int

    @property
    def total_bits(self) -> int:
        return self.payload_bits + self.table_bits

    @property
    def bits_per_symbol(self) -> float:
        return self.total_bits / self.symbols if self.symbols else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_bits"] = self.total_bits
        d["bits_per_symbol"] = self.bits_per_symbol
        return d


@dataclass(frozen=True)
class TensorReport:
    """Storage of one tensor. Bits are exact counts; ``total_bytes`` includes the 8-byte
    frame (length + CRC32) of each of the tensor's sections."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scheme: str  # 'dense', 'codebook', 'pq', 'affine' (group-wise codes), 'alias' or 'sparse'
    layout: str | None  # codebook tensors: 'sparse' (relative index), 'dense' (a code each)
    # or 'context' (context-coded map + codes: index_bits_coded = classes, map and tables);
    # 'sparse' tensors: 'sparse'
    numel: int
    nonzeros: int
    total_bytes: int
    dense_store: str | None = None  # dense: 'raw' / 'float16'; sparse: values' dtype
    codebook_size: int = 0
    codebook_dtype: str | None = None
    codebook_bits: int = 0
    order: str | None = None
    index_bits: int = 0  # b
    fillers: int = 0
    weight_bits_pq: int = 0  # codes x ceil(log2 k)
    weight_bits: int = 0  # actual bits of the weight-code stream
    index_bits_pq: int = 0  # entries x b
    index_bits_coded: int = 0  # actual bits of the relative-index stream
    dense_bits: int = 0
    streams: tuple[StreamReport, ...] = field(default=())
    block_size: int = 0  # pq: values per subvector d (one code per subvector)

    @property
    def original_bits(self) -> int:
        """Dense bits of the tensor; 0 for an alias (a copy of another tensor counts once, so
        a model's compression ratio is never inflated by its tied weights)."""
        if self.scheme == "alias":
            return 0
        return self.numel * _DTYPE_BITS.get(self.dtype, 32)

    @property
    def table_bits(self) -> int:
        """Bits of the coded streams spent on tables (counts, code lengths, block table)."""
        return sum(s.table_bits for s in self.streams)

    @property
    def kept(self) -> float:
        """Fraction of weights kept (nonzero)."""
        return self.nonzeros / self.numel if self.numel else 0.0

    @property
    def compression(self) -> float:
        return self.original_bits / (8 * self.total_bytes) if self.total_bytes else 0.0

    @property
    def bits_per_weight(self) -> float:
        """All the tensor's bytes (codebook, codes, frames) per element: for a pq tensor
        ``log2(k)/d`` (less when entropy-coded) plus the codebook's share."""
        return 8 * self.total_bytes / self.numel if self.numel else 0.0

    def _per_nz(self, bits: int) -> float:
        n = self.nonzeros if self.layout in ("sparse", "context") else self.numel
        return bits / n if n else 0.0

    @property
    def weight_bits_per_code_pq(self) -> float:
        return self._per_nz(self.weight_bits_pq)

    @property
    def weight_bits_per_code(self) -> float:
        return self._per_nz(self.weight_bits)

    @property
    def index_bits_per_nz_pq(self) -> float:
        return self._per_nz(self.index_bits_pq)

    @property
    def index_bits_per_nz(self) -> float:
        return self._per_nz(self.index_bits_coded)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["streams"] = [s.to_dict() for s in self.streams]
        for prop in (
            "original_bits",
            "table_bits",
            "kept",
            "compression",
            "bits_per_weight",
            "weight_bits_per_code_pq",
            "weight_bits_per_code",
            "index_bits_per_nz_pq",
            "index_bits_per_nz",
        ):
            d[prop] = getattr(self, prop)
        return d


_DTYPE_BITS = {
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "float64": 64,
    "int64": 64,
    "int32": 32,
    "int16": 16,
    "int8": 8,
    "uint8": 8,
    "bool": 8,
    "uint16": 16,
    "uint32": 32,
    "uint64": 64,
    "complex64": 64,
    "complex128": 128,
    "float8_e4m3fn": 8,
    "float8_e5m2": 8,
}


@dataclass(frozen=True)
class EncodeReport:
    """Itemised size of a whole ``.ncz`` file.

    ``total_bytes`` is the file size; it equals ``prefix_bytes + header_bytes + metadata_bytes
    + sum(t.total_bytes)`` (header and metadata include their 8-byte frames).
    ``original_bytes`` is the dense size of the same tensors in their own dtypes (fp32
    parameters: 4 bytes each), so ``ratio = original_bytes / total_bytes``.
    """

    tensors: tuple[TensorReport, ...]
    prefix_bytes: int
    header_bytes: int
    metadata_bytes: int
    total_bytes: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def original_bytes(self) -> int:
        return sum(t.original_bits for t in self.tensors) // 8

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.total_bytes if self.total_bytes else 0.0

    def tensor(self, name: str) -> TensorReport:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [t.to_dict() for t in self.tensors],
            "prefix_bytes": self.prefix_bytes,
            "header_bytes": self.header_bytes,
            "metadata_bytes": self.metadata_bytes,
            "total_bytes": self.total_bytes,
            "original_bytes": self.original_bytes,
            "ratio": self.ratio,
            "config": self.config,
        }

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """Headers and rows of the per-tensor table (as ``nncompress inspect`` prints it).

        'w P+Q' / 'w H': weight-code bits per code, fixed ceil(log2 k) / as coded (pq: code
        bits per weight, i.e. per code / d; sparse: bits per nonzero value, 32 or 16 fixed / as
        coded); 'd': pq block size; 'b': index bits; 'fill':
        filler entries; 'i P+Q' / 'i H': index bits per nonzero, fixed b (fillers included) / as
        coded; 'bits/w': all the tensor's bits per element (pq: codes plus the codebook's
        share); 'x': compression of the tensor vs its dense size.
        """
        headers = [
            "name",
            "scheme",
            "kept%",
            "k",
            "w P+Q",
            "w H",
            "d",
            "b",
            "fill",
            "i P+Q",
            "i H",
            "bytes",
            "bits/w",
            "x",
        ]
        rows = []
        for t in self.tensors:
            coded = t.scheme in ("codebook", "affine", "pq", "sparse")  # sparse: value bits
            if t.scheme == "dense":
                scheme = "dense" if t.dense_store == "raw" else "dense16"
            elif t.scheme in ("pq", "affine", "alias"):
                scheme = t.scheme
            elif t.scheme == "sparse":  # float values at relative-index positions
                scheme = "sparse16" if t.dense_store == "float16" else "sparse32"
            else:
                scheme = {"sparse": "sparse", "context": "context"}.get(t.layout or "", "codes")
            sparse = t.layout == "sparse"
            rows.append(
                [
                    t.name,
                    scheme,
                    round(100 * t.kept, 2),
                    t.codebook_size or "",
                    round(t.weight_bits_per_code_pq, 2) if coded else "",
                    round(t.weight_bits_per_code, 2) if coded else "",
                    t.block_size or "",
                    t.index_bits if sparse else "",
                    t.fillers if sparse else "",
                    round(t.index_bits_per_nz_pq, 2) if sparse else "",
                    round(t.index_bits_per_nz, 2) if sparse else "",
                    t.total_bytes,
                    round(t.bits_per_weight, 3),
                    round(t.compression, 2),
                ]
            )
        return headers, rows
