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

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ConfigError
from ..core.modules import folded_copy
from ..distill.losses import DistillConfig, distillation_loss
from ..engine.config import TrainConfig, config_from_dict
from ..engine.train import evaluate
from ..prune.magnitude import (
    DEFAULT_INCLUDE,
    MagnitudeConfig,
    masks_from_zeros_,
    prunable_layers,
    pruning_masks,
)
from ..prune.schedule import AGPConfig, agp_prune, iterative_prune
from ..prune.sensitivity import (
    DEFAULT_SPARSITIES,
    sensitivity_analysis,
    sparsities_for_budget,
    thresholds_from_sensitivity,
)
from .base import StageContext

__all__ = ["PRUNE_METHODS", "PruneStageConfig", "run_prune_stage"]

log = logging.getLogger(__name__)

PRUNE_METHODS = ("magnitude", "agp")
ALLOCATIONS = ("none", "sensitivity")


@dataclass(frozen=True)
class PruneStageConfig:
    """Configuration of the ``prune`` stage (see the module docstring).

    Attributes
    ----------
    method : 'magnitude' (one-shot or iterative prune -> retrain) or 'agp' (gradual).
    q, sparsity, scope, per_layer, include, exclude : as in
        :class:`~nncompress.prune.MagnitudeConfig` (AGP needs ``sparsity``).
    allocate : 'none' or 'sensitivity' (per-layer sparsities from a sensitivity analysis).
    max_drop : tolerated held-out accuracy drop (points) for ``allocate='sensitivity'``.
    sensitivity_sparsities : grid of the analysis.
    sensitivity_batches : evaluate the analysis on this many held-out batches of 512 (None: all).
    iterations : prune -> retrain cycles (magnitude).
    epochs : retraining epochs per iteration (magnitude) or in total (agp).
    lr_scale : retraining learning rate = lr_scale * base lr (Han: 0.1 for LeNet).
    l1, weight_decay, regularization_switch_epoch : regularisation while retraining (None:
        the base config's); L1-then-L2 = both strengths and a switch epoch.
    adjust_dropout : Han's dropout adjustment while retraining.
    agp_frequency, agp_initial_sparsity : AGP's ``dt`` (steps) and ``s_i``.
    remove_dead : physically remove dead neurons at the end.
    distill : ``{temperature, alpha}`` of :class:`~nncompress.distill.DistillConfig`: retrain
        with soft targets from the model as it entered the stage (None: cross-entropy).
    """

    method: str = "magnitude"
    q: float | None = None
    sparsity: float | None = None
    scope: str = "layer"
    per_layer: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    allocate: str = "none"
    max_drop: float | None = None
    sensitivity_sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    sensitivity_batches: int | None = None
    iterations: int = 1
    epochs: int = 0
    lr_scale: float = 0.1
    l1: float | None = None
    weight_decay: float | None = None
    regularization_switch_epoch: int | None = None
    adjust_dropout: bool = True
    agp_frequency: int = 100
    agp_initial_sparsity: float = 0.0
    remove_dead: bool = False
    distill: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "sensitivity_sparsities"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "per_layer", dict(self.per_layer))
        if self.distill is not None:
            self.distill_config()  # validates (names the field)
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"method={self.method!r}: must be one of {PRUNE_METHODS}")
        if self.allocate not in ALLOCATIONS:
            raise ConfigError(f"allocate={self.allocate!r}: must be one of {ALLOCATIONS}")
        if self.allocate == "sensitivity" and self.max_drop is None and self.sparsity is None:
            raise ConfigError(
                "allocate='sensitivity' needs max_drop (tolerated drop in points) or sparsity "
                "(overall target)"
            )
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ConfigError(f"max_drop={self.max_drop!r}: must be >= 0")
        if self.method == "agp":
            if self.sparsity is None or self.q is not None:
                raise ConfigError("method='agp' ramps to a target: give sparsity (not q)")
            if self.epochs < 1:
                raise ConfigError(f"epochs={self.epochs}: method='agp' needs epochs >= 1")
            qs = sorted(n for n, v in self.per_layer.items() if isinstance(v, dict) and "q" in v)
            if qs:
                raise ConfigError(f"per_layer {qs}: method='agp' takes final sparsities, not q")
            if self.agp_frequency < 1:
                raise ConfigError(f"agp_frequency={self.agp_frequency}: must be >= 1")
        if self.q is None and self.sparsity is None and self.allocate == "sensitivity":
            pass  # per-layer sparsities come from the analysis
        else:
            self.magnitude_config()  # validates q / sparsity / scope / per_layer / include
        if self.iterations < 1:
            raise ConfigError(f"iterations={self.iterations}: must be >= 1")
        if self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs}: must be >= 0")
        if not self.lr_scale > 0:
            raise ConfigError(f"lr_scale={self.lr_scale!r}: must be > 0")
        for name in ("l1", "weight_decay"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"{name}={v!r}: must be >= 0")
        if self.sensitivity_batches is not None and self.sensitivity_batches < 1:
            raise ConfigError(f"sensitivity_batches={self.sensitivity_batches}: must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneStageConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("include", "exclude", "sensitivity_sparsities"):
            d[k] = list(d[k])
        return d

    def magnitude_config(self, per_layer: dict[str, Any] | None = None) -> MagnitudeConfig:
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

    def distill_config(self) -> DistillConfig | None:
        if self.distill is None:
            return None
        return config_from_dict(DistillConfig, self.distill, "distill")

    def retrain_config(self, base: TrainConfig) -> TrainConfig:
        changes: dict[str, Any] = {"epochs": self.epochs}
        if self.l1 is not None:
            changes["l1"] = self.l1
        if self.weight_decay is not None:
            changes["weight_decay"] = self.weight_decay
        if self.regularization_switch_epoch is not None:
            changes["regularization_switch_epoch"] = self.regularization_switch_epoch
        return base.replace(**changes)


def _nonzeros(model) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    # count effective (masked) weights: parametrized originals are zeroed where pruned
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    return params, nz


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
        sens = sensitivity_analysis(
            model,
            val_loader,
            config.sensitivity_sparsities,
            include=config.include,
            exclude=config.exclude,
            max_batches=config.sensitivity_batches,
            progress=ctx.progress,
        )
        if config.max_drop is not None:
            per = thresholds_from_sensitivity(sens, config.max_drop)
            info = {"max_drop": config.max_drop}
        else:
            # greedy allocation reaching the overall sparsity; its predicted (additive) loss
            loss, per = sparsities_for_budget(sens, config.sparsity)  # type: ignore[arg-type]
            info = {"predicted_drop": loss}
        derived = {n: {"sparsity": s} for n, s in per.items()}
        report["sensitivity"] = {**info, "per_layer": per, **sens.to_dict()}
    mc = config.magnitude_config(derived)
    retrain = config.retrain_config(ctx.train_config)
    train_loader = splits.loader("train", retrain.batch_size, seed=retrain.seed)
    kd = config.distill_config()
    # the teacher: a frozen plain copy (masks folded) of the model as it entered the stage
    loss_fn = None if kd is None else distillation_loss(folded_copy(model).eval(), kd)
    if config.method == "magnitude":
        its = iterative_prune(
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
        rules = {n: mc.layer_rule(n) for n in mc.per_layer}
        bad = sorted(n for n, r in rules.items() if r is not None and r[0] != "sparsity")
        if bad:
            raise ConfigError(f"per_layer {bad}: method='agp' takes final sparsities, not q")
        agp = AGPConfig(
            sparsity=mc.sparsity,  # type: ignore[arg-type]
            initial_sparsity=config.agp_initial_sparsity,
            frequency=config.agp_frequency,
            scope=mc.scope,
            per_layer={n: mc.layer_rule(n)[1] for n in mc.per_layer},  # type: ignore[index]
            include=mc.include,
            exclude=mc.exclude,
        )
        cb, hist = agp_prune(
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
    masks = pruning_masks(model)
    report["layers"] = {
        n: {
            "params": int(m.numel()),
            "kept": int(m.sum()),
            "kept_fraction": float(m.float().mean()),
        }
        for n, m in masks.items()
    }
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
