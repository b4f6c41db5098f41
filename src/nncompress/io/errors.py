"""Errors of the compressed-file reader."""

from __future__ import annotations

from ..core.errors import FormatError

__all__ = ["FormatError"]
