"""Training configuration (a frozen, validated dataclass serialisable to JSON/YAML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError
from ..core.validate import check as _check
from ..core.validate import check_field_types

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "config_to_dict"]

OPTIMIZERS = ("sgd", "adam", "adamw")
MAX_EPOCHS = 100_000
MAX_LR = 100.0
MAX_BATCH = 1 << 20
SCHEDULES = ("constant", "cosine", "step", "onecycle")


@dataclass(frozen=True)
class TrainConfig:
    """How to train or fine-tune.

    ``l1`` / ``weight_decay`` (L2) are penalties on weights; ``regularization_switch_epoch``
    switches from L1 to L2 at that epoch (Han 2015's L1-then-L2; the L2 strength is
    ``weight_decay`` and the L1 strength ``l1``). ``early_stopping`` is a patience in epochs on
    the held-out loss (0 disables it). ``restore_best`` evaluates the held-out split before
    training and after every epoch and, at the end, restores the weights with the best held-out
    accuracy — the starting weights included, so fine-tuning never ends worse on held-out data
    than it began.
    """

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    l1: float = 0.0
    regularization_switch_epoch: int | None = None
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    batch_size: int = 128
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    early_stopping: int = 0
    restore_best: bool = False

    def __post_init__(self) -> None:
        # types first (epochs: 1.5, epochs: true, lr: .inf), then ranges; every message names
        # the field, the value and what is allowed
        check_field_types(self)
        _check(self.epochs <= MAX_EPOCHS, "epochs", self.epochs, f"must be in [0, {MAX_EPOCHS}]")
        _check(self.epochs >= 0, "epochs", self.epochs, f"must be in [0, {MAX_EPOCHS}]")
        _check(0 < self.lr <= MAX_LR, "lr", self.lr, f"must be in (0, {MAX_LR}]")
        _check(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            self.optimizer,
            f"must be one of {OPTIMIZERS}",
        )
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"must be one of {SCHEDULES}")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _check(0 <= self.weight_decay <= 1, "weight_decay", self.weight_decay, "must be in [0, 1]")
        _check(0 <= self.l1 <= 1, "l1", self.l1, "must be in [0, 1]")
        _check(
            1 <= self.batch_size <= MAX_BATCH,
            "batch_size",
            self.batch_size,
            f"must be in [1, {MAX_BATCH}]",
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            self.grad_clip,
            "must be > 0 or null",
        )
        _check(
            0 <= self.label_smoothing < 1,
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        _check(
            0 <= self.warmup_epochs <= MAX_EPOCHS,
            "warmup_epochs",
            self.warmup_epochs,
            f"must be in [0, {MAX_EPOCHS}]",
        )
        _check(self.step_size >= 1, "step_size", self.step_size, "must be an integer >= 1")
        _check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2**63)")
        _check(
            self.early_stopping >= 0,
            "early_stopping",
            self.early_stopping,
            "must be an integer >= 0",
        )
        v = self.regularization_switch_epoch
        _check(v is None or v >= 0, "regularization_switch_epoch", v, "must be >= 0 or null")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as a plain JSON/YAML-able dict."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build ``cls`` from ``data``, naming unknown fields (and the place they came from)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}unknown field(s) {unknown} for {cls.__name__}; allowed: {sorted(names)}"
        )
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
