"""The explicit stage registry: recipe stage name -> where its config class and run function
live. A new family adds one entry here (and its module in this package); modules are imported
only when a recipe uses them, so a missing optional dependency fails only that stage.

Each config class follows :mod:`nncompress.stages.base`: the family's own config plus the
shared :class:`~nncompress.stages.base.RetrainSpec`, and a ``resume_`` hook.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

from ..core.errors import ConfigError

__all__ = ["STAGES", "StageEntry", "stage_entry"]


class StageEntry(NamedTuple):
    """Module, config class name and run function name of one stage."""

    module: str
    config: str
    run: str


STAGES: dict[str, StageEntry] = {
    "train": StageEntry("nncompress.stages.train", "TrainStageConfig", "run_train_stage"),
    "prune": StageEntry("nncompress.stages.prune", "PruneStageConfig", "run_prune_stage"),
    "filter_prune": StageEntry(
        "nncompress.stages.filter_prune", "FilterPruneStageConfig", "run_filter_prune_stage"
    ),
    "share": StageEntry("nncompress.stages.share", "ShareStageConfig", "run_share_stage"),
    "ecsq": StageEntry("nncompress.stages.ecsq", "ECSQStageConfig", "run_ecsq_stage"),
    "soft_share": StageEntry(
        "nncompress.stages.soft_share", "SoftShareStageConfig", "run_soft_share_stage"
    ),
    "finetune": StageEntry(
        "nncompress.stages.finetune", "FinetuneStageConfig", "run_finetune_stage"
    ),
    "encode": StageEntry("nncompress.stages.encode", "EncodeStageConfig", "run_encode_stage"),
    "quantize": StageEntry(
        "nncompress.stages.quantize", "QuantizeStageConfig", "run_quantize_stage"
    ),
    "search": StageEntry("nncompress.stages.search", "SearchStageConfig", "run_search_stage"),
    "decompose": StageEntry(
        "nncompress.stages.decompose", "DecomposeStageConfig", "run_decompose_stage"
    ),
    "early_exit": StageEntry(
        "nncompress.stages.conditional", "EarlyExitStageConfig", "run_early_exit_stage"
    ),
    "pq": StageEntry("nncompress.stages.pq", "PQStageConfig", "run_pq_stage"),
    "weight_only": StageEntry(
        "nncompress.stages.weight_only", "WeightOnlyStageConfig", "run_weight_only_stage"
    ),
}


def stage_entry(name: str) -> tuple[type, Callable[..., dict]]:
    """Import a registered stage: ``(config class, run function)``.

    Raises :class:`ConfigError` with a clear message for an unknown name or a stage whose
    module is not available (not written yet, or a missing optional dependency).
    """
    if name not in STAGES:
        raise ConfigError(f"stage={name!r}: unknown stage; must be one of {sorted(STAGES)}")
    module_name, cfg_name, run_name = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"stage={name!r}: its module {module_name} is not available ({exc})"
        ) from exc
    try:
        return getattr(module, cfg_name), getattr(module, run_name)
    except AttributeError as exc:
        raise ConfigError(
            f"stage={name!r}: {module_name} does not define {cfg_name} and {run_name}"
        ) from exc
