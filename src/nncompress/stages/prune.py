"""Recipe stage ``prune``: connection pruning (Han et al. 2015) with retraining.

Registered in :data:`nncompress.recipe.STAGES` as ``"prune"`` ->
``("nncompress.stages.prune", "PruneStageConfig", "run_prune_stage")``. The ``nncompress prune``
command runs the same code for ``--method magnitude|agp``.

Recipe example::

    - {stage: prune, method: magnitude, sparsity: 0.92, allocate: sensitivity,
       iterations: 3, epochs: 4, lr_scale: 0.1, remove_dead: true}
    - {stage: prune, method: agp, sparsity: 0.9, epochs: 5, agp_frequency: 50}
    - {stage: prune, method: magnitude, sparsity: 0.92, iterations: 3, epochs: 10,
       lr_scale: 0.5, distill: {temperature: 4, alpha: 0.7}}

``epochs`` is the number of retraining epochs per iteration (``magnitude``; 0 = one-shot,
no retraining) or of the whole gradual run (``agp``). ``allocate: sensitivity`` runs a
sensitivity analysis on the held-out split first and sets per-layer sparsities from it: the
layers whose accuracy drop stays within ``max_drop`` points, or — without ``max_drop`` — the
smallest tolerated drop that reaches the overall ``sparsity``. ``distill`` retrains with
knowledge distillation (Hinton 2015) from a frozen copy of the model as it entered the stage
(the unpruned network) instead of the plain cross-entropy. Retraining reads the training split
without augmentation.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..core.modules import folded_copy
from ..core.validate import check
from ..distill.losses import distillation_loss
from ..engine.train import evaluate
from ..prune.allocate import DEFAULT_FLOOR, global_allocation
from ..prune.magnitude import (
    MagnitudeConfig,
    masks_from_zeros_,
    prunable_layers,
    prune_,
    pruning_coverage,
    pruning_masks,
)
from ..prune.schedule import AGPConfig, agp_prune_, iterative_prune_
from ..prune.sensitivity import (
    DEFAULT_SPARSITIES,
    sensitivity_analysis,
    sparsities_for_budget,
    thresholds_from_sensitivity,
)
from .base import RetrainKeys, StageConfig, StageContext, check_policy_file, stage_config

__all__ = ["PRUNE_METHODS", "PruneStageConfig", "run_prune_stage"]

log = logging.getLogger(__name__)

PRUNE_METHODS = ("magnitude", "agp")
ALLOCATIONS = ("none", "global", "sensitivity", "policy")


@stage_config(
    MagnitudeConfig,
    retrain=RetrainKeys(
        {
            "epochs": 0,
            "lr_scale": 0.1,
            "l1": None,
            "weight_decay": None,
            "regularization_switch_epoch": None,
            "distill": None,
        }
    ),
)
class PruneStageConfig(StageConfig):
    """Configuration of the ``prune`` stage (see the module docstring).

    Attributes
    ----------
    q, sparsity, scope, per_layer, include, exclude : the
        :class:`~nncompress.prune.MagnitudeConfig` (AGP needs ``sparsity``; with
        ``allocate='sensitivity'`` and ``max_drop``, or ``allocate='policy'``, neither q nor
        sparsity is needed).
    epochs, lr_scale, l1, weight_decay, regularization_switch_epoch, distill : the
        :class:`~nncompress.stages.base.RetrainSpec`: retraining epochs per iteration
        (magnitude) or in total (agp) at ``lr_scale`` times the base rate (Han: 0.1 for LeNet),
        L1 / L2 / L1-then-L2, and ``distill`` (``{temperature, alpha}``: soft targets from the
        model as it entered the stage; None: cross-entropy).
    method : 'magnitude' (one-shot or iterative prune -> retrain) or 'agp' (gradual).
    allocate : how a model-wide ``sparsity`` is spread over layers: 'none' (every layer
        pruned to ``sparsity``, uniform), 'global' (one magnitude ranking over all layers with
        a per-layer floor, :func:`~nncompress.prune.allocate.global_allocation`; what the
        ``nncompress prune`` command does by default), 'sensitivity' (per-layer sparsities
        from a sensitivity analysis) or 'policy' (the per-layer sparsities of a searched
        policy: the last ``search`` stage's, or ``policy_file``). The recipe's ``per_layer``
        always wins for the layers it names.
    floor : 'global' allocation: every layer keeps at least ``floor * (1 - sparsity)`` of its
        weights.
    policy_file : a ``policy.json`` (``nncompress search``) for ``allocate='policy'``.
    max_drop : tolerated held-out accuracy drop (points) for ``allocate='sensitivity'``.
    sensitivity_sparsities : grid of the analysis.
    sensitivity_batches : evaluate the analysis on this many held-out batches of 512 (None: all).
    iterations : prune -> retrain cycles (magnitude).
    adjust_dropout : Han's dropout adjustment while retraining.
    agp_frequency, agp_initial_sparsity : AGP's ``dt`` (steps) and ``s_i``.
    remove_dead : physically remove dead neurons at the end.
    """

    method: str = "magnitude"
    allocate: str = "none"
    floor: float = DEFAULT_FLOOR
    max_drop: float | None = None
    sensitivity_sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    sensitivity_batches: int | None = None
    iterations: int = 1
    adjust_dropout: bool = True
    agp_frequency: int = 100
    agp_initial_sparsity: float = 0.0
    remove_dead: bool = False
    policy_file: str | None = None

    def _check_options(self) -> None:
        object.__setattr__(self, "sensitivity_sparsities", tuple(self.sensitivity_sparsities))
        check(
            self.method in PRUNE_METHODS, "method", self.method, f"must be one of {PRUNE_METHODS}"
        )
        check(
            self.allocate in ALLOCATIONS, "allocate", self.allocate, f"must be one of {ALLOCATIONS}"
        )
        if self.allocate == "sensitivity" and self.max_drop is None and self.sparsity is None:
            raise ConfigError(
                "allocate='sensitivity' needs max_drop (tolerated drop in points) or sparsity "
                "(overall target)"
            )
        check(
            self.max_drop is None or self.max_drop >= 0, "max_drop", self.max_drop, "must be >= 0"
        )
        if self.allocate == "global" and (self.sparsity is None or self.q is not None):
            raise ConfigError(
                "allocate='global' spreads a model-wide target: give sparsity (not q)"
            )
        check(
            isinstance(self.floor, int | float) and 0 <= self.floor <= 1,
            "floor",
            self.floor,
            "must be a number in [0, 1]",
        )
        if self.method == "agp":
            if self.sparsity is None or self.q is not None:
                raise ConfigError("method='agp' ramps to a target: give sparsity (not q)")
            if self.epochs < 1:
                raise ConfigError(f"epochs={self.epochs}: method='agp' needs epochs >= 1")
            qs = sorted(n for n, v in self.per_layer.items() if isinstance(v, dict) and "q" in v)
            if qs:
                raise ConfigError(f"per_layer {qs}: method='agp' takes final sparsities, not q")
            check(self.agp_frequency >= 1, "agp_frequency", self.agp_frequency, "must be >= 1")
        check(self.iterations >= 1, "iterations", self.iterations, "must be >= 1")
        self._unused_unless(
            self.method == "agp",
            ("agp_frequency", "agp_initial_sparsity"),
            f"only with method='agp' (got {self.method!r})",
        )
        self._unused_unless(
            self.method == "magnitude", ("iterations",), "only with method='magnitude'"
        )
        self._unused_unless(
            self.allocate == "sensitivity",
            ("max_drop", "sensitivity_sparsities", "sensitivity_batches"),
            f"only with allocate='sensitivity' (got {self.allocate!r})",
        )
        b = self.sensitivity_batches
        check(b is None or b >= 1, "sensitivity_batches", b, "must be >= 1")
        grid = self.sensitivity_sparsities
        if self.allocate == "sensitivity" and self.sparsity is not None and grid:
            # the allocation moves layers along the grid, so the overall sparsity it reaches
            # is at most the grid's largest point: fail here, not after the analysis ran
            top = max(float(g) for g in grid)
            if self.sparsity > top:
                raise ConfigError(
                    f"sparsity={self.sparsity}: allocate='sensitivity' reaches at most the "
                    f"largest sensitivity_sparsities point ({top}); add larger points to "
                    f"sensitivity_sparsities (e.g. {[*grid, 0.97, 0.98, 0.99]})"
                )
        check_policy_file(self.allocate, self.policy_file)

    def _build_algorithm(self, values: dict[str, Any]) -> MagnitudeConfig | None:
        if self.q is None and self.sparsity is None and self.allocate in ("sensitivity", "policy"):
            return None  # every per-layer sparsity comes from the analysis/policy, at run time
        return MagnitudeConfig(**values)

    def magnitude_config(self, per_layer: dict[str, Any] | None = None) -> MagnitudeConfig:
        """The :class:`MagnitudeConfig` with ``per_layer`` (from the sensitivity allocation)
        under the recipe's own overrides."""
        merged = {**(per_layer or {}), **self.per_layer}
        q, s = self.q, self.sparsity
        if q is None and s is None:
            s = 0.0  # every layer has an override from the sensitivity allocation
        return MagnitudeConfig(
            q=q,
            sparsity=s,
            scope=self.scope,
            per_layer=merged,
            include=self.include,
            exclude=self.exclude,
        )

    def resume_(self, model: nn.Module) -> None:
        """A pruned checkpoint holds zeros: make them masks again (they stay zero)."""
        masks_from_zeros_(model)


def _nonzeros(model) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    # count effective (masked) weights: parametrized originals are zeroed where pruned
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    return params, nz


def _allocate(model, config: PruneStageConfig, val_loader, progress) -> tuple[dict, dict]:
    """Per-layer sparsities from a sensitivity analysis on the held-out split (as per-layer
    overrides), and the report of the analysis."""
    sens = sensitivity_analysis(
        model,
        val_loader,
        config.sensitivity_sparsities,
        include=config.include,
        exclude=config.exclude,
        max_batches=config.sensitivity_batches,
        progress=progress,
    )
    if config.max_drop is not None:
        per = thresholds_from_sensitivity(sens, config.max_drop)
        info = {"max_drop": config.max_drop}
    else:
        # greedy allocation reaching the overall sparsity; its predicted (additive) loss
        loss, per = sparsities_for_budget(sens, config.sparsity)  # type: ignore[arg-type]
        info = {"predicted_drop": loss}
    derived = {n: {"sparsity": s} for n, s in per.items()}
    return derived, {**info, "per_layer": per, **sens.to_dict()}


def _allocate_global(model, config: PruneStageConfig, layers: dict) -> tuple[dict, dict]:
    """Per-layer sparsities from one magnitude ranking of the layers without a ``per_layer``
    override (:func:`global_allocation`), and its report."""
    names = [n for n in layers if n not in config.per_layer]
    masks = pruning_masks(model)
    per = global_allocation(
        {n: layers[n].weight for n in names},
        config.sparsity,  # type: ignore[arg-type]
        floor=config.floor,
        masks={n: masks[n] for n in names if n in masks},
    )
    derived = {n: {"sparsity": s} for n, s in per.items()}
    return derived, {"method": "global", "floor": config.floor, "per_layer": per}


def _one_shot_drop(model, mc: MagnitudeConfig, val_loader) -> dict[str, float]:
    """Held-out accuracy before and right after pruning a copy of ``model`` to the final
    sparsities with no retraining: the drop retraining starts from (the prediction the
    ``prune`` command prints)."""
    import copy

    probe = copy.deepcopy(model)
    before = evaluate(probe, val_loader)["accuracy"]
    prune_(probe, mc)
    after = evaluate(probe, val_loader)["accuracy"]
    return {"val_accuracy": before, "val_accuracy_one_shot": after, "drop": before - after}


def _agp_config(config: PruneStageConfig, mc: MagnitudeConfig) -> AGPConfig:
    """The AGP ramp to the magnitude config's (final) sparsities."""
    rules = {n: mc.layer_rule(n) for n in mc.per_layer}
    bad = sorted(n for n, r in rules.items() if r is not None and r[0] != "sparsity")
    if bad:
        raise ConfigError(f"per_layer {bad}: method='agp' takes final sparsities, not q")
    return AGPConfig(
        sparsity=mc.sparsity,  # type: ignore[arg-type]
        initial_sparsity=config.agp_initial_sparsity,
        frequency=config.agp_frequency,
        scope=mc.scope,
        per_layer={n: mc.layer_rule(n)[1] for n in mc.per_layer},  # type: ignore[index]
        include=mc.include,
        exclude=mc.exclude,
    )


def run_prune_stage(ctx: StageContext, config: PruneStageConfig) -> dict[str, Any]:
    """Prune ``ctx.model`` in place; returns accuracy (val and test), nonzeros and per-layer
    kept fractions, plus per-iteration details."""
    model, splits = ctx.model, ctx.splits
    # a model loaded from a pruned checkpoint: keep its zeros fixed while retraining
    masks_from_zeros_(model, config.include, config.exclude)
    layers = prunable_layers(model, config.include, config.exclude)
    unknown = sorted(set(config.per_layer) - set(layers))
    if unknown:
        raise ConfigError(
            f"per_layer names {unknown} are not prunable layers of the model; "
            f"prunable: {sorted(layers)}"
        )
    val_loader = splits.loader("val", 512)
    report: dict[str, Any] = {"method": config.method}
    derived: dict[str, Any] = {}
    if config.allocate == "sensitivity":
        derived, report["sensitivity"] = _allocate(model, config, val_loader, ctx.progress)
    elif config.allocate == "global":
        derived, report["allocation"] = _allocate_global(model, config, layers)
    elif config.allocate == "policy":
        from .search import stage_policy

        policy = stage_policy(ctx, config.policy_file, "prune")
        derived = {n: {"sparsity": s} for n, s in policy.sparsity.items()}
        report["policy"] = policy.to_dict()
    mc = config.magnitude_config(derived)
    report["predicted"] = _one_shot_drop(model, mc, val_loader)
    retrain = config.retrain.train_config(ctx.train_config)
    train_loader = splits.loader("train", retrain.batch_size, seed=retrain.seed)
    kd = config.retrain.distill
    # the teacher: a frozen plain copy (masks folded) of the model as it entered the stage
    loss_fn = None if kd is None else distillation_loss(folded_copy(model).eval(), kd)
    if config.method == "magnitude":
        its = iterative_prune_(
            model,
            mc,
            train_loader,
            retrain,
            iterations=config.iterations,
            lr_scale=config.lr_scale,
            val_loader=val_loader if retrain.epochs > 0 else None,
            adjust_dropout=config.adjust_dropout,
            loss_fn=loss_fn,
            progress=ctx.progress,
        )
        report["iterations"] = [it.to_dict() for it in its]
    else:
        agp = _agp_config(config, mc)
        cb, hist = agp_prune_(
            model,
            agp,
            train_loader,
            retrain,
            lr_scale=config.lr_scale,
            val_loader=val_loader,
            adjust_dropout=config.adjust_dropout,
            loss_fn=loss_fn,
            progress=ctx.progress,
        )
        report["agp"] = {"updates": cb.history, "train_history": hist}
    if config.remove_dead:
        from ..prune.dead import remove_dead_neurons_

        x, _ = next(iter(splits.loader("val", 64)))
        report["dead_neurons"] = remove_dead_neurons_(model, x)
    report["layers"] = {
        n: {
            "params": int(m.numel()),
            "kept": int(m.sum()),
            "kept_fraction": float(m.float().mean()),
        }
        for n, m in pruning_masks(model).items()
    }
    report["coverage"] = pruning_coverage(model).to_dict()
    params, nz = _nonzeros(model)
    report.update(
        params=params,
        nonzeros=nz,
        compression=params / nz if nz else float("inf"),
        val_accuracy=evaluate(model, val_loader)["accuracy"],
        test_accuracy=evaluate(model, splits.loader("test", 512))["accuracy"],
    )
    log.info(
        "prune stage: %d/%d nonzero (%.1fx), test %.2f%%",
        nz,
        params,
        report["compression"],
        report["test_accuracy"],
    )
    return report
