"""Recipe stage ``finetune``: retrain what is trainable at a reduced learning rate.

After ``share`` only the codebooks, biases and unshared parameters are trainable (the shared
weights' indices are fixed buffers), so this is Deep Compression's centroid fine-tuning; after
``prune`` it is Han 2015's retraining of the surviving connections.
"""

from __future__ import annotations

from typing import Any

from .base import StageContext, stage_config
from .train import TrainStageConfig, train_with

__all__ = ["FinetuneStageConfig", "run_finetune_stage"]


@stage_config()
class FinetuneStageConfig(TrainStageConfig):
    """Like ``train`` but the learning rate defaults to 1/10 of the base config's (Han 2015)."""

    lr_scale: float = 0.1


def run_finetune_stage(ctx: StageContext, config: FinetuneStageConfig) -> dict[str, Any]:
    return train_with(ctx, config.resolve(ctx.train_config))
