"""Per-exit reports: where samples left, how accurate they were there, and what they cost.

:func:`evaluate_exits` runs an early-exit network or a cascade the way it is deployed
(:meth:`predict`, samples leaving early) over a loader and returns an :class:`ExitReport`;
calibration returns the same report for the held-out split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.modules import model_device
from ..core.progress import Progress, progress_task
from ..stats import format_table
from .cost import ExitCosts

__all__ = ["ExitReport", "evaluate_exits"]


@dataclass(frozen=True)
class ExitReport:
    """Exit histogram, per-exit accuracy and expected MACs over ``samples`` samples.

    Attributes
    ----------
    names : ``E + 1`` exit names (exit points or cascade stages, ``"final"`` last).
    thresholds, confidence : the rule that was applied.
    counts, correct : per exit, samples that left there and how many of them were right.
    costs : per exit, MACs of one sample leaving there (:meth:`ExitCosts.leave_costs`).
    full_macs : MACs of the model without exits (the backbone, or the last cascade stage).
    reference_accuracy : accuracy (%) of the full model on the same samples, if measured.
    max_loss : the accuracy-loss bound of a calibration (``None`` for an evaluation).
    """

    names: tuple[str, ...]
    thresholds: tuple[float, ...]
    confidence: str
    counts: tuple[int, ...]
    correct: tuple[int, ...]
    costs: tuple[int, ...]
    full_macs: int
    reference_accuracy: float | None = None
    max_loss: float | None = None
    method: str | None = None

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def exit_rates(self) -> tuple[float, ...]:
        n = max(1, self.samples)
        return tuple(c / n for c in self.counts)

    @property
    def exit_accuracy(self) -> tuple[float | None, ...]:
        """Accuracy (%) of the samples that left at each exit (``None`` where none did)."""
        pairs = zip(self.correct, self.counts, strict=True)
        return tuple(100.0 * k / c if c else None for k, c in pairs)

    @property
    def accuracy(self) -> float:
        return 100.0 * sum(self.correct) / max(1, self.samples)

    @property
    def expected_macs(self) -> float:
        return float(sum(r * c for r, c in zip(self.exit_rates, self.costs, strict=True)))

    @property
    def macs_ratio(self) -> float:
        """Expected MACs over the full model's MACs (below 1: the exits save work)."""
        return self.expected_macs / self.full_macs if self.full_macs else float("nan")

    @property
    def saves(self) -> bool:
        """Whether the exits cost less on average than the model without them."""
        return self.expected_macs < self.full_macs

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "thresholds": list(self.thresholds),
            "confidence": self.confidence,
            "samples": self.samples,
            "counts": list(self.counts),
            "exit_rates": list(self.exit_rates),
            "exit_accuracy": list(self.exit_accuracy),
            "costs": list(self.costs),
            "accuracy": self.accuracy,
            "reference_accuracy": self.reference_accuracy,
            "accuracy_loss": (
                self.reference_accuracy - self.accuracy
                if self.reference_accuracy is not None
                else None
            ),
            "expected_macs": self.expected_macs,
            "full_macs": self.full_macs,
            "macs_ratio": self.macs_ratio,
            "saves": self.saves,
            "max_loss": self.max_loss,
            "method": self.method,
        }

    def rows(self) -> tuple[list[str], list[list]]:
        """``(headers, rows)`` of the per-exit table, with a total row."""
        rows: list[list] = []
        for name, t, count, rate, acc, cost in zip(
            self.names,
            [*self.thresholds, None],
            self.counts,
            self.exit_rates,
            self.exit_accuracy,
            self.costs,
            strict=True,
        ):
            rows.append(
                [
                    name,
                    "-" if t is None else ("closed" if t >= 1.0 else f"{t:.4f}"),
                    count,
                    f"{100 * rate:.1f}",
                    "-" if acc is None else f"{acc:.2f}",
                    cost,
                ]
            )
        rows.append(
            [
                "expected",
                self.confidence,
                self.samples,
                "100.0",
                f"{self.accuracy:.2f}",
                round(self.expected_macs),
            ]
        )
        return ["exit", "threshold", "samples", "rate %", "accuracy %", "MACs"], rows

    def table(self) -> str:
        """The per-exit table (Markdown), with the expected (average) row last."""
        return format_table(*self.rows())

    def summary(self) -> str:
        """One line; says so when the exits cost more than they save."""
        ref = (
            f", {self.reference_accuracy - self.accuracy:+.2f} points lost vs "
            f"{self.reference_accuracy:.2f}"
            if self.reference_accuracy is not None
            else ""
        )
        verdict = "" if self.saves else " -- the exits cost more than they save"
        return (
            f"accuracy {self.accuracy:.2f}%{ref}; expected MACs {self.expected_macs:,.0f} = "
            f"{self.macs_ratio:.3f}x the full model's {self.full_macs:,}{verdict}"
        )


def exit_names(model: nn.Module) -> tuple[str, ...]:
    """Names of a conditional model's exits, ``"final"`` last."""
    if hasattr(model, "after"):
        return (*model.after, "final")
    return (*(f"stage{i}" for i in range(model.num_exits)), "final")


@torch.no_grad()
def evaluate_exits(
    model: nn.Module,
    loader: Iterable,
    *,
    input_shape: Sequence[int],
    reference: bool = True,
    costs: ExitCosts | None = None,
    progress: Progress | None = None,
) -> ExitReport:
    """Run ``model`` (an early-exit network or a cascade) as deployed over ``loader``.

    With ``reference=True`` the full model's accuracy on the same samples is measured too
    (one more pass through every branch).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    e = model.num_exits
    counts, correct = [0] * (e + 1), [0] * (e + 1)
    ref_correct = 0
    n = len(loader) if hasattr(loader, "__len__") else None
    try:
        with progress_task(progress, "evaluate exits", n) as task:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits, where = model.predict(x)
                right = logits.argmax(1) == y  # (B,)
                for i in range(e + 1):
                    mask = where == i
                    counts[i] += int(mask.sum())
                    correct[i] += int((right & mask).sum())
                if reference:
                    ref_correct += int((model.forward_all(x)[-1].argmax(1) == y).sum())
                task.advance()
    finally:
        model.train(was_training)
    total = sum(counts)
    if total == 0:
        raise ValueError("evaluate_exits: the loader yielded no samples")
    costs = costs or model.exit_costs(input_shape)
    return ExitReport(
        names=exit_names(model),
        thresholds=tuple(model.thresholds),
        confidence=model.confidence,
        counts=tuple(counts),
        correct=tuple(correct),
        costs=costs.leave_costs([t < 1.0 for t in model.thresholds]),
        full_macs=costs.final,
        reference_accuracy=100.0 * ref_correct / total if reference else None,
    )
