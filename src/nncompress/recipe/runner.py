"""Recipe runner: run the stages with a checkpoint after each, resume after the last one.

:func:`run_recipe` runs the stages, evaluates the model on the test split after each, writes a
checkpoint per stage (``DIR/stages/NN-name.safetensors``) and ``DIR/state.json``; re-running
resumes after the last finished stage (each finished stage's ``resume_`` hook rebuilds what it
left on the model). The ``encode`` stage writes ``DIR/model.ncz``; the report then decodes that
file into a fresh model and evaluates it, so the reported final accuracy is the accuracy of the
bytes on disk. ``DIR/report.json`` and ``DIR/report.md`` summarise the run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.files import atomic_write_text
from ..core.modules import folded_copy
from ..core.progress import Progress, progress_task
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from ..engine.train import evaluate
from ..stages.base import StageContext
from ..stages.registry import stage_entry
from .plots import write_figures
from .preflight import preflight
from .report import final_report, report_markdown
from .schema import Recipe, StageSpec, jsonable, load_recipe, quick_recipe

__all__ = ["STATE_FORMAT", "run_recipe", "run_status", "weight_stats"]

log = logging.getLogger(__name__)

STATE_FORMAT = "nncompress-run/1"


def weight_stats(model: nn.Module) -> dict[str, Any]:
    """Parameters, nonzeros and an estimate of the values' bytes.

    ``values_bytes`` counts fp32 for every nonzero parameter, except shared layers whose
    nonzero weights count ``ceil(log2 k)`` bits each plus a fp32 codebook; sparse-index
    overhead is not included (the encode stage's file size is the real number).
    """
    from ..quant.kmeans import shared_layers

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


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# run state (state.json)
# --------------------------------------------------------------------------------------------


@dataclass
class RunState:
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


def _load_state(out_dir: Path, digest: str) -> RunState | None:
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
    run = RunState(
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


def run_status(
    recipe: Recipe | str | Path | dict[str, Any], out_dir: str | Path, *, quick: bool = False
) -> dict[str, Any]:
    """What :func:`run_recipe` would resume from in ``out_dir``, without running anything:
    ``{"finished": [stage names], "total": n, "state": "new" | "resume" | "done" | "other"}``
    ('other': the folder holds a run of a different recipe or settings; a folder with files
    but no run state is 'foreign')."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if quick:
        recipe = quick_recipe(recipe)
    out_dir = Path(out_dir)
    n = len(recipe.stages)
    if not (out_dir / "state.json").is_file():
        busy = out_dir.is_dir() and any(out_dir.iterdir())
        return {"finished": [], "total": n, "state": "foreign" if busy else "new"}
    try:
        run = _load_state(out_dir, recipe.digest())
    except ConfigError:
        return {"finished": [], "total": n, "state": "other"}
    names = [e["name"] for e in (run.finished if run else [])]
    state = "new" if not names else "done" if len(names) == n else "resume"
    return {"finished": names, "total": n, "state": state}


def _open_state(out_dir: Path, digest: str, resume: bool) -> RunState:
    run = _load_state(out_dir, digest) if resume else None
    if not resume:
        (out_dir / "state.json").unlink(missing_ok=True)  # an interrupted restart starts over
    return run if run is not None else RunState(digest=digest)


# --------------------------------------------------------------------------------------------
# starting point
# --------------------------------------------------------------------------------------------


def _starting_point(recipe: Recipe):
    """``(model, model_name, model_kwargs, splits)``: the baseline checkpoint, or a fresh
    registry model (seeded with the recipe's training seed) for the recipe's dataset."""
    from ..data import load_dataset
    from ..models import create, default_kwargs

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
        return model, model_name, model_kwargs, splits
    splits = load_dataset(recipe.dataset, recipe.data_dir, **recipe.data_kwargs)
    defaults = default_kwargs(recipe.model, splits.input_shape, splits.num_classes)
    model_kwargs = {**defaults, **recipe.model_kwargs}
    torch.manual_seed(recipe.train.seed)
    return create(recipe.model, **model_kwargs), recipe.model, model_kwargs, splits


def _resume_model(recipe: Recipe, run: RunState, out_dir: Path) -> nn.Module:
    """The model after the last finished stage, with each finished stage's state rebuilt."""
    last = run.finished[-1]
    model, _ = load_checkpoint(out_dir / last["checkpoint"])
    for spec in recipe.stages[: len(run.finished)]:
        spec.config.resume_(model)
    log.info("resuming %s after stage %d (%s)", out_dir, len(run.finished), last["name"])
    return model


# --------------------------------------------------------------------------------------------
# one stage
# --------------------------------------------------------------------------------------------


def _run_stage(
    recipe: Recipe,
    i: int,
    run_fn: Callable[..., dict],
    ctx: StageContext,
    run: RunState,
    test_loader: Any,
) -> None:
    """Run stage ``i``, evaluate, checkpoint, and record it in ``run`` and ``state.json``."""
    spec: StageSpec = recipe.stages[i]
    out_dir = ctx.out_dir
    log.info("stage %d/%d: %s", i + 1, len(recipe.stages), spec.name)
    try:
        spec.config.check_model(ctx.model)  # its layer selections, on the model as it is now
    except ConfigError as exc:
        raise ConfigError(f"stages[{i}] ({spec.name}): {exc}") from None
    t0 = time.perf_counter()
    fields = run_fn(ctx, spec.config) or {}
    wall = time.perf_counter() - t0
    acc = evaluate(ctx.model, test_loader)["accuracy"]
    stats = weight_stats(ctx.model)
    if not recipe.baseline and all(s.name == "train" for s in recipe.stages[: i + 1]):
        # the leading training stages produce the baseline
        run.baseline_accuracy = acc
        run.original_bytes = _dense_bytes(ctx.model)
    ckpt = out_dir / "stages" / f"{i + 1:02d}-{spec.name}.safetensors"
    save_checkpoint(
        folded_copy(ctx.model),
        ckpt,
        model_name=ctx.model_name,
        model_kwargs=ctx.model_kwargs,
        dataset=ctx.splits.describe(),
        metrics={"test_accuracy": acc},
        extra={"recipe": recipe.name, "stage_index": i, "stage": spec.to_dict()},
    )
    size = stats["values_bytes"]
    size_kind = "values estimate (fp32 / codebook bits, no sparse index)"
    if spec.name == "encode" and "ncz" in ctx.artifacts:
        size = ctx.artifacts["ncz"].stat().st_size
        size_kind = "file"
    run.finished.append(
        {
            "index": i,
            "name": spec.name,
            "accuracy": acc,
            "params": stats["params"],
            "nonzeros": stats["nonzeros"],
            "size_bytes": size,
            "size_kind": size_kind,
            "wall_time_s": wall,
            "checkpoint": str(ckpt.relative_to(out_dir)),
            "report": jsonable(fields),
        }
    )
    run.artifacts = {
        k: str(Path(v).relative_to(out_dir)) if Path(v).is_relative_to(out_dir) else str(v)
        for k, v in ctx.artifacts.items()
    }
    write_json(out_dir / "state.json", run.to_dict())
    log.info("stage %s: accuracy %.2f%%, %.1f s", spec.name, acc, wall)


def _before_share(recipe: Recipe, run: RunState, out_dir: Path) -> Path | None:
    """The checkpoint the (last) share stage started from: the stage before it, or the
    recipe's baseline."""
    idx = [i for i, e in enumerate(run.finished) if e["name"] == "share"]
    if not idx:
        return None
    if idx[-1] == 0:
        return Path(recipe.baseline) if recipe.baseline else None
    return out_dir / run.finished[idx[-1] - 1]["checkpoint"]


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
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if quick:
        recipe = quick_recipe(recipe)
    out_dir = Path(out_dir)
    entries = [stage_entry(s.name) for s in recipe.stages]  # imports fail before any work
    preflight(recipe, out_dir, recipe.name)  # data, model, selections, output: before any work
    run = _open_state(out_dir, recipe.digest(), resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "recipe.json", recipe.to_dict())

    model, model_name, model_kwargs, splits = _starting_point(recipe)
    test_loader = splits.loader("test", 512)
    start_index = len(run.finished)
    if start_index:
        model = _resume_model(recipe, run, out_dir)
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
    n = len(recipe.stages)
    with progress_task(progress, "recipe", n, start_index) as task:
        for i in range(start_index, n):
            task.advance(i, stage=recipe.stages[i].name)
            _run_stage(recipe, i, entries[i][1], ctx, run, test_loader)
        task.advance(n)

    report = final_report(recipe, run, ctx, test_loader)
    for e in report["stages"]:  # wall times of earlier invocations are not this run's
        e["this_run"] = e["index"] >= start_index
    report["figures"] = write_figures(
        report, out_dir, before_share=_before_share(recipe, run, out_dir)
    )
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", report_markdown(report))
    return report
