"""Pruning schedules: one-shot, iterative prune -> retrain (Han 2015) and gradual AGP
(Zhu & Gupta 2017, "To prune, or not to prune"), all driven through ``nncompress.engine``.

Retraining options follow Han 2015: retrain the surviving weights from their trained values at
a reduced learning rate (``lr_scale=0.1``, Han's LeNet setting; 0.01 for AlexNet), with L1, L2
or L1-then-L2 regularisation (``TrainConfig.l1``, ``weight_decay``,
``regularization_switch_epoch``), and the dropout ratio adjusted to the remaining connections,
``D_r = D_o * sqrt(C_ir / C_io)`` (:class:`DropoutAdjuster`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.progress import Progress
from ..core.select import Selectable
from ..engine.config import TrainConfig
from ..engine.train import Callback, LossFn, evaluate, finetune
from .magnitude import (
    DEFAULT_INCLUDE,
    LayerPruning,
    MagnitudeConfig,
    prunable_layers,
    prune_,
)

__all__ = [
    "AGPCallback",
    "AGPConfig",
    "DropoutAdjuster",
    "adjusted_dropout",
    "agp_prune",
    "agp_prune_",
    "agp_sparsity",
    "iterative_prune",
    "iterative_prune_",
    "iteration_config",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Dropout adjustment (Han 2015, section 3.2)
# --------------------------------------------------------------------------------------------


def adjusted_dropout(p_original: float, c_original: int, c_retrain: int) -> float:
    """Han 2015: ``D_r = D_o * sqrt(C_ir / C_io)`` (C_i = connections of the layer feeding the
    dropout, o = original, r = during retraining)."""
    if not 0 <= p_original < 1:
        raise ValueError(f"p_original={p_original}: must be in [0, 1)")
    if c_original <= 0 or c_retrain < 0:
        raise ValueError(
            f"connections c_original={c_original}, c_retrain={c_retrain}: "
            "need c_original > 0 and c_retrain >= 0"
        )
    return p_original * math.sqrt(c_retrain / c_original)


def _connections(m: nn.Module) -> int:
    return int(torch.count_nonzero(m.weight.detach()))


class DropoutAdjuster:
    """Applies Han's dropout adjustment to every ``nn.Dropout`` of a model.

    Which layer feeds a dropout is found by running ``example_input`` through the model with
    forward hooks: each dropout call follows the most recently called Linear/Conv layer (in
    execution order, not module-registration order — LeNet-300-100 reuses one Dropout module
    after fc1 and fc2). A dropout module used after several layers gets one rate from their
    summed connections, ``D_o * sqrt(sum C_ir / sum C_io)``.

    The original rates and connection counts are recorded at construction (before pruning);
    :meth:`apply` sets the adjusted rates and :meth:`restore` puts the originals back. The
    schedules apply before each retraining and restore afterwards: the rate is a training-time
    setting recomputed from the current connection count at every retraining, dropout is off at
    inference, and the saved architecture stays that of the original model.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.model = model
        feeds: dict[nn.Module, list[nn.Module]] = {}
        last: list[nn.Module | None] = [None]
        hooks = []
        conn_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

        def on_layer(mod, inp, out):
            last[0] = mod

        def on_dropout(mod, inp, out):
            if last[0] is not None and last[0] not in feeds.setdefault(mod, []):
                feeds[mod].append(last[0])

        for m in model.modules():
            if isinstance(m, conn_types):
                hooks.append(m.register_forward_hook(on_layer))
            elif isinstance(m, nn.modules.dropout._DropoutNd):
                hooks.append(m.register_forward_hook(on_dropout))
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example_input)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        names = {m: n for n, m in model.named_modules()}
        self.feeds = {d: layers for d, layers in feeds.items() if d.p > 0}
        self.original = {d: (d.p, sum(_connections(x) for x in ls)) for d, ls in self.feeds.items()}
        self.describe = {names[d]: [names[x] for x in ls] for d, ls in feeds.items()}

    def apply(self) -> dict[str, float]:
        """Set every fed dropout to its adjusted rate; returns ``{dropout_name: new p}``."""
        names = {m: n for n, m in self.model.named_modules()}
        out = {}
        for d, layers in self.feeds.items():
            p_o, c_o = self.original[d]
            c_r = sum(_connections(x) for x in layers)
            d.p = adjusted_dropout(p_o, c_o, c_r) if c_o else p_o
            out[names.get(d, "?")] = d.p
        if out:
            log.info("dropout adjusted: %s", out)
        return out

    def restore(self) -> None:
        for d, (p_o, _) in self.original.items():
            d.p = p_o


def _example_input(loader: Iterable) -> torch.Tensor:
    x, _ = next(iter(loader))
    return x[:2]


# --------------------------------------------------------------------------------------------
# Iterative pruning (Han 2015)
# --------------------------------------------------------------------------------------------


def iteration_config(config: MagnitudeConfig, i: int, iterations: int) -> MagnitudeConfig:
    """The pruning rule of iteration ``i`` (1-based) of ``iterations``.

    q mode: the same ``q`` every iteration; as the threshold is ``q * std`` of the surviving
    weights it removes more each round. Sparsity mode: the kept fraction shrinks geometrically,
    ``kept_i = (1 - s) ** (i / iterations)``, so the last iteration hits the target exactly.
    """
    if not 1 <= i <= iterations:
        raise ValueError(f"iteration i={i}: must be in [1, {iterations}]")
    if config.q is not None:
        return config

    def ramp(s: float) -> float:
        return 1.0 - (1.0 - s) ** (i / iterations) if i < iterations else s

    per_layer: dict[str, Any] = {}
    for name in config.per_layer:
        kind, val = config.layer_rule(name)  # type: ignore[misc]
        per_layer[name] = {kind: ramp(val) if kind == "sparsity" else val}
    return MagnitudeConfig(
        sparsity=ramp(config.sparsity),  # type: ignore[arg-type]
        scope=config.scope,
        per_layer=per_layer,
        include=config.include,
        exclude=config.exclude,
    )


@dataclass
class IterationReport:
    iteration: int
    layers: dict[str, LayerPruning]
    val_accuracy_pruned: float | None = None
    val_accuracy_retrained: float | None = None
    dropout: dict[str, float] = field(default_factory=dict)
    train_history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "layers": {n: r.to_dict() for n, r in self.layers.items()},
            "val_accuracy_pruned": self.val_accuracy_pruned,
            "val_accuracy_retrained": self.val_accuracy_retrained,
            "dropout": self.dropout,
            "train_history": self.train_history,
        }


def iterative_prune_(
    model: nn.Module,
    config: MagnitudeConfig,
    train_loader: Iterable,
    train_config: TrainConfig | None = None,
    *,
    iterations: int = 1,
    lr_scale: float = 0.1,
    val_loader: Iterable | None = None,
    adjust_dropout: bool = True,
    filter: Selectable = None,  # noqa: A002
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
) -> list[IterationReport]:
    """Han 2015 prune -> retrain, repeated ``iterations`` times (1 = one-shot + retrain).

    Each iteration prunes with :func:`iteration_config` and then retrains the surviving weights
    from their current values with :func:`nncompress.engine.finetune` for
    ``train_config.epochs`` epochs at ``lr_scale * train_config.lr`` (``epochs=0``: no
    retraining, i.e. one-shot pruning). Masks keep pruned weights at exactly zero throughout.
    ``loss_fn`` replaces the retraining loss (e.g. :func:`nncompress.distill.distillation_loss`
    from the unpruned model); cross-entropy by default.
    """
    if iterations < 1:
        raise ConfigError(f"iterations={iterations}: must be >= 1")
    if lr_scale <= 0:
        raise ConfigError(f"lr_scale={lr_scale}: must be > 0")
    cfg = train_config or TrainConfig()
    adjuster = DropoutAdjuster(model, _example_input(train_loader)) if adjust_dropout else None
    reports = []
    for i in range(1, iterations + 1):
        it_cfg = iteration_config(config, i, iterations)
        layers = prune_(model, it_cfg, filter=filter)
        rep = IterationReport(i, layers)
        if val_loader is not None:
            rep.val_accuracy_pruned = evaluate(model, val_loader)["accuracy"]
        if cfg.epochs > 0:
            if adjuster is not None:
                rep.dropout = adjuster.apply()
            try:
                hist = finetune(
                    model,
                    train_loader,
                    cfg,
                    lr_scale=lr_scale,
                    val_loader=val_loader,
                    callbacks=callbacks,
                    loss_fn=loss_fn,
                    progress=progress,
                )
            finally:
                if adjuster is not None:
                    adjuster.restore()
            rep.train_history = hist.epochs
            rep.val_accuracy_retrained = hist.last.get("val_accuracy")
        log.info(
            "iteration %d/%d: kept %s, val %.2f -> %s",
            i,
            iterations,
            {n: round(r.kept_fraction, 4) for n, r in layers.items()},
            rep.val_accuracy_pruned or float("nan"),
            rep.val_accuracy_retrained,
        )
        reports.append(rep)
    return reports


# --------------------------------------------------------------------------------------------
# Gradual pruning, AGP (Zhu & Gupta 2017)
# --------------------------------------------------------------------------------------------


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta 2017 cubic ramp: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

    ``start`` is ``t0`` and ``end`` is ``t0 + n * dt``; before ``start`` the sparsity is
    ``initial``, from ``end`` on it is ``final``.
    """
    if end <= start:
        raise ValueError(f"end={end}: must be > start={start}")
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass(frozen=True)
class AGPConfig:
    """Gradual magnitude pruning (AGP, Zhu & Gupta 2017).

    Attributes
    ----------
    sparsity : final sparsity ``s_f`` of each layer (or of all layers with ``scope='global'``).
    initial_sparsity : ``s_i`` at ``start_step``.
    start_step : ``t0`` (optimizer steps, counted from 0 within the training run).
    end_step : ``t0 + n * dt``, the step at which ``s_f`` is reached exactly; ``None`` = the
        last step of the run (set by :func:`agp_prune_`).
    frequency : ``dt``, steps between mask updates (the end step is always an update).
    scope, per_layer (final sparsity by layer name), include, exclude : as in
        :class:`MagnitudeConfig`.
    """

    sparsity: float
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 100
    scope: str = "layer"
    per_layer: dict[str, float] = field(default_factory=dict)
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # validates sparsity, scope, per_layer and include through MagnitudeConfig
        MagnitudeConfig(
            sparsity=self.sparsity,
            scope=self.scope,
            per_layer=self.per_layer,
            include=self.include,
            exclude=self.exclude,
        )
        for name, v in self.per_layer.items():
            if not isinstance(v, int | float):
                raise ConfigError(f"per_layer[{name!r}]={v!r}: AGP takes a final sparsity number")
        if not 0 <= self.initial_sparsity < 1:
            raise ConfigError(f"initial_sparsity={self.initial_sparsity!r}: must be in [0, 1)")
        if self.initial_sparsity > self.sparsity:
            raise ConfigError(
                f"initial_sparsity={self.initial_sparsity} must be <= sparsity={self.sparsity}"
            )
        if self.start_step < 0:
            raise ConfigError(f"start_step={self.start_step!r}: must be >= 0")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ConfigError(f"end_step={self.end_step!r}: must be > start_step={self.start_step}")
        if self.frequency < 1:
            raise ConfigError(f"frequency={self.frequency!r}: must be >= 1")
        object.__setattr__(self, "per_layer", dict(self.per_layer))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def at(self, step: int) -> MagnitudeConfig:
        """The :class:`MagnitudeConfig` that prunes to the ramp's value at ``step``."""
        if self.end_step is None:
            raise ConfigError("end_step is None: set it (agp_prune sets it to the last step)")

        def s(final: float) -> float:
            init = min(self.initial_sparsity, final)
            return agp_sparsity(step, init, final, self.start_step, self.end_step)

        return MagnitudeConfig(
            sparsity=s(self.sparsity),
            scope=self.scope,
            per_layer={n: {"sparsity": s(v)} for n, v in self.per_layer.items()},
            include=self.include,
            exclude=self.exclude,
        )


class AGPCallback(Callback):
    """Engine callback updating the masks every ``frequency`` steps along the cubic ramp.

    Updates happen after the optimizer step at ``t0, t0 + dt, t0 + 2 dt, ...`` and always at
    ``end_step``, where the target sparsity is reached exactly. ``history`` records
    ``(step, target sparsity)`` of each update.
    """

    def __init__(
        self,
        config: AGPConfig,
        filter: Selectable = None,  # noqa: A002
        dropout: DropoutAdjuster | None = None,
    ) -> None:
        if config.end_step is None:
            raise ConfigError("AGPCallback needs config.end_step (the step reaching sparsity)")
        self.config = config
        self.filter = filter
        self.dropout = dropout
        self.history: list[tuple[int, float]] = []
        self.last_report: dict[str, LayerPruning] = {}

    def _update(self, model: nn.Module, step: int) -> None:
        mc = self.config.at(step)
        self.last_report = prune_(model, mc, filter=self.filter)
        self.history.append((step, float(mc.sparsity)))  # type: ignore[arg-type]
        if self.dropout is not None:
            self.dropout.apply()

    def on_train_end(self, model: nn.Module) -> None:
        if self.dropout is not None:
            self.dropout.restore()

    def on_step_end(self, model: nn.Module, step: int) -> None:
        c = self.config
        t0, end = c.start_step, c.end_step
        assert end is not None
        if step < t0 or step > end:
            return
        if (step - t0) % c.frequency == 0 or step == end:
            self._update(model, step)


def agp_prune_(
    model: nn.Module,
    config: AGPConfig,
    train_loader: Iterable,
    train_config: TrainConfig | None = None,
    *,
    lr_scale: float = 0.1,
    val_loader: Iterable | None = None,
    adjust_dropout: bool = True,
    filter: Selectable = None,  # noqa: A002
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
) -> tuple[AGPCallback, list[dict]]:
    """Fine-tune ``model`` for ``train_config.epochs`` while AGP ramps its sparsity.

    With ``config.end_step=None`` the ramp ends at the last optimizer step of the run, so the
    returned model has exactly the target sparsity. With ``adjust_dropout`` the dropout rates
    are re-derived (Han's formula, :class:`DropoutAdjuster`) after every mask update and
    restored when training ends. Returns the callback (its ``history``) and the training
    history.
    """
    cfg = train_config or TrainConfig()
    if cfg.epochs < 1:
        raise ConfigError(f"epochs={cfg.epochs}: AGP needs at least one training epoch")
    total = cfg.epochs * len(train_loader)  # type: ignore[arg-type]
    if config.end_step is None:
        import dataclasses

        config = dataclasses.replace(config, end_step=total - 1)
    if config.end_step is not None and config.end_step > total - 1:
        raise ConfigError(
            f"end_step={config.end_step}: the run has only {total} steps (0..{total - 1})"
        )
    if config.start_step >= config.end_step:  # type: ignore[operator]
        raise ConfigError(f"start_step={config.start_step}: must be < end_step={config.end_step}")
    unknown = sorted(
        set(config.per_layer) - set(prunable_layers(model, config.include, config.exclude, filter))
    )
    if unknown:
        raise ConfigError(f"per_layer names {unknown} are not prunable layers of the model")
    adjuster = DropoutAdjuster(model, _example_input(train_loader)) if adjust_dropout else None
    cb = AGPCallback(config, filter, adjuster)
    try:
        hist = finetune(
            model,
            train_loader,
            cfg,
            lr_scale=lr_scale,
            val_loader=val_loader,
            callbacks=[cb],
            loss_fn=loss_fn,
            progress=progress,
        )
    finally:
        if adjuster is not None:
            adjuster.restore()
    return cb, hist.epochs


def iterative_prune(*args: Any, **kwargs: Any) -> list[IterationReport]:
    """Deprecated name of :func:`iterative_prune_` (it changes the model in place)."""
    return iterative_prune_(*args, **kwargs)


def agp_prune(*args: Any, **kwargs: Any) -> tuple[AGPCallback, list[dict]]:
    """Deprecated name of :func:`agp_prune_` (it changes the model in place)."""
    return agp_prune_(*args, **kwargs)
