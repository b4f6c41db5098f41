"""Recipe stage ``soft_share``: soft weight-sharing (Ullrich, Meeds & Welling 2017,
quant/soft_sharing.py), then the snapped weights become shared weights.

Recipe example (from a trained baseline; then ``finetune`` the centroids and ``encode``)::

    - {stage: soft_share, components: 17, tau: 0.005, epochs: 10}

Parametrizations left by earlier stages (pruning masks) are folded into plain weights first:
the mixture prior decides which weights go to zero. After snapping, every Linear/Conv weight
takes at most ``components`` values and is turned into a shared weight
(:func:`~nncompress.quant.kmeans.share_from_values_`) so ``finetune`` trains its centroids.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.modules import folded_copy
from ..quant.kmeans import share_from_values_
from ..quant.soft_sharing import SoftShareConfig, soft_share_
from .base import StageConfig, StageContext, stage_config

__all__ = ["SoftShareStageConfig", "run_soft_share_stage"]


@stage_config(SoftShareConfig)
class SoftShareStageConfig(StageConfig):
    """:class:`~nncompress.quant.soft_sharing.SoftShareConfig` as a recipe stage (its own
    retraining loop; no other retraining keys)."""

    def resume_(self, model: nn.Module) -> None:
        """A snapped checkpoint's layers take few distinct values: make them codebooks again."""
        share_from_values_(model, max_values=self.components)


def run_soft_share_stage(ctx: StageContext, config: SoftShareStageConfig) -> dict[str, Any]:
    algorithm: SoftShareConfig = config.algorithm
    model = folded_copy(ctx.model)
    out = soft_share_(
        model,
        ctx.splits.loader("train", algorithm.batch_size, seed=algorithm.seed),
        algorithm,
        n_train=len(ctx.splits.train[1]),
        val_loader=ctx.splits.loader("val", 512),
        progress=ctx.progress,
    )
    out["shared_layers"] = share_from_values_(model, max_values=algorithm.components)
    ctx.model = model
    return out
