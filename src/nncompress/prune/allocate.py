"""Model-wide sparsity targets spread over layers by one global magnitude ranking.

A uniform target prunes every layer to the same sparsity, including small layers every
output depends on (a 10-way classifier kept to 80 of its 1,000 weights at 92%). Ranking all
layers' weights together instead (global magnitude pruning) keeps the large-magnitude weights
wherever they are; Blalock et al. ("What is the state of neural network pruning?", MLSys
2020) found it at least as accurate as layer-wise pruning at equal sparsity, and Han et al.
2015's hand-tuned LeNet-300-100 allocation (8% / 9% / 26% kept) has the same shape: the
small output layer keeps the most. A per-layer **floor** keeps a layer from being emptied
when its weights are small only because of its scale: every layer keeps at least
``floor * (1 - sparsity)`` of its weights (``floor`` times the model-wide kept fraction), so
the target stays reachable whatever it is.

:func:`global_allocation` returns per-layer sparsities; :func:`nncompress.prune.prune_` then
prunes each layer to its own (per-layer overrides of :class:`~nncompress.prune.MagnitudeConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..core.validate import check

__all__ = ["DEFAULT_FLOOR", "global_allocation"]

#: default floor: every layer keeps at least 30% of the model-wide kept fraction
DEFAULT_FLOOR = 0.3


def global_allocation(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    floor: float = DEFAULT_FLOOR,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Per-layer sparsities reaching a model-wide ``sparsity`` by one ranking of ``|w|``.

    With ``n_l`` weights in layer ``l`` and ``K = N - round(sparsity * N)`` weights kept in
    total, finds the magnitude threshold ``t`` such that ``sum_l max(f_l, #{|w_l| > t}) <= K``
    is as large as possible (bisection on ``t``), where ``f_l = ceil(floor * (1 - sparsity) *
    n_l)`` is the layer's floor. Entries already pruned in ``masks`` rank below everything.

    Parameters
    ----------
    weights : layer name -> weight tensor (the effective, already masked weight).
    sparsity : model-wide fraction of weights removed, in [0, 1).
    floor : in [0, 1]: fraction of the model-wide kept fraction every layer keeps at least.
    masks : layer name -> boolean mask of the surviving entries (optional).

    Returns
    -------
    dict: layer name -> sparsity in [0, 1) (the fraction of its weights to remove).
    """
    check(0.0 <= sparsity < 1.0, "sparsity", sparsity, "must be in [0, 1)")
    check(0.0 <= floor <= 1.0, "floor", floor, "must be in [0, 1]")
    names = list(weights)
    if not names:
        return {}
    scores, floors = {}, {}
    for n in names:
        s = weights[n].detach().abs().reshape(-1).double().cpu()  # (n_l,)
        if masks is not None and n in masks:
            s = torch.where(masks[n].reshape(-1).bool().cpu(), s, torch.full_like(s, -1.0))
        scores[n] = torch.sort(s).values  # ascending, for searchsorted
        floors[n] = min(s.numel(), math.ceil(floor * (1.0 - sparsity) * s.numel()))
    total = sum(s.numel() for s in scores.values())
    target = total - round(sparsity * total)

    def kept(t: float) -> dict[str, int]:
        out = {}
        for n, s in scores.items():
            above = s.numel() - int(
                torch.searchsorted(s, torch.tensor([t], dtype=s.dtype), right=True)
            )
            alive = int((s >= 0).sum())
            out[n] = min(alive, max(floors[n], above)) if alive else 0
        return out

    lo, hi = -1.0, float(max(float(s[-1]) for s in scores.values()))  # kept(hi): floors only
    if sum(kept(lo).values()) <= target:  # nothing to remove
        counts = kept(lo)
    else:
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            if sum(kept(mid).values()) > target:
                lo = mid
            else:
                hi = mid
        counts = kept(hi)
    return {n: 1.0 - counts[n] / scores[n].numel() for n in names}
