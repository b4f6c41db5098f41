"""What early-exit networks and cascades share: confidence measures, thresholds, the two
forward modes (every exit's logits for training, early exiting for inference).

Confidence of logits ``z`` over ``K`` classes (both in ``[0, 1]``):

* ``max-softmax``: :math:`\\max_k \\mathrm{softmax}(z)_k`;
* ``entropy``: :math:`1 - H(\\mathrm{softmax}(z)) / \\log K` (Teerapittayanon et al. 2016 use
  the entropy itself; normalising it puts both measures on the same scale).

A sample leaves exit ``i`` when ``confidence >= thresholds[i]``; a threshold of ``1.0`` closes
the exit (its head, or cascade stage, is not run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

__all__ = [
    "CONFIDENCES",
    "ConditionalModel",
    "ExitPrediction",
    "check_thresholds",
    "confidence",
]

CONFIDENCES = ("max-softmax", "entropy")


def confidence(logits: torch.Tensor, kind: str = "max-softmax") -> torch.Tensor:
    """Per-sample confidence in ``[0, 1]`` of ``(B, K)`` logits: ``(B,)`` (see module docstring)."""
    if kind not in CONFIDENCES:
        raise ConfigError(f"confidence={kind!r}: must be one of {CONFIDENCES}")
    logp = F.log_softmax(logits.float(), dim=1)  # (B, K)
    if kind == "max-softmax":
        return logp.max(dim=1).values.exp()
    k = logits.shape[1]
    if k < 2:
        return torch.ones(logits.shape[0], device=logits.device)
    entropy = -(logp.exp() * logp).sum(dim=1)  # (B,)
    return (1.0 - entropy / math.log(k)).clamp(0.0, 1.0)


def check_thresholds(thresholds: Sequence[float], n: int | None = None) -> tuple[float, ...]:
    """Validate thresholds (each in [0, 1]; ``n`` of them if given) and return them as floats."""
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ConfigError(f"thresholds={thresholds!r}: must be a list of numbers") from None
    if n is not None and len(values) != n:
        raise ConfigError(f"thresholds={list(values)}: need exactly {n} (one per exit)")
    for i, t in enumerate(values):
        if not 0.0 <= t <= 1.0:  # also rejects NaN
            raise ConfigError(f"thresholds[{i}]={t!r}: must be in [0, 1] (1.0 closes the exit)")
    return values


class ExitPrediction(NamedTuple):
    """What :meth:`EarlyExitNet.predict` returns.

    ``logits``: ``(B, K)``, each sample's logits from the exit it left at; ``exit_index``:
    ``(B,)`` int64, that exit (``0 .. E-1`` for the heads, ``E`` for the backbone's output).
    """

    logits: torch.Tensor
    exit_index: torch.Tensor


class ConditionalModel(nn.Module):
    """What early-exit networks and cascades share: per-exit thresholds, the confidence
    measure, recorded exit rates, and the two forward modes.

    Subclasses implement :meth:`forward_all` (every exit's logits on the whole batch, the final
    one last), :meth:`predict` (early-exit inference) and :meth:`exit_costs`.
    """

    def _init_exits(
        self,
        num_exits: int,
        thresholds: Sequence[float] | None,
        confidence: str,
        exit_rates: Sequence[float] | None,
    ) -> None:
        self._num_exits = num_exits
        self.thresholds = check_thresholds(
            thresholds if thresholds is not None else [1.0] * num_exits, num_exits
        )
        if confidence not in CONFIDENCES:
            raise ConfigError(f"confidence={confidence!r}: must be one of {CONFIDENCES}")
        self.confidence = confidence
        self.exit_rates: tuple[float, ...] | None = None
        if exit_rates is not None:
            self.set_exit_rates_(exit_rates)

    @property
    def num_exits(self) -> int:
        """Number of early exits (the final output is exit ``num_exits``)."""
        return self._num_exits

    def set_thresholds_(
        self, thresholds: Sequence[float], confidence: str | None = None
    ) -> ConditionalModel:
        """Set the per-exit thresholds (and optionally the confidence measure) in place."""
        self.thresholds = check_thresholds(thresholds, self.num_exits)
        if confidence is not None:
            if confidence not in CONFIDENCES:
                raise ConfigError(f"confidence={confidence!r}: must be one of {CONFIDENCES}")
            self.confidence = confidence
        return self

    def set_exit_rates_(self, rates: Sequence[float] | None) -> ConditionalModel:
        """Record the fraction of samples leaving at each exit and at the end (``E + 1``
        values summing to 1), or clear them with ``None``."""
        if rates is None:
            self.exit_rates = None
            return self
        values = tuple(float(r) for r in rates)
        if len(values) != self.num_exits + 1 or any(not 0 <= r <= 1 for r in values):
            raise ConfigError(
                f"exit_rates={list(values)}: need {self.num_exits + 1} fractions in [0, 1]"
            )
        if abs(sum(values) - 1.0) > 1e-6:
            raise ConfigError(f"exit_rates={list(values)}: must sum to 1 (got {sum(values)})")
        self.exit_rates = values
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.training:
            return self.forward_all(x)
        return self.predict(x).logits

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> ExitPrediction:
        raise NotImplementedError

    def exit_costs(self, input_shape: Sequence[int]):
        raise NotImplementedError

    def expected_macs(
        self, input_shape: Sequence[int], rates: Sequence[float] | None = None
    ) -> float | None:
        """Average MACs per sample, ``sum_i rates[i] * cost_i`` (:class:`ExitCosts`), with the
        recorded :attr:`exit_rates` by default; ``None`` when there are none."""
        rates = rates if rates is not None else self.exit_rates
        if rates is None:
            return None
        return self.exit_costs(input_shape).expected(rates, self.thresholds)
