"""Entropy coding and sparse storage (Deep Compression stage 3): fixed-width bit packing,
relative-index sparse positions with fillers, canonical Huffman and ANS coders, and the
empirical entropy they are measured against. Plain numpy functions (layer 1 of the API)."""

from .ans import AnsStream, ans_decode, ans_encode
from .bitpack import CodingError, pack_bits, packed_size, unpack_bits
from .entropy import empirical_entropy, symbol_counts
from .huffman import (
    HuffmanStream,
    canonical_codes,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
)
from .sparse import RelativeIndex, relative_index_decode, relative_index_encode

__all__ = [
    "AnsStream",
    "CodingError",
    "HuffmanStream",
    "RelativeIndex",
    "ans_decode",
    "ans_encode",
    "canonical_codes",
    "empirical_entropy",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "pack_bits",
    "packed_size",
    "relative_index_decode",
    "relative_index_encode",
    "symbol_counts",
    "unpack_bits",
]
