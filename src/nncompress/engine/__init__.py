"""Training engine: configs, fit/evaluate/finetune loops, callbacks, seeding, checkpoints."""

from .checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_sidecar,
    save_checkpoint,
    sidecar_path,
)
from .config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from .modspec import SpecError, module_from_spec, module_to_spec, strip_parametrizations
from .train import (
    Callback,
    History,
    ProgressEvent,
    evaluate,
    finetune,
    fit,
    model_device,
    seed_everything,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "ConfigError",
    "History",
    "ProgressEvent",
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
]
