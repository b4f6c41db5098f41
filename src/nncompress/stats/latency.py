"""Latency measured over real inputs, one sample at a time (batch 1), in their given order.

:func:`~nncompress.stats.measure_latency` times one random batch repeatedly, which is right for
a model whose cost does not depend on its input. A conditional model (early exits, cascades)
spends a different amount of work on every sample, so its latency must be measured over the
data it will see: :func:`measure_latency_over` runs every sample of a split at batch 1 in its
natural order, several times, and reports the median over those runs of the mean time per
sample.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..core.modules import model_device

__all__ = ["DataLatency", "measure_latency_over"]


@dataclass(frozen=True)
class DataLatency:
    """Result of :func:`measure_latency_over`.

    Attributes
    ----------
    ms_per_sample : median over the runs of (run wall time / samples), in milliseconds.
    runs_ms_per_sample : every run's mean time per sample.
    samples : samples per run.
    """

    ms_per_sample: float
    runs_ms_per_sample: tuple[float, ...]
    samples: int

    def to_dict(self) -> dict:
        return {
            "ms_per_sample": self.ms_per_sample,
            "runs_ms_per_sample": list(self.runs_ms_per_sample),
            "samples": self.samples,
        }


def measure_latency_over(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    repeats: int = 3,
    warmup: int = 20,
) -> DataLatency:
    """Time ``model`` at batch 1 over every sample of ``inputs`` (``(N, ...)``), in order.

    Each of ``repeats`` runs calls ``model(inputs[i:i+1])`` for ``i = 0 .. N-1`` under
    ``torch.inference_mode`` in eval mode; the first ``warmup`` samples are run once before
    timing. The training flag is restored afterwards.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: need repeats >= 1, warmup >= 0")
    if inputs.dim() < 2 or len(inputs) == 0:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)}: need (N, ...) with N >= 1 samples"
        )
    x = inputs.to(model_device(model))
    n = len(x)
    was_training = model.training
    model.eval()
    runs: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(min(warmup, n)):
                model(x[i : i + 1])
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(n):
                    model(x[i : i + 1])
                runs.append(1000.0 * (time.perf_counter() - t0) / n)
    finally:
        model.train(was_training)
    return DataLatency(statistics.median(runs), tuple(runs), n)
