"""Recipe stages ``train`` and (via :mod:`.finetune`) ``finetune``: run :func:`nncompress.engine.fit`.

A training stage overrides fields of the recipe's base :class:`~nncompress.engine.TrainConfig`
(``train:`` section); ``lr_scale`` multiplies the resulting learning rate (Han 2015 retrains
pruned LeNets at 1/10 of the original rate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.errors import ConfigError
from ..core.validate import check, is_finite_number, is_int
from ..engine.config import TrainConfig
from ..engine.train import fit
from .base import StageConfig, StageContext, stage_config

__all__ = ["TrainStageConfig", "run_train_stage", "train_with"]

# TrainConfig fields a stage may override (all of them).
_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(TrainConfig))


@stage_config()
class TrainStageConfig(StageConfig):
    """Train the model: ``overrides`` of the base training config, times ``lr_scale``.

    Training is this stage's algorithm, so its config is the recipe's base
    :class:`~nncompress.engine.TrainConfig` with overrides: any of its fields may be given
    directly in the stage's mapping (``epochs: 5``, ``lr: 0.01``, ``weight_decay: 1e-4`` ...);
    they are collected in ``overrides`` by :meth:`from_dict`.
    """

    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr_scale: float = 1.0

    def _check_options(self) -> None:
        check(
            is_finite_number(self.lr_scale) and 0 < self.lr_scale <= 100,
            "lr_scale",
            self.lr_scale,
            "must be a number in (0, 100]",
        )
        unknown = sorted(set(self.overrides) - set(_OVERRIDABLE))
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown}; allowed: {sorted(self.keys())}")
        try:
            TrainConfig(**self.overrides)  # validates the values (names the field)
        except TypeError as exc:  # pragma: no cover - names already checked
            raise ConfigError(str(exc)) from None

    @classmethod
    def keys(cls) -> list[str]:
        return [*_OVERRIDABLE, "lr_scale"]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"lr_scale": cls.__dataclass_fields__["lr_scale"].default}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainStageConfig:
        data = dict(data)
        kw = {}
        if "lr_scale" in data:
            kw["lr_scale"] = data.pop("lr_scale")
        if "overrides" in data and isinstance(data["overrides"], dict):
            data.update(data.pop("overrides"))
        return cls(overrides=data, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {**self.overrides, "lr_scale": self.lr_scale}

    def capped(self, epochs: int) -> TrainStageConfig:
        ov = self.overrides.get("epochs")
        if is_int(ov) and ov > epochs:
            return self.replace(overrides={**self.overrides, "epochs": epochs})
        return self

    def resolve(self, base: TrainConfig) -> TrainConfig:
        """The effective config: ``base`` with the overrides, learning rate times lr_scale."""
        cfg = base.replace(**self.overrides)
        return cfg.replace(lr=cfg.lr * self.lr_scale)


def train_with(ctx: StageContext, cfg: TrainConfig) -> dict[str, Any]:
    """Fit ``ctx.model`` with ``cfg`` on the train split (held-out split for validation)."""
    history = fit(
        ctx.model,
        ctx.splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment),
        cfg,
        val_loader=ctx.splits.loader("val", 512),
        progress=ctx.progress,
    )
    last = history.last
    return {
        "epochs": len(history.epochs),
        "lr": cfg.lr,
        "train_loss": last.get("train_loss"),
        "val_accuracy": last.get("val_accuracy"),
    }


def run_train_stage(ctx: StageContext, config: TrainStageConfig) -> dict[str, Any]:
    return train_with(ctx, config.resolve(ctx.train_config))
