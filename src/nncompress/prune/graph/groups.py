"""Channel groups: the result of the dependency graph.

A :class:`ChannelGroup` is a set of producers (Conv/Linear layers) whose output filters are
coupled, with every slot each of its channels occupies; a :class:`LayerCut` is what thinning
keeps of one module. :func:`make_groups` turns the final union-find of a
:class:`~nncompress.prune.graph.rules.ChannelWalker` into groups (a second union-find, over
producers that share any channel).
"""

from __future__ import annotations

from dataclasses import dataclass

from .rules import ChannelWalker

__all__ = ["ChannelGroup", "LayerCut", "make_groups"]


@dataclass
class LayerCut:
    """What thinning keeps of one module: indices along its output / input channel dims.

    ``kind`` is one of ``conv``, ``linear``, ``depthwise``, ``batchnorm``, ``layernorm``.
    ``keep_out`` indexes weight dim 0 (and bias, BN/LN parameters, running statistics);
    ``keep_in`` indexes weight dim 1 of a Conv/Linear. ``None`` means unchanged.
    """

    module: str
    kind: str
    keep_out: list[int] | None = None
    keep_in: list[int] | None = None


@dataclass
class ChannelGroup:
    """Producers whose output filters are coupled, and every slot their channels occupy.

    Attributes
    ----------
    index : position in :attr:`DependencyGraph.groups`.
    producers : Conv/Linear layers writing these channels (weight dim 0).
    channels : one entry per coupled channel: ``{(module, role): [positions]}`` with role
        ``out`` (producer filter), ``in`` (consumer input channel/feature), ``follow``
        (BatchNorm/LayerNorm/depthwise conv channel).
    prunable : per channel, whether it may be removed.
    reasons : per channel, why it is fixed (``None`` if prunable).
    """

    index: int
    producers: list[str]
    channels: list[dict[tuple[str, str], list[int]]]
    prunable: list[bool]
    reasons: list[str | None]

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def num_prunable(self) -> int:
        return sum(self.prunable)

    @property
    def members(self) -> list[tuple[str, str]]:
        """Every (module, role) slot touched by the group."""
        seen: dict[tuple[str, str], None] = {}
        for ch in self.channels:
            for key in ch:
                seen.setdefault(key, None)
        return list(seen)

    def producer_positions(self, channel: int) -> list[tuple[str, int]]:
        """``[(producer, filter index)]`` of one channel of the group."""
        return [
            (mod, pos)
            for (mod, role), positions in self.channels[channel].items()
            if role == "out"
            for pos in positions
        ]

    def describe(self) -> dict:
        fixed = sorted({r for r in self.reasons if r})
        return {
            "index": self.index,
            "producers": self.producers,
            "channels": self.size,
            "prunable": self.num_prunable,
            "members": [f"{m}:{r}" for m, r in self.members],
            "fixed_because": fixed,
        }


def make_groups(walker: ChannelWalker) -> tuple[list[ChannelGroup], dict, dict, dict]:
    """``(groups, roots of every slot, group index of every root, slots of every root)``."""
    # the union-find is final now: cache every slot's roots
    roots_of = {
        (name, role): walker._roots(atoms)
        for role, table in (("out", walker._out), ("in", walker._in), ("follow", walker._follow))
        for name, atoms in table.items()
    }
    # channel (root) -> {(module, role): positions}
    where: dict[int, dict[tuple[str, str], list[int]]] = {}
    order: list[int] = []
    for role, table in (("out", walker._out), ("in", walker._in), ("follow", walker._follow)):
        for name in table:
            for pos, root in enumerate(roots_of[name, role].tolist()):
                if root not in where:
                    where[root] = {}
                    order.append(root)
                where[root].setdefault((name, role), []).append(pos)
    # producers sharing any channel form one group (a second union-find, over producers)
    prod_parent: dict[str, str] = {name: name for name in walker._out}

    def pfind(p: str) -> str:
        while prod_parent[p] != p:
            prod_parent[p] = prod_parent[prod_parent[p]]
            p = prod_parent[p]
        return p

    for root in order:
        prods = [m for (m, r) in where[root] if r == "out"]
        for other in prods[1:]:
            a, b = pfind(prods[0]), pfind(other)
            if a != b:
                prod_parent[b] = a
    by_group: dict[str, list[int]] = {}
    for root in order:
        prods = [m for (m, r) in where[root] if r == "out"]
        if prods:
            by_group.setdefault(pfind(prods[0]), []).append(root)
    root_group: dict[int, int] = {}
    groups = []
    for roots in by_group.values():
        producers = list(dict.fromkeys(m for r in roots for (m, k) in where[r] if k == "out"))
        first = producers[0]
        roots = sorted(roots, key=lambda r: (first, *where[r].get((first, "out"), [1 << 30])))
        idx = len(groups)
        for r in roots:
            root_group[r] = idx
        groups.append(
            ChannelGroup(
                index=idx,
                producers=producers,
                channels=[where[r] for r in roots],
                prunable=[r not in walker._fixed for r in roots],
                reasons=[walker._fixed.get(r) for r in roots],
            )
        )
    return groups, roots_of, root_group, where
