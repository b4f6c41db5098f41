"""Recipe stage ``decompose``: low-rank factorisation of layers, then fine-tuning.

Registered in :data:`nncompress.recipe.STAGES` as ``"decompose"`` ->
``("nncompress.stages.decompose", "DecomposeStageConfig", "run_decompose_stage")``. The
``nncompress decompose`` command runs the same code.

Recipe example::

    - {stage: decompose, method: tucker2, vbmf: true, layers: ["layer*.conv*"],
       refit_batches: 16, finetune_epochs: 3, lr_scale: 0.1, distill: true}
    - {stage: decompose, method: svd, params_budget: 0.25, layers: [fc1, fc2]}

Every :class:`~nncompress.lowrank.DecomposeConfig` field may be given directly; ``layers``
(names or fnmatch patterns) restricts the layers; ``refit_batches`` calibration batches of
training images (no augmentation) refit the last factors of each decomposed block to the
original layer's response (:func:`~nncompress.lowrank.refit_`, 0 turns it off);
``finetune_epochs`` retrains the whole decomposed model at ``lr_scale`` times the recipe's
learning rate, by distillation from the model as it was before this stage (Hinton soft
targets, ``temperature``, ``alpha``) when ``distill`` is true, else with plain cross-entropy.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..core.progress import Progress
from ..data import DataSplits
from ..engine.config import TrainConfig
from ..engine.train import finetune
from ..lowrank.refit import refit_
from ..lowrank.transform import DecomposeConfig, DecomposeReport, decompose_
from .base import StageContext

__all__ = [
    "DecomposeStageConfig",
    "decompose_and_finetune",
    "run_decompose_stage",
]

log = logging.getLogger(__name__)

_STAGE_KEYS = (
    "layers",
    "refit_batches",
    "finetune_epochs",
    "lr_scale",
    "distill",
    "temperature",
    "alpha",
)


@dataclass(frozen=True)
class DecomposeStageConfig:
    """The ``decompose`` stage: a :class:`DecomposeConfig` plus layer selection and retraining.

    Attributes
    ----------
    decompose : the method and rank rule.
    layers : layer names or fnmatch patterns to consider (``None``: all the method supports).
    refit_batches : batches of training images for the data-aware refit of each decomposed
        block's last factors (:func:`~nncompress.lowrank.refit_`; 0: keep the weight-space
        factors).
    finetune_epochs : epochs of fine-tuning after decomposition (0: none).
    lr_scale : learning rate of the fine-tuning relative to the recipe's (default 1/10).
    distill : fine-tune by distillation from the pre-decomposition model.
    temperature, alpha : distillation temperature and soft-target weight (Hinton 2015).
    """

    decompose: DecomposeConfig
    layers: tuple[str, ...] | None = None
    refit_batches: int = 16
    finetune_epochs: int = 0
    lr_scale: float = 0.1
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.decompose, DecomposeConfig):
            raise ConfigError(f"decompose={self.decompose!r}: must be a DecomposeConfig")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(x, str) for x in self.layers):
                raise ConfigError(f"layers={self.layers!r}: must be a list of names or patterns")
            object.__setattr__(self, "layers", tuple(self.layers))
        if (
            not isinstance(self.refit_batches, int)
            or isinstance(self.refit_batches, bool)
            or self.refit_batches < 0
        ):
            raise ConfigError(f"refit_batches={self.refit_batches!r}: must be an integer >= 0")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs={self.finetune_epochs!r}: must be an integer >= 0")
        if not isinstance(self.lr_scale, int | float) or not self.lr_scale > 0:
            raise ConfigError(f"lr_scale={self.lr_scale!r}: must be a number > 0")
        if not isinstance(self.distill, bool):
            raise ConfigError(f"distill={self.distill!r}: must be true or false")
        if self.distill:  # validate the distillation settings now, not after decomposing
            from ..distill import DistillConfig

            DistillConfig(temperature=self.temperature, alpha=self.alpha)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposeStageConfig:
        data = dict(data)
        stage = {k: data.pop(k) for k in _STAGE_KEYS if k in data}
        return cls(decompose=DecomposeConfig.from_dict(data), **stage)

    def to_dict(self) -> dict[str, Any]:
        out = self.decompose.to_dict()
        for f in dataclasses.fields(self):
            if f.name != "decompose":
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def decompose_and_finetune(
    model: nn.Module,
    splits: DataSplits,
    config: DecomposeStageConfig,
    train_config: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
) -> tuple[DecomposeReport, dict[str, Any]]:
    """Decompose ``model`` in place, then fine-tune it; ``(report, fine-tuning fields)``.

    The refit (``config.refit_batches``) matches the responses of a copy of ``model`` taken
    before decomposition; the teacher for distillation is ``teacher`` if given, else that copy.
    """
    original = None
    if config.refit_batches or (config.finetune_epochs and config.distill and teacher is None):
        original = copy.deepcopy(model).eval()
    if teacher is None:
        teacher = original
    report = decompose_(
        model,
        config.decompose,
        filter=config.layers,
        input_shape=splits.input_shape,
        progress=progress,
    )
    info: dict[str, Any] = {"finetune_epochs": config.finetune_epochs}
    if config.refit_batches and report.decomposed:
        calib = splits.loader("train", train_config.batch_size, seed=train_config.seed)
        refit = refit_(
            model,
            original,
            calib,
            report.decomposed,
            batches=config.refit_batches,
            progress=progress,
        )
        info["refit"] = [x.to_dict() for x in refit]
    if config.finetune_epochs and report.decomposed:
        cfg = train_config.replace(epochs=config.finetune_epochs)
        loss_fn = None
        if config.distill:
            from ..distill import DistillConfig, distillation_loss

            for p in teacher.parameters():
                p.requires_grad_(False)
            loss_fn = distillation_loss(
                teacher, DistillConfig(temperature=config.temperature, alpha=config.alpha)
            )
        history = finetune(
            model,
            splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment),
            cfg,
            lr_scale=config.lr_scale,
            loss_fn=loss_fn,
            val_loader=splits.loader("val", 512),
            progress=progress,
        )
        info.update(
            finetune_loss="distillation" if config.distill else "cross-entropy",
            finetune_lr=cfg.lr * config.lr_scale,
            val_accuracy=history.last.get("val_accuracy"),
            finetune_wall_time_s=history.wall_time_s,
        )
    return report, info


def run_decompose_stage(ctx: StageContext, config: DecomposeStageConfig) -> dict[str, Any]:
    """Decompose ``ctx.model`` (teacher: ``ctx.teacher`` or the model before this stage)."""
    report, info = decompose_and_finetune(
        ctx.model,
        ctx.splits,
        config,
        ctx.train_config,
        teacher=ctx.teacher,
        progress=ctx.progress,
    )
    layers = {
        x.name: {"status": x.status, "rank": x.rank, "reason": x.reason} for x in report.layers
    }
    log.info("decompose: %d layers decomposed", len(report.decomposed))
    return {
        "method": config.decompose.method,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "layers": layers,
        **info,
    }
