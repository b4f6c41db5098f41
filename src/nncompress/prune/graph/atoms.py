"""Channel atoms and their union-find.

Every channel that a Conv/Linear layer produces gets a fresh *atom* (one per output filter).
Couplings (a residual addition, a layer read by two branches) unify atoms; an atom that must
not be removed (a model output, a channel sliced by an op we cannot follow) is *fixed*, with
the reason. The roots of the union-find are the channels of the final groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OPAQUE", "ChannelAtoms", "Chan"]


@dataclass
class Chan:
    """A tensor whose entries along ``axis`` carry the channel ``atoms`` (one id per index)."""

    axis: int
    atoms: np.ndarray  # (size along axis,) int64


OPAQUE = object()  # a tensor whose channel layout we do not track (inputs, constants, ...)


class ChannelAtoms:
    """Union-find over channel atoms, with a reason for every fixed (unprunable) root."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._fixed: dict[int, str] = {}

    def _new(self, n: int, reason: str | None = None) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        atoms = np.arange(start, start + n, dtype=np.int64)
        if reason is not None:
            for a in atoms:
                self._fixed[int(a)] = reason
        return atoms

    def _find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(int(a)), self._find(int(b))
        if ra == rb:
            return
        self._parent[rb] = ra
        reason = self._fixed.pop(rb, None)
        if reason is not None and ra not in self._fixed:
            self._fixed[ra] = reason

    def _unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self._union(x, y)

    def _fix(self, atoms: np.ndarray, reason: str) -> None:
        for a in atoms.tolist():
            r = self._find(a)
            self._fixed.setdefault(r, reason)

    def _roots(self, atoms: np.ndarray) -> np.ndarray:
        return np.fromiter((self._find(a) for a in atoms.tolist()), np.int64, len(atoms))
