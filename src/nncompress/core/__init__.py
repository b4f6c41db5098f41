"""What every family needs and nothing else: errors, progress events, validation helpers, the
layer selector, module surgery and atomic files. ``core`` imports nothing else of nncompress.
"""

from .errors import CheckpointError, ConfigError, FormatError, NncompressError, SpecError
from .files import atomic_write, atomic_write_json, atomic_write_text
from .modules import (
    folded_copy,
    model_device,
    own_parametrized_class_,
    plain_type,
    set_submodule,
    strip_parametrizations,
    strip_parametrizations_,
)
from .policy import POLICY_FORMAT, Policy
from .progress import Progress, ProgressEvent, ProgressTask, progress_task
from .select import LayerSelector, Selectable, matches_any, name_matches
from .validate import check, config_error, is_int, is_number

__all__ = [
    "POLICY_FORMAT",
    "Policy",
    "CheckpointError",
    "ConfigError",
    "FormatError",
    "LayerSelector",
    "NncompressError",
    "Progress",
    "ProgressEvent",
    "ProgressTask",
    "Selectable",
    "SpecError",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check",
    "config_error",
    "folded_copy",
    "is_int",
    "is_number",
    "matches_any",
    "model_device",
    "name_matches",
    "own_parametrized_class_",
    "plain_type",
    "progress_task",
    "set_submodule",
    "strip_parametrizations",
    "strip_parametrizations_",
]
