"""The error of the channel dependency graph."""

from __future__ import annotations

from ...core.errors import NncompressError

__all__ = ["GraphError"]


class GraphError(NncompressError, ValueError):
    """The model cannot be analysed, or a pruning plan is inconsistent with its couplings."""
