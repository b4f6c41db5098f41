"""Recipe stage ``ecsq``: entropy-constrained weight sharing (quant/ecsq.py), lambda chosen on
the held-out split.

Recipe example (after ``prune``; then ``finetune`` the centroids and ``encode`` with
``codec: context``)::

    - {stage: ecsq, bits_fc: 5, bits_conv: 6, prune: true,
       lams: [1.0e-8, 3.0e-8, 1.0e-7, 3.0e-7], max_val_drop: 0.5}

With ``lams`` every candidate lambda quantizes a copy of the model (Fisher importance from
``fisher_batches`` held-out batches); the stage keeps the candidate whose context-coded file
(fp16 codebooks and dense tensors, as the stage can only estimate the final encoder) is the
smallest among those whose held-out accuracy, before any fine-tuning, is at most
``max_val_drop`` points below the model's as it entered the stage (the largest-accuracy one
if none is). Without ``lams`` it applies ``lam``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..core.modules import folded_copy
from ..core.select import LayerSelector
from ..engine.train import evaluate
from ..quant.ecsq import ECSQConfig, ecsq_share_, fisher_importance
from ..quant.kmeans import share_from_values_
from .base import StageConfig, StageContext, stage_config

__all__ = ["ECSQStageConfig", "run_ecsq_stage"]


@stage_config(ECSQConfig)
class ECSQStageConfig(StageConfig):
    """:class:`~nncompress.quant.ecsq.ECSQConfig` plus the held-out choice of lambda (``lams``,
    ``max_val_drop``), ``fisher_batches`` and ``exclude`` (module-name patterns left alone).
    No retraining: the ``finetune`` stage after it trains the centroids."""

    lams: tuple[float, ...] = ()
    max_val_drop: float = 0.5
    fisher_batches: int = 16
    exclude: tuple[str, ...] = ()

    def _check_options(self) -> None:
        object.__setattr__(self, "exclude", LayerSelector(exclude=self.exclude).exclude)
        if not isinstance(self.lams, list | tuple):
            raise ConfigError(f"lams={self.lams!r}: must be a list of numbers >= 0")
        object.__setattr__(self, "lams", tuple(self.lams))
        for v in self.lams:
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ConfigError(f"lams: {v!r} must be a finite number >= 0")
        d = self.max_val_drop
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d <= 100:
            raise ConfigError(f"max_val_drop={d!r}: must be a number of points in [0, 100]")
        b = self.fisher_batches
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"fisher_batches={b!r}: must be an integer >= 1")

    def resume_(self, model: nn.Module) -> None:
        """A shared checkpoint's layers take few distinct values: make them codebooks again."""
        share_from_values_(model)


def _coded_bytes(model) -> int:
    from ..io import EncodeConfig, encode_state_dict

    cfg = EncodeConfig(codec="context", codebook_dtype="fp16", dense_dtype="fp16")
    return len(encode_state_dict(folded_copy(model), cfg)[0])


def run_ecsq_stage(ctx: StageContext, config: ECSQStageConfig) -> dict[str, Any]:
    select = LayerSelector(exclude=config.exclude)
    algorithm: ECSQConfig = config.algorithm
    val = ctx.splits.loader("val", 512)
    before = evaluate(ctx.model, val)["accuracy"]
    importance = None
    if algorithm.importance == "fisher":
        importance = fisher_importance(
            ctx.model, ctx.splits.loader("val", 256), batches=config.fisher_batches
        )
    candidates = []
    for lam in config.lams or (algorithm.lam,):
        model = copy.deepcopy(ctx.model)
        rep = ecsq_share_(
            model, dataclasses.replace(algorithm, lam=lam), importance=importance, filter=select
        )
        acc = evaluate(model, val)["accuracy"]
        size = _coded_bytes(model) if len(config.lams) > 1 else None
        candidates.append({"lam": lam, "val_accuracy": acc, "bytes": size, "model": model,
                           "report": rep.to_dict()})  # fmt: skip
    ok = [c for c in candidates if c["val_accuracy"] >= before - config.max_val_drop]
    if len(candidates) == 1:
        chosen = candidates[0]
    elif ok:
        chosen = min(ok, key=lambda c: (c["bytes"], -c["val_accuracy"]))
    else:
        chosen = max(candidates, key=lambda c: c["val_accuracy"])
    ctx.model = chosen["model"]
    return {
        "val_accuracy_before": before,
        "lam": chosen["lam"],
        "val_accuracy": chosen["val_accuracy"],
        "candidates": [
            {k: v for k, v in c.items() if k not in ("model", "report")} for c in candidates
        ],  # fmt: skip
        **chosen["report"],
    }
