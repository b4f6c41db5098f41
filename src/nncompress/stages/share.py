"""Recipe stage ``share``: trained quantization by k-means weight sharing (Deep Compression)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..core.select import LayerSelector
from ..core.validate import check
from ..quant.kmeans import KMeansConfig, share_from_values_, share_weights_
from .base import StageConfig, StageContext, stage_config

__all__ = ["ShareStageConfig", "run_share_stage"]


@stage_config(KMeansConfig)
class ShareStageConfig(StageConfig):
    """The :class:`~nncompress.quant.KMeansConfig` fields plus ``exclude``: module names
    (fnmatch patterns) left unshared, and ``allocate='policy'``: the per-layer bits of a
    searched policy (the last ``search`` stage's or ``policy_file``'s) override ``per_layer``
    for the layers it names. No retraining: the ``finetune`` stage after it trains the
    centroids."""

    exclude: tuple[str, ...] = ()
    allocate: str = "none"
    policy_file: str | None = None

    def _check_options(self) -> None:
        object.__setattr__(self, "exclude", LayerSelector(exclude=self.exclude).exclude)
        check(
            self.allocate in ("none", "policy"),
            "allocate",
            self.allocate,
            "must be 'none' or 'policy'",
        )
        if self.policy_file is not None:
            check(
                self.allocate == "policy" and isinstance(self.policy_file, str),
                "policy_file",
                self.policy_file,
                "a path, with allocate='policy'",
            )

    def resume_(self, model: nn.Module) -> None:
        """A shared checkpoint's layers take few distinct values: make them codebooks again."""
        share_from_values_(model)


def run_share_stage(ctx: StageContext, config: ShareStageConfig) -> dict[str, Any]:
    select = LayerSelector(exclude=config.exclude)
    kc = config.algorithm
    if config.allocate == "policy":
        from .search import stage_policy

        policy = stage_policy(ctx, config.policy_file, "share")
        kc = dataclasses.replace(kc, per_layer={**kc.per_layer, **policy.bits})
    report = share_weights_(ctx.model, kc, filter=select, progress=ctx.progress)
    return report.to_dict()
