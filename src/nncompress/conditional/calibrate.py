"""Threshold calibration: the cheapest exit thresholds that keep accuracy within a bound.

Given held-out predictions of every exit, choose per-exit thresholds ``t`` minimising the
expected MACs per sample (:mod:`~nncompress.conditional.cost`) subject to

.. math::  \\mathrm{acc}(t) \\ge \\mathrm{acc}_{\\mathrm{ref}} - \\Delta

with :math:`\\Delta` the allowed loss in points (``max_loss``) and the reference the full model's
held-out accuracy (Bolukbasi et al. 2017, "Adaptive Neural Networks for Efficient Inference",
section 3: early-exit policies trade average cost against a bounded loss).

Two searches over the held-out samples, both evaluated exactly (integer counts of correct
samples and MACs, the same float32 confidence comparison as inference):

* ``exact``: every combination of candidate thresholds for exits ``0 .. E-2`` (each closed or
  set to one of the distinct held-out confidences, or to ``grid`` quantiles of them), and for
  each, a sweep over every threshold of the last exit with cumulative sums. With ``grid=None``
  this is the optimum over all thresholds on the calibration data; its cost grows as
  ``N^(E-1)`` sweeps of ``O(N)``.
* ``greedy``: exits in forward order; each takes the cheapest threshold that keeps the bound
  with the later exits closed (the loss budget goes to the earliest, cheapest exits first).
  ``O(E N log N)``.

Because only the calibration data are seen, the bound holds on them exactly and on new data
only approximately: calibrate on the held-out split and report the test split once.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import Progress, progress_task
from ..core.validate import check, is_int, is_number
from .base import CONFIDENCES, confidence
from .cost import ExitCosts
from .report import ExitReport, exit_names

__all__ = [
    "METHODS",
    "CalibrationConfig",
    "ExitOutputs",
    "calibrate_",
    "calibrate_thresholds",
    "collect_outputs",
]

log = logging.getLogger(__name__)

METHODS = ("exact", "greedy")
# the largest float32 below 1: a threshold for samples whose confidence is exactly 1.0 (a
# threshold of 1.0 itself closes the exit)
_TOP = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


@dataclass(frozen=True)
class CalibrationConfig:
    """How to choose thresholds (frozen; JSON/YAML-serialisable).

    Attributes
    ----------
    max_loss : allowed accuracy loss in points (0.5 = half a percentage point) against the
        reference accuracy on the calibration data.
    method : ``"exact"`` or ``"greedy"`` (module docstring).
    confidence : ``"max-softmax"`` or ``"entropy"``.
    grid : for ``exact``, candidate thresholds per exit other than the last (quantiles of its
        held-out confidences); ``None`` = every distinct value (exact optimum).
    reference_accuracy : accuracy (%) to stay within ``max_loss`` of; ``None`` = the final
        exit's accuracy on the calibration data (the backbone, or the last cascade stage).
    max_combinations : refuse an ``exact`` search with more threshold combinations than this
        (before any work), naming ``grid`` and ``greedy`` as the ways out.
    """

    max_loss: float = 0.5
    method: str = "exact"
    confidence: str = "max-softmax"
    grid: int | None = None
    reference_accuracy: float | None = None
    max_combinations: int = 200_000

    def __post_init__(self) -> None:
        check(
            is_number(self.max_loss) and 0 <= self.max_loss <= 100,
            "max_loss",
            self.max_loss,
            "must be in [0, 100] (points)",
        )
        check(self.method in METHODS, "method", self.method, f"must be one of {METHODS}")
        check(
            self.confidence in CONFIDENCES,
            "confidence",
            self.confidence,
            f"must be one of {CONFIDENCES}",
        )
        check(
            self.grid is None or (is_int(self.grid) and self.grid >= 2),
            "grid",
            self.grid,
            "must be an integer >= 2 or null",
        )
        check(
            self.reference_accuracy is None
            or (is_number(self.reference_accuracy) and 0 <= self.reference_accuracy <= 100),
            "reference_accuracy",
            self.reference_accuracy,
            "must be in [0, 100] or null",
        )
        check(
            is_int(self.max_combinations) and self.max_combinations >= 1,
            "max_combinations",
            self.max_combinations,
            "must be an integer >= 1",
        )


@dataclass(frozen=True)
class ExitOutputs:
    """Every exit's logits on a split: ``logits[i]`` is ``(N, K)`` (final exit last);
    ``labels`` ``(N,)``."""

    logits: tuple[torch.Tensor, ...]
    labels: torch.Tensor

    def confidences(self, kind: str) -> np.ndarray:
        """``(E+1, N)`` float32 confidences, computed as at inference."""
        return np.stack([confidence(z, kind).numpy() for z in self.logits]).astype(np.float32)

    def correct(self) -> np.ndarray:
        """``(E+1, N)`` bool: whether each exit's prediction is right."""
        return np.stack([(z.argmax(1) == self.labels).numpy() for z in self.logits])


@torch.no_grad()
def collect_outputs(
    model: nn.Module,
    loader: Iterable,
    *,
    progress: Progress | None = None,
) -> ExitOutputs:
    """Run ``model.forward_all`` (every exit) in eval mode over ``loader``."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    chunks: list[list[torch.Tensor]] = []
    labels = []
    n = len(loader) if hasattr(loader, "__len__") else None
    try:
        with progress_task(progress, "exit outputs", n) as task:
            for x, y in loader:
                outs = model.forward_all(x.to(device))
                chunks.append([o.float().cpu() for o in outs])
                labels.append(y.cpu())
                task.advance()
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("collect_outputs: the loader yielded no samples")
    logits = tuple(torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0])))
    return ExitOutputs(logits, torch.cat(labels))


def exits_taken(conf: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """``(N,)`` exit index of every sample under ``thresholds`` (the rule of inference:
    the first exit ``i`` with ``thresholds[i] < 1`` and ``conf[i] >= thresholds[i]``)."""
    e = len(thresholds)
    where = np.full(conf.shape[1], e, dtype=np.int64)
    undecided = np.ones(conf.shape[1], dtype=bool)
    for i, t in enumerate(thresholds):
        if t >= 1.0:
            continue
        leave = undecided & (conf[i] >= np.float32(t))
        where[leave] = i
        undecided &= ~leave
    return where


class _Search:
    """The threshold search over held-out confidences ``conf`` (E+1, N) and ``correct``."""

    def __init__(
        self, conf: np.ndarray, correct: np.ndarray, costs: ExitCosts, min_correct: int
    ) -> None:
        self.e = costs.num_exits
        self.n = conf.shape[1]
        # clamping at _TOP changes no decision of a threshold < 1 (every candidate is <= _TOP)
        self.conf = np.minimum(conf[: self.e], np.float32(_TOP))  # (E, N)
        self.correct = correct.astype(np.int64)  # (E+1, N)
        self.costs = costs
        self.min_correct = min_correct
        self.order = [np.argsort(-c, kind="stable") for c in self.conf]
        self.sorted_conf = [c[o] for c, o in zip(self.conf, self.order, strict=True)]
        # k leaving samples (the first k in sorted order) is a threshold exactly when the
        # k-th value differs from the (k+1)-th: then the threshold is the k-th value
        self.bounds = []
        for sc in self.sorted_conf:
            k = np.flatnonzero(np.append(sc[1:] != sc[:-1], True)) + 1  # (M,) counts
            self.bounds.append(k)

    def sweep(
        self, i: int, remaining: np.ndarray, got: int, cost: int, heads: int
    ) -> tuple[float, int, int]:
        """Best threshold of exit ``i`` with every later exit closed, given the samples still
        ``remaining``, the correct count ``got`` and MACs ``cost`` of those that left, and the
        MACs ``heads`` of the open heads before ``i``: ``(threshold, total_cost, total_got)``."""
        final_correct = self.correct[self.e]
        n_r = int(remaining.sum())
        closed = (
            1.0,
            cost + n_r * (self.costs.final + heads),
            got + int(final_correct[remaining].sum()),
        )
        o = self.order[i]
        m = remaining[o].astype(np.int64)  # (N,) in exit i's confidence order
        cnt = np.cumsum(m)
        c_exit = np.cumsum(m * self.correct[i][o])
        c_final = np.cumsum(m * final_correct[o])
        k = self.bounds[i]  # (M,) candidate leave counts (over all samples)
        leaving, right_here, final_lost = cnt[k - 1], c_exit[k - 1], c_final[k - 1]
        open_heads = heads + self.costs.heads[i]
        tot_got = got + right_here + (c_final[-1] - final_lost)
        tot_cost = (
            cost
            + leaving * (self.costs.prefix[i] + open_heads)
            + (n_r - leaving) * (self.costs.final + open_heads)
        )
        ok = (tot_got >= self.min_correct) & (leaving > 0)
        best = closed if closed[2] >= self.min_correct else None
        if ok.any():
            idx = np.flatnonzero(ok)
            # lowest cost, then most correct
            j = idx[np.lexsort((-tot_got[idx], tot_cost[idx]))[0]]
            cand = (float(self.sorted_conf[i][k[j] - 1]), int(tot_cost[j]), int(tot_got[j]))
            if best is None or (cand[1], -cand[2]) < (best[1], -best[2]):
                best = cand
        return best if best is not None else closed

    def leave(self, i: int, remaining: np.ndarray, t: float) -> np.ndarray:
        return remaining & (self.conf[i] >= np.float32(t))

    def greedy(self) -> tuple[float, ...]:
        remaining = np.ones(self.n, dtype=bool)
        got = cost = heads = 0
        chosen = []
        for i in range(self.e):
            t, _, _ = self.sweep(i, remaining, got, cost, heads)
            chosen.append(t)
            if t < 1.0:
                heads += self.costs.heads[i]
                left = self.leave(i, remaining, t)
                got += int(self.correct[i][left].sum())
                cost += int(left.sum()) * (self.costs.prefix[i] + heads)
                remaining = remaining & ~left
        return tuple(chosen)

    def candidates(self, i: int, grid: int | None) -> list[float]:
        values = np.unique(self.sorted_conf[i])[::-1]  # distinct, descending
        if grid is not None and len(values) > grid:
            pick = np.linspace(0, self.n - 1, grid).round().astype(np.int64)
            values = np.unique(self.sorted_conf[i][pick])[::-1]
        return [1.0, *(float(v) for v in values)]

    def exact(self, grid: int | None, max_combinations: int) -> tuple[float, ...]:
        outer = [self.candidates(i, grid) for i in range(self.e - 1)]
        combos = math.prod(len(c) for c in outer)
        if combos > max_combinations:
            raise ConfigError(
                f"method='exact': {combos:,} threshold combinations for {self.e} exits over "
                f"{self.n} samples exceed max_combinations={max_combinations:,}; set grid= "
                "(candidate thresholds per exit, e.g. 100) or use method='greedy'"
            )
        best: tuple[int, int, tuple[float, ...]] | None = None
        for combo in itertools.product(*outer):
            remaining = np.ones(self.n, dtype=bool)
            got = cost = heads = 0
            for i, t in enumerate(combo):
                if t >= 1.0:
                    continue
                heads += self.costs.heads[i]
                left = self.leave(i, remaining, t)
                got += int(self.correct[i][left].sum())
                cost += int(left.sum()) * (self.costs.prefix[i] + heads)
                remaining = remaining & ~left
            t_last, tot_cost, tot_got = self.sweep(self.e - 1, remaining, got, cost, heads)
            if tot_got < self.min_correct:
                continue
            if best is None or (tot_cost, -tot_got) < (best[0], -best[1]):
                best = (tot_cost, tot_got, (*combo, t_last))
        return best[2] if best is not None else (1.0,) * self.e


def calibrate_thresholds(
    outputs: ExitOutputs,
    costs: ExitCosts,
    config: CalibrationConfig,
    *,
    names: Sequence[str] | None = None,
) -> ExitReport:
    """Choose thresholds on ``outputs`` (held-out predictions of every exit) under ``config``;
    the :class:`ExitReport` of the chosen rule on the same data (its ``thresholds``)."""
    e = costs.num_exits
    if len(outputs.logits) != e + 1:
        raise ValueError(f"outputs has {len(outputs.logits)} exits; the costs describe {e + 1}")
    conf = outputs.confidences(config.confidence)  # (E+1, N)
    correct = outputs.correct()  # (E+1, N)
    n = correct.shape[1]
    final_correct = int(correct[e].sum())
    if config.reference_accuracy is None:
        reference = 100.0 * final_correct / n
        min_correct = final_correct - math.floor(config.max_loss * n / 100 + 1e-9)
    else:
        reference = config.reference_accuracy
        min_correct = math.ceil(n * (reference - config.max_loss) / 100 - 1e-9)
    search = _Search(conf, correct, costs, min_correct)
    if e == 0:
        thresholds: tuple[float, ...] = ()
    elif config.method == "greedy":
        thresholds = search.greedy()
    else:
        thresholds = search.exact(config.grid, config.max_combinations)
    where = exits_taken(conf, thresholds)
    counts = [int((where == i).sum()) for i in range(e + 1)]
    right = [int(correct[i][where == i].sum()) for i in range(e + 1)]
    if sum(right) < min_correct:
        log.warning(
            "no thresholds keep accuracy within %.2f points of %.2f%% (the final exit alone "
            "gives %.2f%%): every exit closed",
            config.max_loss,
            reference,
            100.0 * final_correct / n,
        )
    return ExitReport(
        names=tuple(names) if names is not None else (*(f"exit{i}" for i in range(e)), "final"),
        thresholds=thresholds,
        confidence=config.confidence,
        counts=tuple(counts),
        correct=tuple(right),
        costs=costs.leave_costs([t < 1.0 for t in thresholds]),
        full_macs=costs.final,
        reference_accuracy=reference,
        max_loss=config.max_loss,
        method=config.method,
    )


def calibrate_(
    model: nn.Module,
    loader: Iterable,
    config: CalibrationConfig | None = None,
    *,
    input_shape: Sequence[int],
    progress: Progress | None = None,
) -> ExitReport:
    """Calibrate an early-exit network or cascade on ``loader`` (the held-out split) in place:
    sets its thresholds, confidence measure and recorded exit rates; returns the report."""
    config = config or CalibrationConfig()
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config: expected a CalibrationConfig, got {type(config).__name__}")
    costs = model.exit_costs(input_shape)  # cheap, and fails before the data pass
    outputs = collect_outputs(model, loader, progress=progress)
    report = calibrate_thresholds(outputs, costs, config, names=exit_names(model))
    model.set_thresholds_(report.thresholds, config.confidence)
    model.set_exit_rates_(report.exit_rates)
    log.info("calibrated thresholds %s: %s", report.thresholds, report.summary())
    return report
