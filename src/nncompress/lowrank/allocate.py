"""Budget allocation by response error: spend a parameter or MAC budget where it costs least.

The global knob of :func:`~nncompress.lowrank.decompose_` (one energy fraction shared by all
layers) gives every layer the same relative weight error whatever a rank costs there. Here the
ranks are chosen to minimise the summed relative **response** error of the decomposed layers
under the budget. For a Linear layer ``y = W x`` with input second moment ``G = E[x x^T]``
(measured on calibration batches), the best rank-``r`` approximation of the response in the
mean-square sense keeps the top ``r`` singular values of ``W G^{1/2}`` (Zhang et al., TPAMI
2016, "Accelerating very deep convolutional networks", the data-driven low-rank problem), and
its relative error is ``e(r) = sum_{i>r} s_i^2 / sum_i s_i^2``. Without calibration data the
weight's own singular values are used (``G = I``). Each layer then has a ladder of ranks with a
cost (parameters or MACs) and an error; the layer kept whole costs its original size and no
error. Starting from every layer's smallest rank, the step with the largest error reduction
per unit of cost that still fits the budget is taken until none fits (marginal analysis; with
sorted singular values the gains shrink along each ladder, so this is the greedy optimum of
the separable problem up to the last step's granularity).
"""

from __future__ import annotations

import torch

from .plan import Rank, _helps, _ladder, _orig_cost, _Plan, _spectrum

__all__ = ["ALLOCATIONS", "response_ranks", "response_spectrum"]

ALLOCATIONS = ("auto", "energy", "response")
#: methods whose rank ladder has one singular value per step
RESPONSE_METHODS = ("svd", "separable")


def response_spectrum(p: _Plan, gram: torch.Tensor | None) -> torch.Tensor:
    """Singular values of ``W G^{1/2}`` (``gram`` = ``E[x x^T]`` of the layer's input, SVD
    layers) or of the weight matrix itself (no ``gram``)."""
    if gram is None or p.cfg.method != "svd":
        return _spectrum(p, "matrix")
    w = p.module.weight.detach().double()  # (out, in)
    g = gram.double()
    jitter = 1e-8 * float(g.diagonal().mean().clamp_min(1e-30))
    root = torch.linalg.cholesky(g + jitter * torch.eye(g.shape[0], dtype=g.dtype))  # (in, in)
    return torch.linalg.svdvals(w @ root)  # (min(out, in),)


def response_ranks(
    plans: list[_Plan], target: float, use_macs: bool, grams: dict[str, torch.Tensor]
) -> tuple[list[Rank | None], bool]:
    """Per plan the rank (``None``: keep the layer whole) minimising the summed relative
    response error under ``target`` (parameters, or MACs with ``use_macs``); and whether the
    budget is met."""
    idx = 1 if use_macs else 0
    ladders = []  # per plan: [(rank or None, cost, error)], cost increasing
    for p in plans:
        s2 = response_spectrum(p, grams.get(p.name)) ** 2
        total = float(s2.sum()) or 1.0
        kept = torch.cumsum(s2, 0)
        steps = []
        for r in _ladder(p):
            ok, after = _helps(p, r)
            if ok:
                err = 1.0 - float(kept[min(int(r), kept.numel()) - 1]) / total
                steps.append((r, after[idx], max(err, 0.0)))
        steps.append((None, _orig_cost(p)[idx], 0.0))
        ladders.append(steps)
    pos = [0] * len(plans)
    spent = sum(steps[0][1] for steps in ladders)
    met = spent <= target
    while met:
        best, best_gain = None, 0.0
        for i, steps in enumerate(ladders):
            if pos[i] + 1 >= len(steps):
                continue
            cur, nxt = steps[pos[i]], steps[pos[i] + 1]
            extra = nxt[1] - cur[1]
            if spent + extra > target:
                continue
            gain = (cur[2] - nxt[2]) / max(extra, 1)
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        steps = ladders[best]
        spent += steps[pos[best] + 1][1] - steps[pos[best]][1]
        pos[best] += 1
    return [steps[i][0] for steps, i in zip(ladders, pos, strict=True)], met
