"""The error bases every layer raises (one place, so callers catch them by one name).

Every nncompress error is a :class:`NncompressError`; the ones below are also ``ValueError``
(bad input, never a bug), so code written before this module existed keeps catching them.
Family-specific errors (``GraphError``, ``ExportError``, ``DataError``, ``CodingError``...)
derive from :class:`NncompressError` in their own packages.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FormatError",
    "NncompressError",
    "SpecError",
    "TrainingError",
]


class NncompressError(Exception):
    """Base of every error nncompress raises on purpose."""


class ConfigError(NncompressError, ValueError):
    """A configuration field has a value that is not allowed (the message names the field,
    the value and what is allowed)."""


class CheckpointError(NncompressError, ValueError):
    """A checkpoint is missing, inconsistent or has been tampered with."""


class SpecError(NncompressError, ValueError):
    """A module cannot be described as a spec, or a spec is invalid."""


class FormatError(NncompressError, ValueError):
    """A ``.ncz`` file is damaged or not an nncompress file (bad magic, version, CRC, lengths,
    shapes or streams). Raised instead of any other exception while decoding."""


class TrainingError(NncompressError, ValueError):
    """Training cannot go on: the loss became NaN or infinite (a learning rate too large, or
    bad data). Raised at once, so nothing is saved from the diverged model."""
