"""Checks a recipe needs beyond its own fields, run before any work (and by ``run --check``).

:func:`nncompress.recipe.load_recipe` validates every field of a recipe by itself. What it
cannot see without the outside world is checked here, cheaply and before a single batch is
trained: that the output folder can be written; that the dataset's files exist; that a
baseline checkpoint loads; that the model's constructor arguments agree with the dataset
(``in_features`` of a 28x28 image is 784) and the model is of a sane size (built on the
``meta`` device: no memory); and that every stage's layer selection (``include``,
``exclude``, ``layers``, ``per_layer``) names layers the model has, for the stages before
the first one that changes the model's structure (later ones are checked when they start).
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CheckpointError, ConfigError
from ..core.files import output_problem
from .schema import Recipe, RecipeError

__all__ = ["MAX_MODEL_PARAMS", "preflight"]

MAX_MODEL_PARAMS = 1 << 28  # a model of the registry built from a recipe (1 GiB of fp32)
# stages after which the module tree may differ (their selections are checked at run time)
RESTRUCTURING = ("decompose", "filter_prune", "prune", "pq", "quantize")


def preflight(recipe: Recipe, out_dir: str | Path | None = None, where: str = "recipe") -> None:
    """Raise a :class:`RecipeError` listing every problem found (see the module docstring)."""
    errors: list[str] = []
    if out_dir is not None:
        problem = output_problem(out_dir, "dir")
        if problem:
            errors.append(f"--out: {problem}")
    model = _model(recipe, errors)
    if model is not None:
        for i, spec in enumerate(recipe.stages):
            try:
                spec.config.check_model(model)
            except ConfigError as exc:
                errors.append(f"stages[{i}] ({spec.name}): {exc}")
            if spec.name in RESTRUCTURING:
                break
    if errors:
        raise RecipeError(errors, where)


def _model(recipe: Recipe, errors: list[str]):
    """The starting model (the baseline's, or the registry model on the meta device)."""
    import torch

    from ..data import DataError, dataset_available, dataset_shape
    from ..engine.checkpoint import load_checkpoint
    from ..models import create, default_kwargs

    model, dataset = None, recipe.dataset
    if recipe.baseline:
        try:
            model, sidecar = load_checkpoint(recipe.baseline)
        except CheckpointError as exc:
            errors.append(f"baseline: {exc}")
            return None
        dataset = dataset or (sidecar.get("dataset") or {}).get("name")
        if not dataset:
            errors.append(f"baseline='{recipe.baseline}' does not record its dataset: add 'data'")
    if dataset:
        try:
            dataset_available(dataset, recipe.data_dir)
        except DataError as exc:
            errors.append(f"data: {exc}")
    if recipe.model is None or dataset is None:
        return model
    shape, classes = dataset_shape(dataset, recipe.data_kwargs)
    needed = default_kwargs(recipe.model, shape, classes)
    for k, v in recipe.model_kwargs.items():
        if k in needed and v != needed[k]:
            errors.append(
                f"model.kwargs.{k}={v!r}: the dataset {dataset!r} needs {needed[k]!r} "
                f"(samples of shape {list(shape)}, {classes} classes); leave it out"
            )
    try:
        with torch.device("meta"):  # no memory: only the structure and the sizes
            model = create(recipe.model, **{**needed, **recipe.model_kwargs})
    except (ValueError, TypeError, RuntimeError) as exc:
        errors.append(f"model: {exc}")
        return None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_MODEL_PARAMS:
        errors.append(
            f"model.kwargs={recipe.model_kwargs}: the model would have {params:,} parameters, "
            f"more than {MAX_MODEL_PARAMS:,}"
        )
        return None
    return model
