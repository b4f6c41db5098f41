"""Recipe schema: parse and validate a YAML recipe up front, collecting every error.

A recipe names the starting point, the base training configuration and an ordered list of
stages (Deep Compression = prune -> share -> finetune -> encode, SPEC section 8)::

    model: lenet-300-100          # registry name, or {name: ..., kwargs: {...}}
    data: fashion-mnist           # dataset name, or {name: ..., data_dir: ...}
    # baseline: path/to/model.safetensors   (instead of model; data then defaults to its dataset)
    train: {epochs: 10, lr: 0.05}             # base TrainConfig
    quick: {epochs: 1}                        # caps used by --quick
    stages:
      - {stage: train}
      - {stage: prune, ...}
      - {stage: share, bits_fc: 5}
      - {stage: finetune, epochs: 3}
      - {stage: encode}

Stage names map to ``(module, config class, run function)`` through the explicit registry
:data:`nncompress.stages.STAGES`; modules are imported only when a recipe uses them.
Validation collects *every* error (``stages[2] (share): bits_fc=40: must be in [1, 8]``)
before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.validate import first_non_finite, is_int
from ..engine.config import TrainConfig, config_from_dict, config_to_dict
from ..stages.registry import stage_entry

__all__ = ["Recipe", "RecipeError", "StageSpec", "jsonable", "load_recipe", "quick_recipe"]

_TOP_LEVEL = ("name", "description", "model", "data", "baseline", "train", "quick", "stages")


class RecipeError(ConfigError):
    """A recipe is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str], source: str = "recipe") -> None:
        self.errors = list(errors)
        if len(self.errors) == 1:  # one error: one line
            super().__init__(f"{source}: {self.errors[0]}")
            return
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} errors\n{lines}")


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists, paths as strings, non-finite floats as strings and
    dataclasses as dicts (what ``json.dumps`` writes the same way every time)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    return obj


@dataclass(frozen=True)
class StageSpec:
    """One validated stage: its registry name and config object."""

    name: str
    config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.name, **jsonable(self.config.to_dict())}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring)."""

    stages: tuple[StageSpec, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    data_dir: str | None = None
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    quick_epochs: int = 1
    name: str = "recipe"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.baseline:
            out["baseline"] = self.baseline
        if self.model:
            out["model"] = {"name": self.model, "kwargs": dict(self.model_kwargs)}
        if self.dataset:
            out["data"] = {"name": self.dataset, "data_dir": self.data_dir, **self.data_kwargs}
        out["train"] = config_to_dict(self.train)
        out["quick"] = {"epochs": self.quick_epochs}
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form (a resumed run must match it).

        Config fields at their default value are left out, so a library release that adds a
        field (with a default) does not invalidate runs in progress.
        """
        d = self.to_dict()
        d.pop("description", None)
        train_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        d["train"] = _without_defaults(train_defaults, d["train"])
        d["stages"] = [
            _without_defaults(s.config.defaults(), sd)
            for s, sd in zip(self.stages, d["stages"], strict=True)
        ]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _without_defaults(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    defaults = {k: jsonable(v) for k, v in defaults.items()}
    return {k: v for k, v in data.items() if k not in defaults or defaults[k] != v}


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _name_and_kwargs(value: Any, what: str, errors: list[str]) -> tuple[str | None, dict]:
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict):
        extra = dict(value)
        name = extra.pop("name", None)
        if not isinstance(name, str):
            errors.append(f"{what}.name={name!r:.80}: must be a string")
            return None, {}
        kwargs = extra.pop("kwargs", {})
        if not isinstance(kwargs, dict):
            errors.append(f"{what}.kwargs={kwargs!r:.80}: must be a mapping")
            kwargs = {}
        return name, {**extra, **kwargs}
    errors.append(f"{what}={value!r:.80}: must be a name or a mapping with 'name'")
    return None, {}


def _resolve_path(value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or base_dir is None:
        return p
    alt = base_dir / p
    return alt if alt.exists() else p


MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


def _strict_loader(where: str):
    """A ``yaml.SafeLoader`` that refuses anchors and aliases (a "billion laughs" recipe
    expands exponentially when it is printed, digested or dumped), duplicate keys (the second
    silently won) and nesting deeper than ``MAX_YAML_DEPTH``, naming the line."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):  # type: ignore[override]
            event = self.peek_event()
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise RecipeError(
                    [
                        f"line {line}: YAML anchors and aliases (&name / *name) are not allowed "
                        "in recipes; write the values out"
                    ],  # fmt: skip
                    where,
                )
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise RecipeError([f"line {line}: nested more than {MAX_YAML_DEPTH} levels"], where)
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node, deep=False):  # type: ignore[override]
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise RecipeError(
                            [
                                f"line {line}: duplicate key {key!r} (first on line {seen[key]}); "
                                "each key may appear once"
                            ],  # fmt: skip
                            where,
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor reports it
                    pass
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2 floats without a dot (1e-3, 1e400): PyYAML (YAML 1.1) would read them as
    # strings, and 1e400 must be refused as infinite, not as a string
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def _read(
    source: str | Path | dict[str, Any], base_dir: str | Path | None
) -> tuple[Any, str, Path | None, str]:
    """``(data, where, base_dir, default name)`` of a YAML file path or a mapping."""
    if not isinstance(source, (str, Path)):
        return source, "recipe", Path(base_dir) if base_dir else None, "recipe"
    path = Path(source)
    if not path.is_file():
        raise RecipeError([f"recipe file '{path}' does not exist"], str(path))
    import yaml

    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(
            [f"{path.stat().st_size} bytes: a recipe is at most {MAX_RECIPE_BYTES} bytes"],
            str(path),
        )
    try:
        text = path.read_text()
        data = yaml.load(text, Loader=_strict_loader(str(path)))  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as exc:
        raise RecipeError([f"not UTF-8 text: {exc}"], str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([f"{at}not valid YAML ({problem})"], str(path)) from exc
    return data, str(path), Path(base_dir) if base_dir else path.parent, path.stem


def _start(data: dict, base_dir: Path | None, errors: list[str]) -> dict[str, Any]:
    """The starting point: model (+ kwargs) and dataset, or a baseline checkpoint."""
    from ..data import DATASETS, check_dataset_options
    from ..models import MODELS, check_kwargs

    model, model_kwargs = _name_and_kwargs(data.get("model"), "model", errors)
    if model is not None and model not in MODELS:
        errors.append(f"model={model!r:.80}: must be one of {sorted(MODELS)}")
    elif model is not None:
        try:
            check_kwargs(model, model_kwargs)
        except ValueError as exc:
            errors.append(f"model.kwargs: {exc}")
    dataset, data_kwargs = _name_and_kwargs(data.get("data"), "data", errors)
    data_dir = data_kwargs.pop("data_dir", None)
    if data_dir is not None and not isinstance(data_dir, str):
        errors.append(f"data.data_dir={data_dir!r:.80}: must be a folder path (a string)")
        data_dir = None
    if dataset is not None and dataset not in DATASETS:
        errors.append(f"data={dataset!r:.80}: must be one of {sorted(DATASETS)}")
    elif dataset is not None:
        try:
            check_dataset_options(dataset, data_kwargs)
        except ValueError as exc:
            errors.append(str(exc))
    baseline = data.get("baseline")
    if baseline is not None:
        if not isinstance(baseline, str):
            errors.append(f"baseline={baseline!r:.80}: must be a path to a .safetensors checkpoint")
            baseline = None
        else:
            bpath = _resolve_path(baseline, base_dir)
            if not bpath.is_file():
                errors.append(f"baseline='{baseline}': file does not exist")
            baseline = str(bpath)
    if baseline is None and model is None:
        errors.append("give either 'model' (with 'data') or 'baseline'")
    if baseline is not None and model is not None:
        errors.append("give 'model' or 'baseline', not both")
    if model is not None and dataset is None:
        errors.append("'model' needs 'data' (a dataset name)")
    return {
        "model": model,
        "model_kwargs": model_kwargs,
        "dataset": dataset,
        "data_dir": data_dir,
        "data_kwargs": data_kwargs,
        "baseline": baseline,
    }


def _training(data: dict, errors: list[str]) -> dict[str, Any]:
    """The base training config and the ``--quick`` epoch cap."""
    train = TrainConfig()
    if "train" in data:
        try:
            train = config_from_dict(TrainConfig, data["train"] or {}, "train")
        except ConfigError as exc:
            errors.append(str(exc))
    quick_epochs = 1
    quick = data.get("quick") or {}
    if not isinstance(quick, dict) or set(quick) - {"epochs"}:
        errors.append(f"quick={quick!r:.80}: must be a mapping with only 'epochs'")
    else:
        quick_epochs = quick.get("epochs", 1)
        if not is_int(quick_epochs) or not 1 <= quick_epochs <= 1000:
            errors.append(f"quick.epochs={quick_epochs!r:.80}: must be an integer in [1, 1000]")
            quick_epochs = 1
    return {"train": train, "quick_epochs": quick_epochs}


def _stages(raw_stages: Any, errors: list[str]) -> list[StageSpec]:
    """Every stage's config, built through the registry (errors name the stage)."""
    stages: list[StageSpec] = []
    if not isinstance(raw_stages, list) or not raw_stages:
        errors.append(
            f"stages={raw_stages!r:.80}: must be a non-empty list of {{stage: NAME, ...}}"
        )
        raw_stages = []
    for i, item in enumerate(raw_stages):
        if not isinstance(item, dict) or not isinstance(item.get("stage"), str):
            errors.append(f"stages[{i}]: must be a mapping with a 'stage' name, got {item!r:.80}")
            continue
        fields = dict(item)
        name = fields.pop("stage")
        try:
            cls, _ = stage_entry(name)
            stages.append(StageSpec(name, cls.from_dict(fields)))
        except ConfigError as exc:
            errors.append(f"stages[{i}] ({name}): {exc}")
    names = [s.name for s in stages]
    if "encode" in names and names.index("encode") != len(names) - 1 and not errors:
        errors.append(f"stages[{names.index('encode')}] (encode): must be the last stage")
    errors.extend(_order_errors(names))
    for i, s in enumerate(stages):
        if getattr(s.config, "allocate", None) == "policy" and (
            getattr(s.config, "policy_file", None) is None and "search" not in names[:i]
        ):
            errors.append(
                f"stages[{i}] ({s.name}): allocate='policy' needs a 'search' stage before it, "
                "or policy_file=PATH"
            )
    return stages


# a stage of the first kind may not follow one of the second: pruning or decomposing weights
# after they were shared / quantized would throw the codebook away (issue 19)
_PRUNING = ("prune", "filter_prune", "decompose")
_SHARING = ("share", "pq", "quantize", "ecsq", "soft_share")


def _order_errors(names: list[str]) -> list[str]:
    errors = []
    for j, later in enumerate(names):
        if later not in _PRUNING:
            continue
        first = next((i for i, n in enumerate(names[:j]) if n in _SHARING), None)
        if first is not None:
            errors.append(
                f"stages[{j}] ({later}): must come before stages[{first}] ({names[first]}); "
                f"order: {', '.join(_PRUNING)} before {', '.join(_SHARING)}"
            )
    return errors


def load_recipe(
    source: str | Path | dict[str, Any], *, base_dir: str | Path | None = None
) -> Recipe:
    """Parse and validate a recipe (YAML file path or mapping) before any work is done.

    Every problem is collected and reported at once in a :class:`RecipeError`.
    """
    data, where, base_dir, default_name = _read(source, base_dir)
    if not isinstance(data, dict):
        raise RecipeError([f"top level must be a mapping, got {type(data).__name__}"], where)
    bad = first_non_finite(data)
    if bad is not None:  # lr: .inf, lr: 1e400, sparsity: .nan
        raise RecipeError([f"{bad}: not a finite number; every number must be finite"], where)
    errors: list[str] = []
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        errors.append(f"unknown top-level key(s) {unknown}; allowed: {list(_TOP_LEVEL)}")
    start = _start(data, base_dir, errors)
    training = _training(data, errors)
    stages = _stages(data.get("stages"), errors)
    rname = data.get("name", default_name)
    if not isinstance(rname, str) or len(rname) > 200:
        errors.append(f"name={rname!r:.80}: must be a string of at most 200 characters")
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > 10_000:
        errors.append(f"description={description!r:.80}: must be a string (<= 10000 chars)")
    if errors:
        raise RecipeError(errors, where)
    return Recipe(
        stages=tuple(stages),
        name=rname,
        description=description,
        **start,
        **training,
    )


def quick_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every epoch count capped at ``recipe.quick_epochs`` (``--quick``)."""
    cap = recipe.quick_epochs
    return dataclasses.replace(
        recipe,
        train=recipe.train.replace(epochs=min(recipe.train.epochs, cap)),
        stages=tuple(StageSpec(s.name, s.config.capped(cap)) for s in recipe.stages),
    )
