"""Recipe stage ``share``: trained quantization by k-means weight sharing (Deep Compression)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.select import LayerSelector
from ..quant.kmeans import KMeansConfig, share_weights_
from .base import StageContext

__all__ = ["ShareStageConfig", "run_share_stage"]


@dataclass(frozen=True)
class ShareStageConfig(KMeansConfig):
    """:class:`~nncompress.quant.KMeansConfig` plus ``exclude``: module names (fnmatch
    patterns) left unshared."""

    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "exclude", tuple(self.exclude))


def run_share_stage(ctx: StageContext, config: ShareStageConfig) -> dict[str, Any]:
    select = LayerSelector(exclude=config.exclude)
    report = share_weights_(ctx.model, config, filter=select, progress=ctx.progress)
    return report.to_dict()
