"""Recipe stages ``train`` and (via :mod:`.finetune`) ``finetune``: run :func:`nncompress.engine.fit`.

A training stage overrides fields of the recipe's base :class:`~nncompress.engine.TrainConfig`
(``train:`` section); ``lr_scale`` multiplies the resulting learning rate (Han 2015 retrains
pruned LeNets at 1/10 of the original rate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError
from ..engine.config import TrainConfig
from ..engine.train import fit
from .base import StageContext

__all__ = ["TrainStageConfig", "run_train_stage", "train_with"]

# TrainConfig fields a stage may override (everything except nothing: all of them).
_OVERRIDABLE = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class TrainStageConfig:
    """Train the model: ``overrides`` of the base training config, times ``lr_scale``.

    Any :class:`~nncompress.engine.TrainConfig` field may be given directly in the stage's
    mapping (``epochs: 5``, ``lr: 0.01``, ``weight_decay: 1e-4`` ...); they are collected in
    ``overrides`` by :meth:`from_dict`.
    """

    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.lr_scale, (int, float)) or not self.lr_scale > 0:
            raise ConfigError(f"lr_scale={self.lr_scale!r}: must be a number > 0")
        unknown = sorted(set(self.overrides) - set(_OVERRIDABLE))
        if unknown:
            raise ConfigError(
                f"unknown field(s) {unknown}; allowed: {sorted([*_OVERRIDABLE, 'lr_scale'])}"
            )
        try:
            TrainConfig(**self.overrides)  # validates the values (names the field)
        except TypeError as exc:  # pragma: no cover - names already checked
            raise ConfigError(str(exc)) from None

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
