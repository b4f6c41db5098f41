"""Channel dependency graph for filter (structured) pruning, built by tracing the model.

The package: :mod:`.atoms` (the union-find), :mod:`.rules` (one rule per op kind, as lookup
tables), :mod:`.groups` (channel groups), and :class:`DependencyGraph` here.

Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets": removing filter ``j`` of conv
layer ``i`` removes feature map ``j`` and therefore input channel ``j`` of every layer that reads
it (the next convolution, its BatchNorm, a Linear after a flatten...). When several layers write
into the same tensor (the two branches of a residual addition) they must drop the *same*
indices. This module finds those couplings for an arbitrary model.

How it works
------------
The model is traced with :func:`nncompress.core.fx.trace` and shapes are propagated with one
example input. Every channel that a Conv/Linear layer produces gets a fresh *atom* (one per
output filter). Atoms then flow through the graph:

- element-wise ops (activations, pooling, dropout, BatchNorm, depthwise convs) keep them;
- ``a + b`` / ``a - b`` / ``a * b`` unify the atoms of ``a`` and ``b`` position by position (a
  union-find), so the residual branch and the shortcut share their channels; an identity
  shortcut ties the block's last conv to whatever produced the block input, so that whole chain
  becomes one group;
- ``torch.cat`` along the channel axis concatenates the atom lists (offsets map each index back
  to its producer);
- ``flatten`` repeats each atom ``H*W`` times, so one channel is ``H*W`` consecutive input
  features of the following Linear;
- ``permute``/``transpose``/``unsqueeze`` move the channel axis; ``mean``/``sum`` over other axes
  keep it;
- anything that mixes channels in a way we cannot slice (reshape with hard-coded sizes, slicing,
  ``chunk``, softmax over channels, grouped convs, GroupNorm, per-channel parameters used
  directly, the model inputs and outputs) *fixes* the atoms involved: they are never pruned.

A module or function the graph does not know raises :class:`GraphError` naming the op and the
module it was called from, rather than risking a silently wrong model.

The result is a list of :class:`ChannelGroup`: sets of producers whose output filters are
coupled, with, for every channel of the group, the positions it occupies in each member
(producer outputs, consumer inputs, BatchNorm/LayerNorm/depthwise followers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ...core.fx import TraceError, trace
from .errors import GraphError
from .groups import ChannelGroup, LayerCut, make_groups
from .rules import ChannelWalker

__all__ = [
    "ChannelGroup",
    "DependencyGraph",
    "GraphError",
    "LayerCut",
    "build_dependency_graph",
]


def _trace(model: nn.Module):
    try:
        return trace(model)
    except TraceError as exc:
        raise GraphError(
            f"cannot trace the model with torch.fx: {exc.detail} (in module '{exc.module}'); "
            "data-dependent control flow or unsupported Python in forward() prevents building "
            "the channel dependency graph"
        ) from exc


class DependencyGraph:
    """Channel couplings of ``model`` for one ``example_input`` (see the module docstring).

    Build it with :func:`build_dependency_graph`. The graph refers to modules by qualified name;
    it stays valid as long as the model's structure does not change.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        walker = ChannelWalker()
        self.batch = int(example_input.shape[0]) if example_input.dim() else 1
        modules = dict(model.named_modules())
        was_training = model.training
        model.eval()
        try:
            gm = _trace(model)
            with torch.no_grad():
                try:
                    ShapeProp(gm).propagate(example_input)
                except Exception as exc:
                    raise GraphError(
                        f"running the traced model on an example input of shape "
                        f"{tuple(example_input.shape)} failed: {type(exc).__name__}: {exc}"
                    ) from exc
            walker._walk(gm, modules)
        finally:
            model.train(was_training)
        self._atoms = walker
        self._out, self._in, self._follow = walker._out, walker._in, walker._follow
        self._fixed = walker._fixed
        self.layers = walker.layers
        self._record_sizes(modules)
        self.groups, self._roots_of, self._root_group, self._where = make_groups(walker)

    def _find(self, a: int) -> int:
        return self._atoms._find(a)

    def group_of(self, module: str) -> ChannelGroup:
        """The group whose producers include ``module`` (a Conv/Linear qualified name)."""
        if module not in self._out:
            raise GraphError(
                f"module '{module}' is not a prunable producer; producers: {sorted(self._out)}"
            )
        root = self._find(int(self._out[module][0]))
        return self.groups[self._root_group[root]]

    @property
    def producers(self) -> list[str]:
        """Every Conv/Linear layer whose output filters the graph tracks."""
        return list(self._out)

    def expand(self, plan: Mapping[str, Sequence[int]]) -> dict[str, LayerCut]:
        """Expand ``{producer: output indices to remove}`` to every coupled module.

        Raises :class:`GraphError` if a module is not a producer, an index is out of range, a
        channel is fixed (with the reason), two coupled producers ask for different indices, or
        a module would lose all its channels.
        """
        removed: set[int] = set()
        requested: dict[str, set[int]] = {}
        for name, indices in plan.items():
            if name not in self._out:
                kind = self.layers.get(name)
                hint = (
                    f" (a {kind.kind} layer: prune the layer that produces its input)"
                    if kind
                    else ""
                )
                raise GraphError(
                    f"plan entry '{name}': not a prunable Conv/Linear producer{hint}; "
                    f"producers: {sorted(self._out)}"
                )
            atoms = self._out[name]
            idx = set()
            for i in indices:
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                    raise GraphError(f"plan entry '{name}': index {i!r} is not an integer")
                if not 0 <= int(i) < len(atoms):
                    raise GraphError(
                        f"plan entry '{name}': index {int(i)} out of range [0, {len(atoms)})"
                    )
                idx.add(int(i))
            requested[name] = idx
            for i in idx:
                root = self._find(int(atoms[i]))
                if root in self._fixed:
                    raise GraphError(
                        f"plan entry '{name}': channel {i} cannot be removed: {self._fixed[root]}"
                    )
                removed.add(root)
        for name, idx in requested.items():
            implied = {
                i for i, r in enumerate(self._roots_of[name, "out"].tolist()) if r in removed
            }
            if implied != idx:
                extra = sorted(implied - idx)[:8]
                raise GraphError(
                    f"plan entry '{name}': coupled producers ask to remove different channels "
                    f"(the plan's other entries also remove its channels {extra}); coupled "
                    f"layers: {self.group_of(name).producers}"
                )
        cuts: dict[str, LayerCut] = {}

        gone = np.fromiter(removed, np.int64, len(removed))

        def keep(name: str, role: str, what: str) -> list[int] | None:
            atoms = self._roots_of[name, role]
            mask = ~np.isin(atoms, gone)
            if mask.all():
                return None
            if not mask.any():
                raise GraphError(
                    f"module '{name}' would lose all its {len(atoms)} {what}; keep at least one"
                )
            return np.flatnonzero(mask).tolist()

        for name in self._out:
            k = keep(name, "out", "output channels")
            if k is not None:
                cuts.setdefault(name, LayerCut(name, self.layers[name].kind)).keep_out = k
        for name in self._in:
            k = keep(name, "in", "input channels")
            if k is not None:
                cuts.setdefault(name, LayerCut(name, self.layers[name].kind)).keep_in = k
        for name in self._follow:
            k = keep(name, "follow", "channels")
            if k is not None:
                cuts.setdefault(name, LayerCut(name, self.layers[name].kind)).keep_out = k
        return cuts

    def macs(self, cuts: Mapping[str, LayerCut] | None = None) -> dict[str, int]:
        """Dense MACs per sample of every Conv/Linear layer after ``cuts`` (see stats.count_macs).

        ``positions * weight.numel()`` with the kept channel counts; ``cuts=None`` gives the
        unpruned model.
        """
        out: dict[str, int] = {}
        for name, info in self.layers.items():
            if info.kind not in ("conv", "linear", "depthwise"):
                continue
            out[name] = info.positions * self._weight_numel(name, cuts)
        return out

    def _weight_numel(self, name: str, cuts: Mapping[str, LayerCut] | None) -> int:
        info = self.layers[name]
        cut = (cuts or {}).get(name)
        n_out = self._n_out(name) if cut is None or cut.keep_out is None else len(cut.keep_out)
        if info.kind == "depthwise":
            return n_out * self._kernel[name]
        n_in = self._n_in[name] if cut is None or cut.keep_in is None else len(cut.keep_in)
        return n_out * (n_in // info.groups) * self._kernel[name]

    def _n_out(self, name: str) -> int:
        if name in self._out:
            return len(self._out[name])
        return len(self._follow[name])

    def _record_sizes(self, modules: Mapping[str, nn.Module]) -> None:
        """Remember kernel sizes and input widths (used by :meth:`macs`)."""
        self._kernel: dict[str, int] = {}
        self._n_in: dict[str, int] = {}
        for name, info in self.layers.items():
            if info.kind not in ("conv", "linear", "depthwise"):
                continue
            m = modules[name]
            if isinstance(m, nn.Linear):
                self._kernel[name], self._n_in[name] = 1, m.in_features
            else:
                self._kernel[name] = int(np.prod(m.kernel_size))
                self._n_in[name] = m.in_channels

    def describe(self) -> list[dict]:
        """JSON-able summary of the groups."""
        return [g.describe() for g in self.groups]


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> DependencyGraph:
    """Trace ``model`` on ``example_input`` and return its channel :class:`DependencyGraph`.

    ``model.training`` is restored afterwards; BatchNorm statistics are not touched (the shape
    pass runs in eval mode without gradients).
    """
    if not isinstance(example_input, torch.Tensor):
        raise GraphError(
            f"example_input must be a torch.Tensor, got {type(example_input).__name__}"
        )
    return DependencyGraph(model, example_input)
