"""Recipe stage ``filter_prune``: filter pruning with physical thinning (Li et al., ICLR 2017),
then retraining.

Registered in :data:`nncompress.recipe.STAGES` as ``"filter_prune"`` ->
``("nncompress.stages.filter_prune", "FilterPruneStageConfig", "run_filter_prune_stage")``.
The ``nncompress prune --method filter-l1|filter-l2|filter-random|filter-largest`` command
runs the same code.

Recipe example (Li et al.'s ResNet scheme: only the first conv of every residual block)::

    - {stage: filter_prune, criterion: l1, macs_budget: 0.72,
       exclude: ["conv1", "*.conv2", "*.shortcut.*"], epochs: 5, lr_scale: 0.2}

``epochs`` retraining epochs follow the pruning (0: no retraining) at ``lr_scale`` times the
recipe's base learning rate, with the base config's other settings (augmentation, schedule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..engine.config import TrainConfig
from ..engine.train import evaluate, finetune
from ..prune.structured import FilterPruneConfig, prune_filters_
from .base import StageContext

__all__ = ["FilterPruneStageConfig", "run_filter_prune_stage"]


@dataclass(frozen=True)
class FilterPruneStageConfig:
    """Configuration of the ``filter_prune`` stage.

    Attributes
    ----------
    criterion, ratio, per_layer, macs_budget, scope, min_channels, exclude, seed : as in
        :class:`~nncompress.prune.FilterPruneConfig` (exactly one of ratio / per_layer /
        macs_budget).
    epochs : retraining epochs after pruning (0: none).
    lr_scale : retraining learning rate = lr_scale * the base config's lr.
    augment : data augmentation while retraining (None: the base config's setting).
    """

    criterion: str = "l1"
    ratio: float | None = None
    per_layer: dict[str, float] | None = None
    macs_budget: float | None = None
    scope: str = "layer"
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    seed: int = 0
    epochs: int = 0
    lr_scale: float = 0.1
    augment: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "exclude",
            (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude),
        )
        self.prune_config()  # validates the pruning fields
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r}: must be an integer >= 0")
        if not (isinstance(self.lr_scale, (int, float)) and self.lr_scale > 0):
            raise ConfigError(f"lr_scale={self.lr_scale!r}: must be > 0")
        if self.augment is not None and not isinstance(self.augment, bool):
            raise ConfigError(f"augment={self.augment!r}: must be true, false or null")

    def prune_config(self) -> FilterPruneConfig:
        return FilterPruneConfig(
            criterion=self.criterion,
            ratio=self.ratio,
            per_layer=self.per_layer,
            macs_budget=self.macs_budget,
            scope=self.scope,
            min_channels=self.min_channels,
            exclude=self.exclude,
            seed=self.seed,
        )

    def retrain_config(self, base: TrainConfig) -> TrainConfig:
        changes: dict[str, Any] = {"epochs": self.epochs}
        if self.augment is not None:
            changes["augment"] = self.augment
        return base.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return d


def run_filter_prune_stage(ctx: StageContext, config: FilterPruneStageConfig) -> dict[str, Any]:
    """Prune filters of ``ctx.model`` (thinned in place), retrain, and report.

    Returns params and MACs before/after (total and per replaced layer), the ratio used, the
    test accuracy right after pruning and after retraining, and the held-out accuracy.
    """
    model, splits = ctx.model, ctx.splits
    x, _ = next(iter(splits.loader("val", 2)))
    x = x.to(model_device(model))
    report = prune_filters_(model, config.prune_config(), x, progress=ctx.progress)
    test_loader = splits.loader("test", 512)
    out: dict[str, Any] = report.to_dict()
    out["test_accuracy_pruned"] = evaluate(model, test_loader)["accuracy"]
    val_loader = splits.loader("val", 512)
    if config.epochs > 0:
        cfg = config.retrain_config(ctx.train_config)
        history = finetune(
            model,
            splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment),
            cfg,
            lr_scale=config.lr_scale,
            val_loader=val_loader,
            progress=ctx.progress,
        )
        out["retrain"] = {"epochs": config.epochs, "wall_s": history.wall_time_s}
    with torch.no_grad():
        out["val_accuracy"] = evaluate(model, val_loader)["accuracy"]
        out["test_accuracy"] = evaluate(model, test_loader)["accuracy"]
    return out
