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

from typing import Any

import torch

from ..core.modules import model_device
from ..core.validate import check
from ..engine.train import evaluate
from ..prune.structured import FilterPruneConfig, prune_filters_
from .base import RetrainKeys, StageConfig, StageContext, stage_config

__all__ = ["FilterPruneStageConfig", "run_filter_prune_stage"]


@stage_config(
    FilterPruneConfig,
    retrain=RetrainKeys({"epochs": 0, "lr_scale": 0.1, "augment": None}),
)
class FilterPruneStageConfig(StageConfig):
    """Configuration of the ``filter_prune`` stage.

    Attributes
    ----------
    criterion, ratio, per_layer, macs_budget, scope, min_channels, exclude, seed : the
        :class:`~nncompress.prune.FilterPruneConfig` (exactly one of ratio / per_layer /
        macs_budget, or none of them with ``allocate='policy'``).
    epochs, lr_scale, augment : the :class:`~nncompress.stages.base.RetrainSpec`: retraining
        epochs after pruning (0: none) at ``lr_scale`` times the base rate, with data
        augmentation ``augment`` (None: the base config's setting).
    allocate : 'none', or 'policy': the per-layer ratios (and criterion, min_channels) of a
        searched policy, the last ``search`` stage's or ``policy_file``'s.
    policy_file : a ``policy.json`` (``nncompress search``) for ``allocate='policy'``.
    """

    allocate: str = "none"
    policy_file: str | None = None

    def _check_options(self) -> None:
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
        if self.allocate == "policy":
            given = [k for k in ("ratio", "per_layer", "macs_budget") if getattr(self, k)]
            check(
                not given,
                "allocate",
                self.allocate,
                f"the policy gives the per-layer ratios: drop {given}",
            )

    def _build_algorithm(self, values: dict[str, Any]) -> FilterPruneConfig | None:
        if self.allocate == "policy":
            return None  # the ratios come from the policy, at run time
        return FilterPruneConfig(**values)

    def filter_config(self, ctx: StageContext) -> FilterPruneConfig:
        """The algorithm config, from the searched policy with ``allocate='policy'``."""
        if self.allocate != "policy":
            return self.algorithm
        from .search import stage_policy

        policy = stage_policy(ctx, self.policy_file, "filter_prune")
        return FilterPruneConfig.from_policy(policy).replace(exclude=self.exclude, seed=self.seed)


def run_filter_prune_stage(ctx: StageContext, config: FilterPruneStageConfig) -> dict[str, Any]:
    """Prune filters of ``ctx.model`` (thinned in place), retrain, and report.

    Returns params and MACs before/after (total and per replaced layer), the ratio used, the
    test accuracy right after pruning and after retraining, and the held-out accuracy.
    """
    model, splits = ctx.model, ctx.splits
    x, _ = next(iter(splits.loader("val", 2)))
    x = x.to(model_device(model))
    report = prune_filters_(model, config.filter_config(ctx), x, progress=ctx.progress)
    test_loader = splits.loader("test", 512)
    out: dict[str, Any] = report.to_dict()
    out["test_accuracy_pruned"] = evaluate(model, test_loader)["accuracy"]
    val_loader = splits.loader("val", 512)
    if config.epochs > 0:
        history = config.retrain.run(
            model, splits, ctx.train_config, val_loader=val_loader, progress=ctx.progress
        )
        out["retrain"] = {"epochs": config.epochs, "wall_s": history.wall_time_s}
    with torch.no_grad():
        out["val_accuracy"] = evaluate(model, val_loader)["accuracy"]
        out["test_accuracy"] = evaluate(model, test_loader)["accuracy"]
    return out
