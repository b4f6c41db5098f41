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
import itertools
import logging
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.progress import Progress
from ..core.select import LayerSelector
from ..core.validate import check, is_int
from ..data import DataSplits
from ..distill import DistillConfig, distillation_loss
from ..engine.config import TrainConfig
from ..lowrank.refit import refit_
from ..lowrank.transform import DecomposeConfig, DecomposeReport, decompose_
from .base import RetrainKeys, RetrainSpec, StageConfig, StageContext, stage_config

__all__ = [
    "DecomposeStageConfig",
    "decompose_and_finetune",
    "run_decompose_stage",
]

log = logging.getLogger(__name__)


def _retrain_spec(values: dict[str, Any]) -> RetrainSpec:
    """``distill: true`` with ``temperature`` and ``alpha`` (this stage's spelling)."""
    if not isinstance(values["distill"], bool):
        raise ConfigError(f"distill={values['distill']!r}: must be true or false")
    kd = None
    if values["distill"]:  # validate the distillation settings now, not after decomposing
        kd = DistillConfig(temperature=values["temperature"], alpha=values["alpha"])
    return RetrainSpec(epochs=values["finetune_epochs"], lr_scale=values["lr_scale"], distill=kd)


@stage_config(
    DecomposeConfig,
    retrain=RetrainKeys(
        {"finetune_epochs": 0, "lr_scale": 0.1, "distill": True, "temperature": 4.0, "alpha": 0.9},
        epochs_key="finetune_epochs",
        build=_retrain_spec,
    ),
)
class DecomposeStageConfig(StageConfig):
    """The ``decompose`` stage: a :class:`DecomposeConfig` plus layer selection and retraining.

    Attributes
    ----------
    method, rank, energy, ... : the :class:`~nncompress.lowrank.DecomposeConfig` (method and
        rank rule).
    finetune_epochs, lr_scale, distill, temperature, alpha : the
        :class:`~nncompress.stages.base.RetrainSpec`: epochs of fine-tuning after
        decomposition (0: none) at ``lr_scale`` times the recipe's rate (default 1/10), by
        distillation from the pre-decomposition model (Hinton 2015 temperature and
        soft-target weight) when ``distill`` is true.
    layers : layer names or fnmatch patterns to consider (``None``: all the method supports,
        except the classifier when ``keep_classifier``).
    keep_classifier : with ``layers`` unset, leave the layer that produces the model's output
        whole (the last Linear/Conv2d run by a forward pass): its few parameters cost little
        and every class depends on them (a 10-way LeNet output layer at rank 4 cost 18 points
        before fine-tuning, issue 13).
    refit_batches : batches of training images for the data-aware refit of each decomposed
        block's last factors (:func:`~nncompress.lowrank.refit_`; 0: keep the weight-space
        factors); they also give the 'response' budget allocation its input statistics.
    """

    layers: tuple[str, ...] | None = None
    keep_classifier: bool = True
    refit_batches: int = 16

    def _check_options(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(x, str) for x in self.layers):
                raise ConfigError(f"layers={self.layers!r}: must be a list of names or patterns")
            object.__setattr__(self, "layers", tuple(self.layers))
        check(
            isinstance(self.keep_classifier, bool),
            "keep_classifier",
            self.keep_classifier,
            "must be true or false",
        )
        check(
            is_int(self.refit_batches) and self.refit_batches >= 0,
            "refit_batches",
            self.refit_batches,
            "must be an integer >= 0",
        )


def output_layer(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Name of the last Linear/Conv2d a forward pass runs (the classifier), or ``None``."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if name and isinstance(m, nn.Linear | nn.Conv2d)
    ]
    was_training = model.training
    model.eval()
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order[-1] if order else None


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
    kd = config.retrain.distill
    if config.refit_batches or (config.finetune_epochs and kd is not None and teacher is None):
        original = copy.deepcopy(model).eval()
    if teacher is None:
        teacher = original
    layers: Any = config.layers
    info: dict[str, Any] = {"finetune_epochs": config.finetune_epochs}
    if layers is None and config.keep_classifier:
        head = output_layer(model, splits.input_shape)
        if head is not None:
            layers = LayerSelector(exclude=(head,))
            info["classifier_kept"] = head
    calib = None
    if config.algorithm.is_budget:  # input statistics for the response allocation
        loader = splits.loader("train", train_config.batch_size, seed=train_config.seed)
        calib = [x for x, _ in itertools.islice(loader, max(config.refit_batches, 4))]
    report = decompose_(
        model,
        config.algorithm,
        filter=layers,
        input_shape=splits.input_shape,
        calibration=calib,
        progress=progress,
    )
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
        cfg = config.retrain.train_config(train_config)
        loss_fn = None
        if kd is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            loss_fn = distillation_loss(teacher, kd)
        history = config.retrain.run(
            model, splits, train_config, loss_fn=loss_fn, progress=progress
        )
        info.update(
            finetune_loss="distillation" if config.distill else "cross-entropy",
            finetune_lr=cfg.lr * config.lr_scale,
            val_accuracy=history.last.get("val_accuracy"),
            finetune_wall_time_s=history.wall_time_s,
        )
    return report, info


def run_decompose_stage(ctx: StageContext, config: DecomposeStageConfig) -> dict[str, Any]:
    """Decompose ``ctx.model`` (the distillation teacher is the model before this stage)."""
    report, info = decompose_and_finetune(
        ctx.model, ctx.splits, config, ctx.train_config, progress=ctx.progress
    )
    layers = {
        x.name: {"status": x.status, "rank": x.rank, "reason": x.reason} for x in report.layers
    }
    log.info("decompose: %d layers decomposed", len(report.decomposed))
    return {
        "method": config.method,
        "coverage": report.coverage.to_dict(),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "layers": layers,
        **info,
    }
