"""Training engine: configs, fit/evaluate/finetune loops, callbacks, seeding, checkpoints and
architecture description.

``ConfigError``, ``ProgressEvent``, ``atomic_write``, ``model_device``, ``SpecError``,
``CheckpointError`` and ``strip_parametrizations`` live in :mod:`nncompress.core` and are
re-exported here for existing callers.
"""

from ..core.errors import CheckpointError, ConfigError, SpecError
from ..core.files import atomic_write
from ..core.modules import model_device, strip_parametrizations, strip_parametrizations_
from ..core.progress import ProgressEvent
from .checkpoint import load_checkpoint, read_sidecar, save_checkpoint, sidecar_path
from .config import TrainConfig, config_from_dict, config_to_dict
from .modspec import module_from_spec, module_to_spec
from .train import (
    Callback,
    EarlyStopping,
    History,
    L1ThenL2,
    RestoreBest,
    evaluate,
    finetune,
    fit,
    seed_everything,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "ConfigError",
    "EarlyStopping",
    "History",
    "L1ThenL2",
    "ProgressEvent",
    "RestoreBest",
    "SpecError",
    "TrainConfig",
    "atomic_write",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "finetune",
    "fit",
    "load_checkpoint",
    "model_device",
    "module_from_spec",
    "module_to_spec",
    "read_sidecar",
    "save_checkpoint",
    "seed_everything",
    "sidecar_path",
    "strip_parametrizations",
    "strip_parametrizations_",
]
