"""nncompress: compress trained PyTorch networks for constrained devices.

Importing the package runs nothing; subpackages are imported on first use of their names.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: the technique families (one folder each). None imports another; the architecture test
#: (tests/test_architecture.py) checks it, and nncompress.engine.modspec imports them to find
#: the module types they register.
FAMILIES = ("prune", "quant", "lowrank", "distill", "conditional", "policy")

# public name -> submodule that defines it (resolved lazily, PEP 562)
_EXPORTS: dict[str, str] = {
    "DataSplits": "nncompress.data",
    "load_dataset": "nncompress.data",
    "fashion_mnist": "nncompress.data",
    "mnist": "nncompress.data",
    "digits": "nncompress.data",
    "synthetic": "nncompress.data",
    "create_model": "nncompress.models",
    "TrainConfig": "nncompress.engine",
    "fit": "nncompress.engine",
    "evaluate": "nncompress.engine",
    "finetune": "nncompress.engine",
    "save_checkpoint": "nncompress.engine",
    "load_checkpoint": "nncompress.engine",
    "model_stats": "nncompress.stats",
    "measure_latency": "nncompress.stats",
    "FormatError": "nncompress.io",
    "EncodeConfig": "nncompress.io",
    "save_compressed": "nncompress.io",
    "decode_file": "nncompress.io",
    "load_compressed": "nncompress.io",
    "inspect_file": "nncompress.io",
    "round_for_storage_": "nncompress.io",
    "load_recipe": "nncompress.recipe",
    "run_recipe": "nncompress.recipe",
    "LayerSelector": "nncompress.core",
    "magnitude_mask": "nncompress.prune",
    "kmeans_1d": "nncompress.quant",
    "KMeansQuantizer": "nncompress.quant",
    "quantize_affine": "nncompress.quant",
    "huffman_encode": "nncompress.coding",
    "huffman_decode": "nncompress.coding",
    "load_model_file": "nncompress.io",
    "MagnitudeConfig": "nncompress.prune",
    "prune_": "nncompress.prune",
    "prune_filters_": "nncompress.prune",
    "FilterPruneConfig": "nncompress.prune",
    "KMeansConfig": "nncompress.quant",
    "share_weights_": "nncompress.quant",
    "PTQConfig": "nncompress.quant",
    "quantize_ptq": "nncompress.quant",
    "export_onnx": "nncompress.quant",
    "WeightOnlyConfig": "nncompress.quant",
    "quantize_weights_": "nncompress.quant",
    "DecomposeConfig": "nncompress.lowrank",
    "decompose_": "nncompress.lowrank",
    "DistillConfig": "nncompress.distill",
    "distillation_loss": "nncompress.distill",
    "ExitConfig": "nncompress.conditional",
    "attach_exits_": "nncompress.conditional",
    "Cascade": "nncompress.conditional",
    "CalibrationConfig": "nncompress.conditional",
    "calibrate_": "nncompress.conditional",
    "Policy": "nncompress.core",
    "SearchConfig": "nncompress.policy",
    "search_policy": "nncompress.stages.search_model",
}
_ALIASES = {"create_model": "create", "search_policy": "search_model"}

# subpackages reachable as attributes (``nncompress.models``, like ``numpy.linalg``)
_SUBPACKAGES = (
    "cli",
    "coding",
    "core",
    "data",
    "distill",
    "engine",
    "io",
    "lowrank",
    "models",
    "prune",
    "quant",
    "recipe",
    "stages",
    "stats",
)

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, _ALIASES.get(name, name))
    if name in _SUBPACKAGES or name in FAMILIES:
        try:
            return importlib.import_module(f"nncompress.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nncompress.{name}":
                raise
    raise AttributeError(f"module 'nncompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBPACKAGES})
