"""The one pattern every recipe stage follows.

A stage is an entry of the registry :data:`nncompress.stages.registry.STAGES`: a config class
and a function ``run(ctx: StageContext, config) -> dict`` that changes ``ctx.model`` in place
(or replaces it) and returns the stage's report fields. Stages live in this package, one file
per family, so ``prune/`` never imports ``quant/`` and the other way round.

Every stage config is built by :func:`stage_config` from three parts, validated once each:

- the family's **own config** (``MagnitudeConfig``, ``KMeansConfig``, ``DecomposeConfig``...):
  its fields are the stage's fields, with the same names and defaults (a stage may expose a
  subset or change a default), and that class validates them;
- the shared **retraining spec** :class:`RetrainSpec` (epochs, lr_scale, distill, augment,
  L1/L2), spelled in the stage's mapping by :class:`RetrainKeys`;
- the stage's own **options** (sensitivity allocation, ONNX file name...), declared as fields
  of the class body and checked in its ``_check`` method.

So the flat mapping of a recipe (``{stage: prune, sparsity: 0.9, epochs: 3, ...}``), the CLI's
flags and library code all build the same frozen dataclass; ``config.algorithm`` and
``config.retrain`` are the built parts. A stage that leaves parametrizations on the model also
says how to rebuild them from saved (folded) weights when a recipe resumes: ``resume_``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from ..core.errors import ConfigError
from ..core.progress import Progress
from ..core.validate import check, check_field_types, is_finite_number, is_int
from ..data import DataSplits
from ..distill.losses import DistillConfig
from ..engine.config import TrainConfig, config_from_dict
from ..engine.train import History, finetune

__all__ = [
    "RetrainKeys",
    "RetrainSpec",
    "StageConfig",
    "StageContext",
    "stage_config",
]


@dataclass
class StageContext:
    """State handed from stage to stage by the recipe runner.

    Attributes
    ----------
    model : the model being compressed (a stage may replace it).
    splits : the dataset (train / held-out val / test).
    model_name, model_kwargs : registry name and arguments of the base architecture (used to
        save checkpoints whose structure changed), or ``None`` for a custom model.
    train_config : the recipe's base training configuration (lr, batch size, ...); retraining
        stages scale its learning rate.
    out_dir : the run's output folder; stages write artifacts under it.
    artifacts : files produced so far, by kind (e.g. ``{"ncz": Path(...)}``).
    progress : progress callback for long loops (the CLI draws bars).
    """

    model: nn.Module
    splits: DataSplits
    model_name: str | None
    model_kwargs: dict
    train_config: TrainConfig
    out_dir: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    progress: Progress | None = None


# --------------------------------------------------------------------------------------------
# the shared retraining spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainSpec:
    """How a stage retrains the model after its transform (shared by every such stage).

    Attributes
    ----------
    epochs : retraining epochs (0: none).
    lr_scale : retraining learning rate relative to the recipe's base rate (Han 2015 retrains
        pruned LeNets at 1/10).
    distill : distil from the model as it entered the stage (Hinton 2015 soft targets) with
        these settings; ``None``: plain cross-entropy. A mapping is read as a
        :class:`~nncompress.distill.DistillConfig`.
    augment, l1, weight_decay, regularization_switch_epoch : overrides of the base
        :class:`~nncompress.engine.TrainConfig` while retraining (``None``: the base config's).
    """

    epochs: int = 0
    lr_scale: float = 0.1
    distill: DistillConfig | None = None
    augment: bool | None = None
    l1: float | None = None
    weight_decay: float | None = None
    regularization_switch_epoch: int | None = None

    def __post_init__(self) -> None:
        check(
            is_int(self.epochs) and 0 <= self.epochs <= 100_000,
            "epochs",
            self.epochs,
            "must be an integer in [0, 100000]",
        )
        check(
            is_finite_number(self.lr_scale) and 0 < self.lr_scale <= 100,
            "lr_scale",
            self.lr_scale,
            "must be a number in (0, 100]",
        )
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            object.__setattr__(
                self, "distill", config_from_dict(DistillConfig, self.distill, "distill")
            )
        check(
            self.augment is None or isinstance(self.augment, bool),
            "augment",
            self.augment,
            "must be true, false or null",
        )
        for name in ("l1", "weight_decay"):
            v = getattr(self, name)
            check(v is None or (is_finite_number(v) and 0 <= v <= 1), name, v, "in [0, 1] or null")
        v = self.regularization_switch_epoch
        check(
            v is None or (is_int(v) and v >= 0),
            "regularization_switch_epoch",
            v,
            "must be an integer >= 0 or null",
        )

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this spec's epochs and overrides (the learning rate is scaled by
        :func:`nncompress.engine.finetune` with ``lr_scale``)."""
        changes: dict[str, Any] = {"epochs": self.epochs}
        for name in ("augment", "l1", "weight_decay", "regularization_switch_epoch"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        return base.replace(**changes)

    def run(
        self,
        model: nn.Module,
        splits: DataSplits,
        base: TrainConfig,
        *,
        loss_fn: Callable | None = None,
        val_loader: Any = None,
        progress: Progress | None = None,
    ) -> History:
        """Retrain ``model`` in place: :meth:`train_config` epochs on the train split (with the
        config's augmentation) at ``lr_scale`` times its rate, validating on the held-out split;
        ``loss_fn`` replaces the cross-entropy (e.g. distillation)."""
        cfg = self.train_config(base)
        return finetune(
            model,
            splits.loader("train", cfg.batch_size, seed=cfg.seed, augment=cfg.augment),
            cfg,
            lr_scale=self.lr_scale,
            loss_fn=loss_fn,
            val_loader=val_loader if val_loader is not None else splits.loader("val", 512),
            progress=progress,
        )


@dataclass(frozen=True)
class RetrainKeys:
    """How a stage spells its :class:`RetrainSpec` in a flat mapping.

    ``defaults`` maps the stage's keys to their default values; by default a key is the
    spec's field of the same name, except ``epochs_key`` (e.g. ``finetune_epochs``) for
    ``epochs``. ``build`` replaces that mapping for stages that spell a field differently
    (the decompose stage's ``distill: true, temperature, alpha``).
    """

    defaults: Mapping[str, Any]
    epochs_key: str = "epochs"
    build: Callable[[dict[str, Any]], RetrainSpec] | None = None

    def spec(self, values: dict[str, Any]) -> RetrainSpec:
        if self.build is not None:
            return self.build(values)
        return RetrainSpec(
            **{("epochs" if k == self.epochs_key else k): v for k, v in values.items()}
        )


# --------------------------------------------------------------------------------------------
# stage configs
# --------------------------------------------------------------------------------------------


def _renamed(exc: ConfigError, names: Mapping[str, str]) -> ConfigError:
    """``exc`` with a leading ``field=`` renamed to the stage's key for that field."""
    text = str(exc)
    for old, new in names.items():
        if text.startswith(f"{old}=") and old != new:
            return ConfigError(new + text[len(old) :])
    return exc


def _listed(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_listed(x) for x in v]
    if isinstance(v, dict):
        return {k: _listed(x) for k, x in v.items()}
    return v


class StageConfig:
    """Base of the classes made by :func:`stage_config` (see the module docstring)."""

    #: the family's config class, the keys routed to it and the retraining keys (set by
    #: :func:`stage_config`)
    ALGORITHM: ClassVar[type | None] = None
    ALGORITHM_KEYS: ClassVar[tuple[str, ...]] = ()
    RETRAIN: ClassVar[RetrainKeys | None] = None

    def __post_init__(self) -> None:
        check_field_types(self)  # ints are ints, numbers finite, flags booleans (names the key)
        self._check_options()
        algorithm = self._build_algorithm(self._values(self.ALGORITHM_KEYS))
        if algorithm is not None:
            for key in self.ALGORITHM_KEYS:  # normalised values (lists -> tuples, ...)
                if getattr(self, key) is not None and hasattr(algorithm, key):
                    object.__setattr__(self, key, getattr(algorithm, key))
        retrain = None
        if self.RETRAIN is not None:
            values = self._values(tuple(self.RETRAIN.defaults))
            try:
                retrain = self.RETRAIN.spec(values)
            except ConfigError as exc:
                raise _renamed(exc, {"epochs": self.RETRAIN.epochs_key}) from None
        object.__setattr__(self, "_parts", (algorithm, retrain))
        self._check()

    def _values(self, keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: getattr(self, k) for k in keys}

    # ---- hooks a stage may override ----------------------------------------------------------

    def _check_options(self) -> None:
        """Normalise and validate the stage's own options (before the parts are built)."""

    def _unused_unless(self, applies: bool, keys: tuple[str, ...], when: str) -> None:
        """Refuse any of ``keys`` set to a value other than its default when it does nothing
        (``applies`` is false): an option that does not apply is an error, not ignored."""
        if applies:
            return
        defaults = self.defaults()
        for key in keys:
            value = getattr(self, key)
            if key in defaults and value != defaults[key]:
                raise ConfigError(f"{key}={value!r}: does not apply here; {when}")

    def _build_algorithm(self, values: dict[str, Any]) -> Any:
        """The family's config from its fields (validates them); ``None`` if it has none."""
        return None if self.ALGORITHM is None else self.ALGORITHM(**values)

    def _check(self) -> None:
        """Checks that need the built parts (e.g. an option that constrains the algorithm)."""

    def resume_(self, model: nn.Module) -> None:
        """Rebuild, in place, what this stage left on the model that a checkpoint folds away
        (masks, codebooks), after a recipe resumes from the checkpoint. Default: nothing."""

    #: the stage's keys that select layers by name / glob (``include`` may also hold type
    #: names); each given pattern must select a module of the model
    SELECTION_KEYS: ClassVar[tuple[str, ...]] = ("include", "exclude", "layers", "per_layer")

    def check_model(self, model: nn.Module) -> None:
        """Refuse a layer selection that matches nothing in ``model`` (``layers: [nope]``,
        an ``exclude`` or ``per_layer`` name with a typo): it would silently do nothing. Values
        left at their default are not checked. Raises :class:`ConfigError` naming the key."""
        from ..core.select import unmatched

        keys, defaults = self.keys(), self.defaults()
        for key in self.SELECTION_KEYS:
            if key not in keys:
                continue
            value = getattr(self, key, None)
            if value is None or value == defaults.get(key):
                continue
            pats = [value] if isinstance(value, str) else [str(v) for v in value]
            default = defaults.get(key) or ()
            given = [p for p in pats if not isinstance(default, tuple | list) or p not in default]
            bad = unmatched(given, model, types=key == "include")
            if bad:
                names = [n for n, _ in model.named_modules() if n]
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ConfigError(
                    f"{key}={bad!r}: matches no layer of the model (its layers: {shown})"
                )

    # ---- the built parts -----------------------------------------------------------------------

    @property
    def algorithm(self) -> Any:
        """The family's config (``None`` if the stage has none)."""
        return self._parts[0]

    @property
    def retrain(self) -> RetrainSpec | None:
        """The retraining spec (``None`` if the stage does not retrain)."""
        return self._parts[1]

    # ---- flat mapping -------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        """Every key of the stage's flat mapping."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default of every key."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageConfig:
        """Build from a flat mapping (a recipe stage), naming unknown keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        names = cls.keys()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown}; allowed: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - names already checked
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping (JSON-able; tuples become lists)."""
        return {k: _listed(getattr(self, k)) for k in self.keys()}

    def replace(self, **changes: Any) -> StageConfig:
        return dataclasses.replace(self, **changes)

    def capped(self, epochs: int) -> StageConfig:
        """This config with every epoch count (``epochs``, ``*_epochs``) at most ``epochs``
        (``--quick``)."""
        changes = {}
        for name in self.keys():
            v = getattr(self, name)
            if (name == "epochs" or name.endswith("_epochs")) and is_int(v) and v > epochs:
                changes[name] = epochs
        return self.replace(**changes) if changes else self


def stage_config(
    algorithm: type | None = None,
    *,
    keys: tuple[str, ...] | None = None,
    defaults: Mapping[str, Any] | None = None,
    retrain: RetrainKeys | None = None,
) -> Callable[[type], type]:
    """Class decorator making a stage config: the class body declares the stage's own options
    (annotated fields with defaults) and hooks; the decorator adds the fields of ``algorithm``
    (``keys`` of them, default all, with ``defaults`` overriding theirs) and the retraining
    keys, and makes the class a frozen dataclass deriving from :class:`StageConfig`.
    """

    def wrap(cls: type) -> type:
        if not issubclass(cls, StageConfig):
            raise TypeError(f"{cls.__name__} must derive from StageConfig")
        own = dict(cls.__dict__.get("__annotations__", {}))
        injected: dict[str, Any] = {}
        alg_keys: tuple[str, ...] = ()
        if algorithm is not None:
            by_name = {f.name: f for f in dataclasses.fields(algorithm)}
            alg_keys = tuple(keys) if keys is not None else tuple(by_name)
            for k in alg_keys:
                f = by_name[k]
                if defaults and k in defaults:
                    injected[k] = (f.type, field(default=defaults[k]))
                elif f.default_factory is not dataclasses.MISSING:
                    injected[k] = (f.type, field(default_factory=f.default_factory))
                else:
                    injected[k] = (f.type, field(default=f.default))
        if retrain is not None:
            for k, v in retrain.defaults.items():
                injected[k] = ("Any", field(default=v))
        clash = sorted(set(injected) & set(own))
        if clash:
            raise TypeError(f"{cls.__name__}: options {clash} clash with algorithm/retrain keys")
        for k, (_, f) in injected.items():
            setattr(cls, k, f)
        cls.__annotations__ = {**{k: t for k, (t, _) in injected.items()}, **own}
        cls.ALGORITHM = algorithm
        cls.ALGORITHM_KEYS = alg_keys
        cls.RETRAIN = retrain
        return dataclass(frozen=True)(cls)

    return wrap
