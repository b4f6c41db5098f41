"""Errors of the compressed-file reader."""

from __future__ import annotations

__all__ = ["FormatError"]


class FormatError(ValueError):
    """A ``.ncz`` file is damaged or not an nncompress file (bad magic, version, CRC, lengths,
    shapes or streams). Raised instead of any other exception while decoding."""
