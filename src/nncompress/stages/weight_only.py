"""Recipe stage ``weight_only``: weight-only low-bit quantization (RTN or GPTQ, Frantar et al.
2023) of Linear / Conv1D / Embedding layers, no fx tracing.

Registered in :data:`nncompress.stages.registry.STAGES` as ``"weight_only"``. Recipe example::

    - {stage: weight_only, bits: 4, group_size: 64, method: gptq, calibration: 512}
    - {stage: encode, dense_dtype: fp16}

The calibration batches are the first ``calibration`` training samples, without augmentation
(labels unused). The ``encode`` stage stores each quantized weight with the ``affine`` scheme
(its codes, float16 scales and zero points). A resumed recipe cannot rebuild the codes from a
checkpoint's folded float weights: this stage then runs again instead of being skipped.
"""

from __future__ import annotations

from typing import Any

from ..core.validate import check, is_int
from ..quant.weight_only import WeightOnlyConfig, quantize_weights_
from .base import StageConfig, StageContext, stage_config

__all__ = ["WeightOnlyStageConfig", "run_weight_only_stage"]


@stage_config(WeightOnlyConfig)
class WeightOnlyStageConfig(StageConfig):
    """The :class:`~nncompress.quant.WeightOnlyConfig` fields plus ``calibration`` (training
    samples used, >= 1) and ``batch_size``."""

    calibration: int = 512
    batch_size: int = 64

    def _check_options(self) -> None:
        for name in ("calibration", "batch_size"):
            v = getattr(self, name)
            check(is_int(v) and v >= 1, name, v, "must be an integer >= 1")


def run_weight_only_stage(ctx: StageContext, config: WeightOnlyStageConfig) -> dict[str, Any]:
    loader = ctx.splits.loader("train", config.batch_size, limit=config.calibration)
    report = quantize_weights_(ctx.model, config.algorithm, loader, progress=ctx.progress)
    return report.to_dict()
