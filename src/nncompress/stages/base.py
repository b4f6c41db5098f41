"""What every recipe stage receives and returns.

A stage is a pair registered in :data:`nncompress.recipe.STAGES`: a frozen config dataclass
(validated in ``__post_init__``, built from the recipe's YAML mapping) and a function
``run(ctx: StageContext, config) -> dict`` that changes ``ctx.model`` in place or replaces it,
and returns the stage's report fields (accuracy, sizes, timings...). Stages live in this package,
one file per family, so ``prune/`` never imports ``quant/`` and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..core.progress import Progress
from ..data import DataSplits
from ..engine.config import TrainConfig

__all__ = ["StageContext"]


@dataclass
class StageContext:
    """State handed from stage to stage by the recipe runner.

    Attributes
    ----------
    model : the model being compressed (a stage may replace it).
    splits : the dataset (train / held-out val / test).
    model_name, model_kwargs : registry name and arguments of the base architecture (used to
        save checkpoints whose structure changed), or ``None`` for a custom model.
    teacher : a frozen copy of the uncompressed baseline, for distillation; may be ``None``.
    train_config : the recipe's base training configuration (lr, batch size, ...); fine-tuning
        stages scale its learning rate.
    out_dir : the run's output folder; stages write artifacts under it.
    artifacts : files produced so far, by kind (e.g. ``{"ncz": Path(...)}``).
    progress : progress callback for long loops (the CLI draws bars).
    """

    model: nn.Module
    splits: DataSplits
    model_name: str | None
    model_kwargs: dict
    train_config: TrainConfig
    out_dir: Path
    teacher: nn.Module | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    progress: Progress | None = None
