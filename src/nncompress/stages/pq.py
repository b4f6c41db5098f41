"""Recipe stage ``pq``: product quantization with an activation objective (Stock et al. 2020).

Registered in :data:`nncompress.stages.registry.STAGES` as ``"pq"``. Recipe example::

    - {stage: pq, k: 1024, bits_per_weight: 1.2, block_size_conv: 9, block_size_pw: 4,
       block_size_fc: 4, exclude: [conv1], calibration: 4096, layer_steps: 25,
       global_steps: 400}
    - {stage: encode, codec: ans, codebook_dtype: fp16, dense_dtype: fp16}

The stage quantizes bottom-up, distilling each layer's codewords from the model as it entered
the stage, then fine-tunes all codewords and refreshes BatchNorm (see
:func:`nncompress.quant.pq_quantize_`); its own fine-tuning replaces the shared retraining
spec. Calibration and fine-tuning batches come from the first ``calibration`` training images
(labels unused). The ``encode`` stage then stores each product-quantized layer with the
``pq`` scheme of the ``.ncz`` format.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.select import LayerSelector
from ..core.validate import check, is_int
from ..quant.pq_config import PQConfig
from ..quant.pq_transform import QUANTIZABLE, pq_from_values_, pq_quantize_
from .base import StageConfig, StageContext, stage_config

__all__ = ["PQStageConfig", "run_pq_stage"]


@stage_config(PQConfig)
class PQStageConfig(StageConfig):
    """The :class:`~nncompress.quant.PQConfig` fields plus where the data comes from.

    Attributes
    ----------
    exclude : module names (fnmatch patterns) left unquantized (stored densely).
    calibration : training images used for the activations and the fine-tuning (>= 1).
    batch_size : calibration batch size.
    augment : augment the calibration batches (None: as the recipe's training config).
    """

    exclude: tuple[str, ...] = ()
    calibration: int = 4096
    batch_size: int = 128
    augment: bool | None = None

    def _check_options(self) -> None:
        object.__setattr__(self, "exclude", LayerSelector(exclude=self.exclude).exclude)
        for name in ("calibration", "batch_size"):
            v = getattr(self, name)
            check(is_int(v) and v >= 1, name, v, "must be an integer >= 1")
        check(self.augment in (None, True, False), "augment", self.augment, "true/false/null")

    def resume_(self, model: nn.Module) -> None:
        """A quantized checkpoint's layers take few distinct subvectors: make them codebooks
        and assignments again (block sizes from this config)."""
        select = QUANTIZABLE & LayerSelector(exclude=self.exclude)
        blocks = {n: self.algorithm.block_size_for(n, m) for n, m in select.select(model).items()}
        fits = {n: d for n, d in blocks.items() if _divides(model.get_submodule(n), d)}
        pq_from_values_(model, fits)


def _divides(m: nn.Module, d: int) -> bool:
    return m.weight[0].numel() % d == 0


def run_pq_stage(ctx: StageContext, config: PQStageConfig) -> dict[str, Any]:
    augment = ctx.train_config.augment if config.augment is None else config.augment
    loader = ctx.splits.loader(
        "train", config.batch_size, seed=config.seed, augment=augment, limit=config.calibration
    )
    report = pq_quantize_(
        ctx.model,
        config.algorithm,
        loader,
        filter=LayerSelector(exclude=config.exclude),
        progress=ctx.progress,
    )
    return report.to_dict()
