"""Recipe stage ``share``: trained quantization by k-means weight sharing (Deep Compression)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.select import LayerSelector
from ..quant.kmeans import KMeansConfig, share_from_values_, share_weights_
from .base import StageConfig, StageContext, stage_config

__all__ = ["ShareStageConfig", "run_share_stage"]


@stage_config(KMeansConfig)
class ShareStageConfig(StageConfig):
    """The :class:`~nncompress.quant.KMeansConfig` fields plus ``exclude``: module names
    (fnmatch patterns) left unshared. No retraining: the ``finetune`` stage after it trains
    the centroids."""

    exclude: tuple[str, ...] = ()

    def _check_options(self) -> None:
        object.__setattr__(self, "exclude", LayerSelector(exclude=self.exclude).exclude)

    def resume_(self, model: nn.Module) -> None:
        """A shared checkpoint's layers take few distinct values: make them codebooks again."""
        share_from_values_(model)


def run_share_stage(ctx: StageContext, config: ShareStageConfig) -> dict[str, Any]:
    select = LayerSelector(exclude=config.exclude)
    report = share_weights_(ctx.model, config.algorithm, filter=select, progress=ctx.progress)
    return report.to_dict()
