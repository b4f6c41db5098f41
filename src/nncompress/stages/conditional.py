"""Recipe stage ``early_exit``: attach exit heads, train them, calibrate their thresholds.

Registered in :data:`nncompress.stages.registry.STAGES` as ``"early_exit"``; the
``nncompress early-exit`` command runs the same code. Recipe example::

    - {stage: early_exit, after: [layer1, layer2], head: conv-pool-linear,
       epochs: 4, lr_scale: 0.5, mode: heads, distill: true, max_loss: 0.5}

The :class:`~nncompress.conditional.ExitConfig` fields (``after``, ``head``, ``head_channels``,
``head_stride``, ``confidence``) place the exits; ``epochs`` / ``lr_scale`` / ``augment`` train
them (``mode: heads`` on the frozen model, ``joint`` BranchyNet-style with ``weights``), each
early exit distilled from the final exit (``distill``, ``temperature``, ``alpha``) besides the
labels; ``max_loss``, ``method`` and ``grid`` calibrate the thresholds on the held-out split
(:class:`~nncompress.conditional.CalibrationConfig`). The model becomes an
:class:`~nncompress.conditional.EarlyExitNet`, which later stages and checkpoints keep.

Cascades combine two checkpoints, so they have a CLI command (``nncompress cascade``) and no
recipe stage (a recipe compresses one model).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..conditional import (
    CalibrationConfig,
    EarlyExitNet,
    ExitConfig,
    ExitReport,
    ExitTrainConfig,
    attach_exits_,
    calibrate_,
    train_exits,
)
from ..core.errors import ConfigError
from ..core.progress import Progress
from ..data import DataSplits
from ..distill import DistillConfig, kd_loss
from ..engine.config import TrainConfig
from ..engine.train import History
from .base import RetrainKeys, RetrainSpec, StageConfig, StageContext, stage_config

__all__ = ["EarlyExitStageConfig", "attach_train_calibrate", "run_early_exit_stage"]

log = logging.getLogger(__name__)


def _retrain_spec(values: dict[str, Any]) -> RetrainSpec:
    """``distill: true`` with ``temperature`` and ``alpha`` (distillation from the final exit)."""
    if not isinstance(values["distill"], bool):
        raise ConfigError(f"distill={values['distill']!r}: must be true or false")
    kd = DistillConfig(values["temperature"], values["alpha"]) if values["distill"] else None
    return RetrainSpec(
        epochs=values["epochs"],
        lr_scale=values["lr_scale"],
        distill=kd,
        augment=values["augment"],
    )


@stage_config(
    ExitConfig,
    keys=("after", "head", "head_channels", "head_stride", "confidence"),
    retrain=RetrainKeys(
        {
            "epochs": 4,
            "lr_scale": 0.5,
            "augment": None,
            "distill": True,
            "temperature": 4.0,
            "alpha": 0.5,
        },
        build=_retrain_spec,
    ),
)
class EarlyExitStageConfig(StageConfig):
    """The ``early_exit`` stage (see the module docstring).

    Attributes
    ----------
    after, head, head_channels, head_stride, confidence : the
        :class:`~nncompress.conditional.ExitConfig`.
    epochs, lr_scale, augment, distill, temperature, alpha : training of the exits (epochs at
        ``lr_scale`` times the recipe's learning rate; distillation from the final exit).
    mode, weights : :class:`~nncompress.conditional.ExitTrainConfig` (``heads`` or ``joint``;
        loss weight per exit and the final output).
    max_loss, method, grid : :class:`~nncompress.conditional.CalibrationConfig` (accuracy loss
        in points on the held-out split; ``exact`` or ``greedy``).
    """

    mode: str = "heads"
    weights: tuple[float, ...] | None = None
    max_loss: float = 0.5
    method: str = "exact"
    grid: int | None = None

    def _check_options(self) -> None:
        train = ExitTrainConfig(mode=self.mode, weights=self.weights)  # validates
        object.__setattr__(self, "weights", train.weights)
        CalibrationConfig(max_loss=self.max_loss, method=self.method, grid=self.grid)

    @property
    def training(self) -> ExitTrainConfig:
        return ExitTrainConfig(mode=self.mode, weights=self.weights)

    @property
    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(
            max_loss=self.max_loss,
            method=self.method,
            confidence=self.confidence,
            grid=self.grid,
        )


def attach_train_calibrate(
    model,
    splits: DataSplits,
    config: EarlyExitStageConfig,
    train_config: TrainConfig,
    *,
    progress: Progress | None = None,
) -> tuple[EarlyExitNet, History | None, ExitReport]:
    """Attach exits to ``model`` (used in place as the backbone), train them and calibrate the
    thresholds on the held-out split: ``(net, training history, held-out report)``."""
    net = attach_exits_(model, config.algorithm, input_shape=splits.input_shape)
    history = None
    if config.retrain.epochs:
        spec = config.retrain
        cfg = spec.train_config(train_config)
        cfg = cfg.replace(lr=cfg.lr * spec.lr_scale)
        kd = None
        if spec.distill is not None:
            kd = functools.partial(
                kd_loss, temperature=spec.distill.temperature, alpha=spec.distill.alpha
            )
        loader = splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment)
        history = train_exits(
            net,
            loader,
            cfg,
            config.training,
            kd=kd,
            val_loader=splits.loader("val", 512),
            progress=progress,
        )
    report = calibrate_(
        net,
        splits.loader("val", 512),
        config.calibration,
        input_shape=splits.input_shape,
        progress=progress,
    )
    return net, history, report


def run_early_exit_stage(ctx: StageContext, config: EarlyExitStageConfig) -> dict[str, Any]:
    """Replace ``ctx.model`` by an early-exit network around it (trained and calibrated)."""
    if isinstance(ctx.model, EarlyExitNet):
        raise ConfigError("stage early_exit: the model already has exits (one such stage only)")
    net, history, report = attach_train_calibrate(
        ctx.model, ctx.splits, config, ctx.train_config, progress=ctx.progress
    )
    ctx.model = net
    log.info("early_exit: %s", report.summary())
    out = {"held_out": report.to_dict(), "summary": report.summary()}
    if history is not None:
        out["train_wall_time_s"] = history.wall_time_s
        out["train_loss"] = history.last.get("train_loss")
    return out
