"""Recipes: a YAML description of a compression pipeline, validated up front
(:mod:`.schema`), run with a checkpoint after every stage and resume (:mod:`.runner`), and
summarised in ``report.json`` / ``report.md`` (:mod:`.report`). The stage registry lives in
:mod:`nncompress.stages.registry` and is re-exported here."""

from ..stages.registry import STAGES, stage_entry
from .preflight import preflight
from .report import layer_table_markdown, report_markdown
from .runner import STATE_FORMAT, run_recipe, run_status, weight_stats
from .schema import Recipe, RecipeError, StageSpec, load_recipe, quick_recipe

__all__ = [
    "STAGES",
    "STATE_FORMAT",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "layer_table_markdown",
    "load_recipe",
    "preflight",
    "quick_recipe",
    "report_markdown",
    "run_recipe",
    "run_status",
    "stage_entry",
    "weight_stats",
]
