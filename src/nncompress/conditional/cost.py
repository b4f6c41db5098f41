"""What a sample costs when it leaves at each exit, and the expected MACs per sample.

For exits ``0 .. E-1`` and the final output ``E`` of an early-exit network:

* ``prefix[i]``: MACs of the backbone computed before exit point ``i`` (stem and blocks up to
  and including the named submodule);
* ``heads[i]``: MACs of exit head ``i``;
* ``final``: MACs of the whole backbone (the original model).

An exit whose threshold is 1.0 is closed: its head never runs. With ``O`` the set of open exits,
a sample leaving at exit ``i`` costs ``prefix[i] + sum_{j <= i, j in O} heads[j]``, and a sample
reaching the end costs ``final + sum_{j in O} heads[j]``. With the fraction ``r_i`` of samples
leaving at each exit, the expected cost per sample is

.. math::  \\bar C = \\sum_{i=0}^{E} r_i \\, C_i

(Bolukbasi et al. 2017 minimise this average under an accuracy constraint). A cascade of models
``M_0 .. M_E`` is the same with ``prefix = 0``, ``heads[i] = MACs(M_i)`` and
``final = MACs(M_E)``: a model is run only for the samples that reach it, and a closed stage is
skipped. MACs are the dense MACs of :func:`nncompress.stats.layer_macs` (Conv/Linear layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..stats import count_macs, is_mac_layer, layer_macs

__all__ = ["ExitCosts", "cascade_costs", "exit_costs"]


@dataclass(frozen=True)
class ExitCosts:
    """MACs per sample around the exits (see the module docstring).

    Attributes
    ----------
    prefix : ``E`` backbone MACs before each exit point (zeros for a cascade).
    heads : ``E`` MACs of each exit head (of each cascade stage but the last).
    final : MACs of the backbone (the last cascade stage).
    """

    prefix: tuple[int, ...]
    heads: tuple[int, ...]
    final: int

    def __post_init__(self) -> None:
        if len(self.prefix) != len(self.heads):
            raise ValueError(f"prefix {self.prefix} and heads {self.heads}: need equal lengths")

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def leave_costs(self, open_exits: Sequence[bool]) -> tuple[int, ...]:
        """``E + 1`` costs: of a sample leaving at exit ``i``, and of one reaching the end."""
        if len(open_exits) != self.num_exits:
            raise ValueError(f"open_exits: need {self.num_exits} flags, got {len(open_exits)}")
        costs, heads = [], 0
        for i, is_open in enumerate(open_exits):
            heads += self.heads[i] if is_open else 0
            costs.append(self.prefix[i] + heads)
        costs.append(self.final + heads)
        return tuple(costs)

    def expected(self, rates: Sequence[float], thresholds: Sequence[float]) -> float:
        """Expected MACs per sample for exit ``rates`` (``E + 1``) under ``thresholds``."""
        if len(rates) != self.num_exits + 1:
            raise ConfigError(f"rates={list(rates)}: need {self.num_exits + 1} values")
        open_exits = [t < 1.0 for t in thresholds]
        for i, (r, is_open) in enumerate(zip(rates, open_exits, strict=False)):
            if r > 0 and not is_open:
                raise ConfigError(
                    f"rates[{i}]={r}: samples cannot leave at exit {i}, whose threshold is 1.0"
                )
        return float(sum(r * c for r, c in zip(rates, self.leave_costs(open_exits), strict=True)))

    def to_dict(self) -> dict:
        return {"prefix": list(self.prefix), "heads": list(self.heads), "final": self.final}


def exit_costs(net: nn.Module, input_shape: Sequence[int]) -> ExitCosts:
    """Measure :class:`ExitCosts` of an :class:`~nncompress.conditional.EarlyExitNet` with one
    forward pass of every branch (``forward_all``) on a zero sample of ``input_shape``."""
    head_of = {id(m): i for i, head in enumerate(net.heads) for m in head.modules()}
    tally = {"backbone": 0}
    heads = [0] * net.num_exits
    prefix: list[int | None] = [None] * net.num_exits
    handles = []

    def mac_hook(mod: nn.Module, inputs, out: torch.Tensor) -> None:
        dense, _ = layer_macs(mod, out)
        i = head_of.get(id(mod))
        if i is None:
            tally["backbone"] += dense
        else:
            heads[i] += dense

    def marker(i: int):
        def hook(mod, inputs, out) -> None:
            prefix[i] = tally["backbone"]

        return hook

    was_training = net.training
    net.eval()
    try:
        # markers first: forward_all's own hooks (which run the heads) are registered after
        for i, point in enumerate(net._points()):
            handles.append(point.register_forward_hook(marker(i)))
        for m in net.modules():
            if is_mac_layer(m):
                handles.append(m.register_forward_hook(mac_hook))
        with torch.no_grad():
            net.forward_all(torch.zeros(1, *input_shape, device=model_device(net)))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return ExitCosts(tuple(int(p or 0) for p in prefix), tuple(heads), tally["backbone"])


def cascade_costs(models: Sequence[nn.Module], input_shape: Sequence[int]) -> ExitCosts:
    """:class:`ExitCosts` of a cascade of ``models`` (each run in full on the samples that
    reach it)."""
    macs = [sum(v[0] for v in count_macs(m, tuple(input_shape)).values()) for m in models]
    return ExitCosts((0,) * (len(models) - 1), tuple(macs[:-1]), macs[-1])
