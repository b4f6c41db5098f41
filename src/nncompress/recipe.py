"""Recipes: a YAML description of a compression pipeline, validated up front, run with resume.

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
:data:`STAGES`; modules are imported only when a recipe uses them. Validation collects *every*
error (``stages[2] (share): bits_fc=40: must be in [1, 8]``) before any work starts.

:func:`run_recipe` runs the stages, evaluates the model on the test split after each, writes a
checkpoint per stage (``DIR/stages/NN-name.safetensors``) and ``DIR/state.json``; re-running
resumes after the last finished stage. The ``encode`` stage writes ``DIR/model.ncz``; the
runner then decodes that file into a fresh model and evaluates it, so the reported final
accuracy is the accuracy of the bytes on disk. ``DIR/report.json`` and ``DIR/report.md``
summarise the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.errors import ConfigError
from .core.files import atomic_write_text
from .core.modules import folded_copy
from .core.progress import Progress, progress_task
from .engine.checkpoint import load_checkpoint, save_checkpoint
from .engine.config import TrainConfig, config_from_dict, config_to_dict
from .engine.train import evaluate
from .stages.registry import STAGES, stage_entry

__all__ = [
    "STAGES",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "load_recipe",
    "quick_recipe",
    "run_recipe",
    "stage_entry",
]

log = logging.getLogger(__name__)

_TOP_LEVEL = ("name", "description", "model", "data", "baseline", "train", "quick", "stages")
STATE_FORMAT = "nncompress-run/1"


class RecipeError(ConfigError):
    """A recipe is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str], source: str = "recipe") -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error(s)\n{lines}")


@dataclass(frozen=True)
class StageSpec:
    """One validated stage: its registry name and config object."""

    name: str
    config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.name, **_jsonable(self.config.to_dict())}


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
        d["train"] = _without_defaults(_config_defaults(self.train), d["train"])
        d["stages"] = [
            _without_defaults(s.config.defaults(), sd)
            for s, sd in zip(self.stages, d["stages"], strict=True)
        ]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _without_defaults(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    defaults = {k: _jsonable(v) for k, v in defaults.items()}
    return {k: v for k, v in data.items() if k not in defaults or defaults[k] != v}


def _config_defaults(config: Any) -> dict[str, Any]:
    """Default of every field of a config dataclass."""
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    return obj


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _build_config(cls: type, data: dict[str, Any]) -> Any:
    try:
        return cls.from_dict(data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _name_and_kwargs(value: Any, what: str, errors: list[str]) -> tuple[str | None, dict]:
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict):
        extra = dict(value)
        name = extra.pop("name", None)
        if not isinstance(name, str):
            errors.append(f"{what}.name={name!r}: must be a string")
            return None, {}
        kwargs = extra.pop("kwargs", {})
        if not isinstance(kwargs, dict):
            errors.append(f"{what}.kwargs={kwargs!r}: must be a mapping")
            kwargs = {}
        return name, {**extra, **kwargs}
    errors.append(f"{what}={value!r}: must be a name or a mapping with 'name'")
    return None, {}


def _resolve_path(value: str, base_dir: Path | None) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or base_dir is None:
        return p
    alt = base_dir / p
    return alt if alt.exists() else p


def load_recipe(
    source: str | Path | dict[str, Any], *, base_dir: str | Path | None = None
) -> Recipe:
    """Parse and validate a recipe (YAML file path or mapping) before any work is done.

    Every problem is collected and reported at once in a :class:`RecipeError`.
    """
    from .data import DATASETS
    from .models import MODELS

    where = "recipe"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise RecipeError([f"recipe file '{path}' does not exist"], where)
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError([f"not valid YAML: {exc}"], where) from exc
        base_dir = Path(base_dir) if base_dir else path.parent
        default_name = path.stem
    else:
        data = source
        base_dir = Path(base_dir) if base_dir else None
        default_name = "recipe"
    if not isinstance(data, dict):
        raise RecipeError([f"top level must be a mapping, got {type(data).__name__}"], where)

    errors: list[str] = []
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        errors.append(f"unknown top-level key(s) {unknown}; allowed: {list(_TOP_LEVEL)}")

    model, model_kwargs = _name_and_kwargs(data.get("model"), "model", errors)
    if model is not None and model not in MODELS:
        errors.append(f"model={model!r}: must be one of {sorted(MODELS)}")
    dataset, data_kwargs = _name_and_kwargs(data.get("data"), "data", errors)
    data_dir = data_kwargs.pop("data_dir", None)
    if dataset is not None and dataset not in DATASETS:
        errors.append(f"data={dataset!r}: must be one of {sorted(DATASETS)}")

    baseline = data.get("baseline")
    if baseline is not None:
        if not isinstance(baseline, str):
            errors.append(f"baseline={baseline!r}: must be a path to a .safetensors checkpoint")
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

    train = TrainConfig()
    if "train" in data:
        try:
            train = config_from_dict(TrainConfig, data["train"] or {}, "train")
        except ConfigError as exc:
            errors.append(str(exc))

    quick_epochs = 1
    quick = data.get("quick") or {}
    if not isinstance(quick, dict) or set(quick) - {"epochs"}:
        errors.append(f"quick={quick!r}: must be a mapping with only 'epochs'")
    else:
        quick_epochs = quick.get("epochs", 1)
        if not isinstance(quick_epochs, int) or quick_epochs < 1:
            errors.append(f"quick.epochs={quick_epochs!r}: must be an integer >= 1")
            quick_epochs = 1

    stages: list[StageSpec] = []
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        errors.append(f"stages={raw_stages!r}: must be a non-empty list of {{stage: NAME, ...}}")
        raw_stages = []
    for i, item in enumerate(raw_stages):
        if not isinstance(item, dict) or not isinstance(item.get("stage"), str):
            errors.append(f"stages[{i}]: must be a mapping with a 'stage' name, got {item!r}")
            continue
        fields = dict(item)
        name = fields.pop("stage")
        try:
            cls, _ = stage_entry(name)
            stages.append(StageSpec(name, _build_config(cls, fields)))
        except ConfigError as exc:
            errors.append(f"stages[{i}] ({name}): {exc}")
    names = [s.name for s in stages]
    if "encode" in names and names.index("encode") != len(names) - 1 and not errors:
        errors.append(f"stages[{names.index('encode')}] (encode): must be the last stage")

    rname = data.get("name", default_name)
    if not isinstance(rname, str):
        errors.append(f"name={rname!r}: must be a string")
    if errors:
        raise RecipeError(errors, where)
    return Recipe(
        stages=tuple(stages),
        train=train,
        model=model,
        model_kwargs=model_kwargs,
        dataset=dataset,
        data_dir=data_dir,
        data_kwargs=data_kwargs,
        baseline=baseline,
        quick_epochs=quick_epochs,
        name=rname,
        description=str(data.get("description", "")),
    )


def quick_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every epoch count capped at ``recipe.quick_epochs`` (``--quick``)."""
    cap = recipe.quick_epochs
    return dataclasses.replace(
        recipe,
        train=recipe.train.replace(epochs=min(recipe.train.epochs, cap)),
        stages=tuple(StageSpec(s.name, s.config.capped(cap)) for s in recipe.stages),
    )


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _default_model_kwargs(name: str, splits) -> dict[str, Any]:
    shape = splits.input_shape
    kwargs: dict[str, Any] = {"num_classes": splits.num_classes}
    if name == "lenet-300-100":
        kwargs["in_features"] = int(math.prod(shape))
    elif name in ("lenet-5", "vgg-small"):
        kwargs.update(in_channels=shape[0], image_size=shape[-1])
    else:
        kwargs["in_channels"] = shape[0]
    return kwargs


def weight_stats(model: nn.Module) -> dict[str, Any]:
    """Parameters, nonzeros and an estimate of the values' bytes.

    ``values_bytes`` counts fp32 for every nonzero parameter, except shared layers whose
    nonzero weights count ``ceil(log2 k)`` bits each plus a fp32 codebook; sparse-index
    overhead is not included (the encode stage's file size is the real number).
    """
    from .quant.kmeans import shared_layers

    shared = shared_layers(model)
    params = nonzeros = 0
    bits = 0.0
    shared_weights = set()
    for name, p in shared.items():
        m = model.get_submodule(name)
        nnz = int(p.mask.sum())
        shared_weights.add(id(m.parametrizations["weight"].original))
        params += p.mask.numel()
        nonzeros += nnz
        bits += nnz * max(1, math.ceil(math.log2(max(p.k, 2)))) + 32 * p.k
    for pname, t in model.named_parameters():
        if id(t) in shared_weights or pname.endswith(".codebook"):
            continue
        if ".parametrizations." in pname and not pname.endswith(".original"):
            continue
        owner = pname.rsplit(".parametrizations.", 1)[0] if ".parametrizations." in pname else None
        val = model.get_submodule(owner).weight if owner else t
        params += val.numel()
        nnz = int((val != 0).sum())
        nonzeros += nnz
        bits += 32 * nnz
    return {"params": params, "nonzeros": nonzeros, "values_bytes": int(math.ceil(bits / 8))}


def _dense_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters stored densely in fp32 (the baseline size)."""
    plain = folded_copy(model)
    return sum(4 * p.numel() for p in plain.parameters())


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


@dataclass
class _Run:
    """Mutable state of one run (written to ``state.json`` after every stage)."""

    digest: str
    finished: list[dict[str, Any]] = field(default_factory=list)
    baseline_accuracy: float | None = None
    original_bytes: int | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "recipe_sha256": self.digest,
            "finished": self.finished,
            "baseline_accuracy": self.baseline_accuracy,
            "original_bytes": self.original_bytes,
            "artifacts": self.artifacts,
        }


def _load_state(out_dir: Path, digest: str) -> _Run | None:
    path = out_dir / "state.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'{path}' is not valid JSON ({exc}); use --no-resume") from exc
    if data.get("format") != STATE_FORMAT:
        raise ConfigError(f"'{path}': not a run state ({STATE_FORMAT}); use --no-resume")
    if data.get("recipe_sha256") != digest:
        raise ConfigError(
            f"'{out_dir}' holds a run of a different recipe (or other --quick setting): "
            "use --no-resume to start over, or another output folder"
        )
    run = _Run(
        digest=digest,
        baseline_accuracy=data.get("baseline_accuracy"),
        original_bytes=data.get("original_bytes"),
        artifacts=dict(data.get("artifacts") or {}),
    )
    # keep the finished prefix whose checkpoints still exist
    for entry in data.get("finished") or []:
        ckpt = out_dir / entry.get("checkpoint", "")
        if not ckpt.is_file():
            break
        run.finished.append(entry)
    return run


def run_recipe(
    recipe: Recipe | str | Path | dict[str, Any],
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    resume: bool = True,
    quick: bool = False,
) -> dict[str, Any]:
    """Run a recipe's stages and return the report (also written to ``out_dir``).

    Parameters
    ----------
    recipe : a :class:`Recipe`, or a YAML path / mapping given to :func:`load_recipe`.
    out_dir : output folder: ``stages/NN-name.safetensors`` (+ JSON sidecars) after every
        stage, ``state.json``, ``model.ncz`` (encode stage), ``report.json``, ``report.md``.
    resume : continue after the last stage finished by a previous run into ``out_dir`` (its
        masks and shared weights are rebuilt from the checkpoint: zeros become masks, layers
        with few distinct values become codebooks). ``False`` starts over.
    quick : cap every epoch count at the recipe's ``quick.epochs`` (a fast smoke run).

    Returns
    -------
    The report dict: ``baseline_accuracy``, ``final_accuracy`` (of the decoded ``model.ncz``
    when the recipe encodes), ``original_bytes`` (dense fp32 parameters), ``compressed_bytes``,
    ``compression_ratio``, ``stages`` (name, accuracy, nonzeros, size, wall time, fields).
    """
    from .data import load_dataset
    from .models import create
    from .stages.base import StageContext

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if quick:
        recipe = quick_recipe(recipe)
    out_dir = Path(out_dir)
    entries = [stage_entry(s.name) for s in recipe.stages]  # imports fail before any work
    digest = recipe.digest()
    run = _load_state(out_dir, digest) if resume else None
    if not resume:
        (out_dir / "state.json").unlink(missing_ok=True)  # an interrupted restart starts over
    if run is None:
        run = _Run(digest=digest)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "recipe.json", recipe.to_dict())

    # starting point and data
    if recipe.baseline:
        model, sidecar = load_checkpoint(recipe.baseline)
        arch = sidecar["architecture"]
        model_name, model_kwargs = arch.get("model"), dict(arch.get("kwargs") or {})
        dataset = recipe.dataset or (sidecar.get("dataset") or {}).get("name")
        if not dataset:
            raise ConfigError(
                f"baseline='{recipe.baseline}' does not record its dataset: add 'data' to the recipe"
            )
        splits = load_dataset(dataset, recipe.data_dir, **recipe.data_kwargs)
    else:
        splits = load_dataset(recipe.dataset, recipe.data_dir, **recipe.data_kwargs)
        model_name = recipe.model
        model_kwargs = {**_default_model_kwargs(recipe.model, splits), **recipe.model_kwargs}
        torch.manual_seed(recipe.train.seed)
        model = create(model_name, **model_kwargs)
    test_loader = splits.loader("test", 512)

    start_index = len(run.finished)
    if start_index:
        last = run.finished[-1]
        model, _ = load_checkpoint(out_dir / last["checkpoint"])
        for spec in recipe.stages[:start_index]:  # each stage rebuilds what it left on the model
            spec.config.resume_(model)
        log.info("resuming %s after stage %d (%s)", out_dir, start_index, last["name"])
    else:
        run.original_bytes = _dense_bytes(model)
        if recipe.baseline:
            run.baseline_accuracy = evaluate(model, test_loader)["accuracy"]

    ctx = StageContext(
        model=model,
        splits=splits,
        model_name=model_name,
        model_kwargs=model_kwargs,
        train_config=recipe.train,
        out_dir=out_dir,
        artifacts={k: out_dir / v for k, v in run.artifacts.items()},
        progress=progress,
    )
    stages_dir = out_dir / "stages"
    n = len(recipe.stages)
    with progress_task(progress, "recipe", n, start_index) as task:
        for i in range(start_index, n):
            spec = recipe.stages[i]
            _, run_fn = entries[i]
            task.advance(i, stage=spec.name)
            log.info("stage %d/%d: %s", i + 1, n, spec.name)
            t0 = time.perf_counter()
            fields = run_fn(ctx, spec.config) or {}
            wall = time.perf_counter() - t0
            acc = evaluate(ctx.model, test_loader)["accuracy"]
            stats = weight_stats(ctx.model)
            if not recipe.baseline and all(s.name == "train" for s in recipe.stages[: i + 1]):
                # the leading training stages produce the baseline
                run.baseline_accuracy = acc
                run.original_bytes = _dense_bytes(ctx.model)
            ckpt = stages_dir / f"{i + 1:02d}-{spec.name}.safetensors"
            save_checkpoint(
                folded_copy(ctx.model),
                ckpt,
                model_name=model_name,
                model_kwargs=model_kwargs,
                dataset=splits.describe(),
                metrics={"test_accuracy": acc},
                extra={"recipe": recipe.name, "stage_index": i, "stage": spec.to_dict()},
            )
            size = stats["values_bytes"]
            size_kind = "values estimate (fp32 / codebook bits, no sparse index)"
            if spec.name == "encode" and "ncz" in ctx.artifacts:
                size = ctx.artifacts["ncz"].stat().st_size
                size_kind = "file"
            entry = {
                "index": i,
                "name": spec.name,
                "accuracy": acc,
                "params": stats["params"],
                "nonzeros": stats["nonzeros"],
                "size_bytes": size,
                "size_kind": size_kind,
                "wall_time_s": wall,
                "checkpoint": str(ckpt.relative_to(out_dir)),
                "report": _jsonable(fields),
            }
            run.finished.append(entry)
            run.artifacts = {
                k: str(Path(v).relative_to(out_dir)) if Path(v).is_relative_to(out_dir) else str(v)
                for k, v in ctx.artifacts.items()
            }
            _write_json(out_dir / "state.json", run.to_dict())
            log.info("stage %s: accuracy %.2f%%, %.1f s", spec.name, acc, wall)
        task.advance(n)

    report = _final_report(recipe, run, ctx, test_loader, out_dir)
    _write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    return report


def _final_report(recipe: Recipe, run: _Run, ctx, test_loader, out_dir: Path) -> dict[str, Any]:
    last_acc = run.finished[-1]["accuracy"] if run.finished else None
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "model": ctx.model_name,
        "dataset": ctx.splits.name,
        "baseline_accuracy": run.baseline_accuracy,
        "final_accuracy": last_acc,
        "final_accuracy_source": "model in memory after the last stage",
        "original_bytes": run.original_bytes,
        "compressed_bytes": None,
        "compression_ratio": None,
        "stages": run.finished,
        "layers": [],
    }
    ncz = ctx.artifacts.get("ncz")
    if ncz is not None and Path(ncz).is_file():
        from .stages.encode import decode_to_model, layer_table

        decoded = decode_to_model(Path(ncz), ctx.model_name, ctx.model_kwargs)
        report["final_accuracy"] = evaluate(decoded, test_loader)["accuracy"]
        report["final_accuracy_source"] = f"decoded {Path(ncz).name}"
        size = Path(ncz).stat().st_size
        report["compressed_bytes"] = size
        if run.original_bytes:
            report["compression_ratio"] = run.original_bytes / size
        encode_entry = next((e for e in run.finished if e["name"] == "encode"), None)
        if encode_entry is not None:
            report["layers"] = layer_table(encode_entry["report"])
    if report["baseline_accuracy"] is not None and report["final_accuracy"] is not None:
        report["accuracy_drop"] = report["baseline_accuracy"] - report["final_accuracy"]
    return report


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def report_markdown(report: dict[str, Any]) -> str:
    """The run report as markdown: summary, stages, and the per-layer table of Deep Compression
    Tables 2-3 (weights kept, weight bits and index bits after P+Q and after H, compression)."""
    lines = [f"# {report.get('recipe')}: {report.get('model')} on {report.get('dataset')}", ""]
    ob, cb = report.get("original_bytes"), report.get("compressed_bytes")
    lines += [
        f"- baseline accuracy: {_fmt(report.get('baseline_accuracy'))}%",
        f"- final accuracy: {_fmt(report.get('final_accuracy'))}% "
        f"({report.get('final_accuracy_source')})",
        f"- original size (dense fp32 parameters): {_fmt(ob)} bytes",
        f"- compressed size: {_fmt(cb)} bytes",
        f"- compression ratio: {_fmt(report.get('compression_ratio'), '.1f')}x",
        "",
        "| # | stage | test acc. % | nonzeros | size (bytes) | wall (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for e in report.get("stages", []):
        lines.append(
            f"| {e['index'] + 1} | {e['name']} | {_fmt(e['accuracy'])} | {e['nonzeros']:,} | "
            f"{e['size_bytes']:,}{'' if e['size_kind'] == 'file' else ' (est.)'} | "
            f"{e['wall_time_s']:.1f} |"
        )
    layers = report.get("layers") or []
    if layers:
        lines += ["", layer_table_markdown(layers)]
    return "\n".join(lines) + "\n"


def layer_table_markdown(layers: list[dict[str, Any]]) -> str:
    """Markdown of :func:`nncompress.stages.encode.layer_table` rows (Deep Compression
    Tables 2-3 layout)."""
    lines = [
        "| layer | weights | kept % | weight bits P+Q | weight bits H | index bits P+Q | "
        "index bits H | compress rate P+Q | compress rate P+Q+H |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in layers:
        lines.append(
            f"| {r['name']} | {r['params']:,} | {_fmt(r['kept_percent'], '.1f')} | "
            f"{_fmt(r['weight_bits_pq'], '.1f')} | {_fmt(r['weight_bits_h'], '.2f')} | "
            f"{_fmt(r['index_bits_pq'], '.1f')} | {_fmt(r['index_bits_h'], '.2f')} | "
            f"{_fmt(r['rate_pq'], '.1f')}x | {_fmt(r['rate_h'], '.1f')}x |"
        )
    return "\n".join(lines)
