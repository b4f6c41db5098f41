"""Recipe stages: one adapter per family from its validated config (the family's own config
plus the shared retraining spec) to the library's model transforms, and the stage registry."""

from .base import RetrainKeys, RetrainSpec, StageConfig, StageContext, stage_config
from .registry import STAGES, StageEntry, stage_entry

__all__ = [
    "STAGES",
    "RetrainKeys",
    "RetrainSpec",
    "StageConfig",
    "StageContext",
    "StageEntry",
    "stage_config",
    "stage_entry",
]
