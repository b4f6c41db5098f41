"""Recipe stage ``quantize``: linear INT8/INT4 quantization (PTQ or QAT), exported to ONNX.

The stage quantizes ``ctx.model`` (calibrating on the held-out split), writes the integer QDQ
ONNX file ``out_dir/<out>`` (``ctx.artifacts['onnx']``), measures its test accuracy with
onnxruntime, and leaves in ``ctx.model`` a float model carrying the quantized weights (BatchNorm
folded, each weight exactly ``scale * q``), so later stages and the recipe's checkpoints see the
quantized weights. Activation quantization lives only in the ONNX file (and in the report's
``accuracy_sim``, the PyTorch fake-quantized model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..core.validate import check as _check
from ..engine.train import evaluate
from ..quant.linear import (
    ACT_DTYPES,
    KEEP,
    PTQConfig,
    QATConfig,
    layer_precisions,
    quantize_ptq,
    quantize_qat,
    quantized_float_model,
)
from ..quant.observers import OBSERVERS
from ..quant.onnx_export import evaluate_onnx, export_onnx
from .base import StageContext

__all__ = ["QuantizeStageConfig", "run_quantize_stage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeStageConfig:
    """Options of the ``quantize`` stage (see :class:`~nncompress.quant.linear.PTQConfig`).

    Attributes
    ----------
    method : 'ptq' | 'qat'.
    weights, activations, per_channel, observer, keep_first_last, per_layer, reduce_range :
        as in :class:`~nncompress.quant.linear.PTQConfig` (``activations='none'`` or ``None`` for
        weight-only).
    calibration : number of held-out samples fed to the observers.
    qat_epochs, lr_scale, lsq : QAT fine-tuning epochs, learning rate relative to the recipe's
        training configuration, learned step sizes.
    out : file name of the ONNX model inside the run folder.
    threads : onnxruntime threads for the accuracy measurement.
    """

    method: str = "ptq"
    weights: str = "int8"
    activations: str | None = "uint8"
    per_channel: bool = True
    observer: str = "minmax"
    calibration: int = 512
    keep_first_last: str | None = None
    per_layer: dict = field(default_factory=dict)
    reduce_range: bool = True
    qat_epochs: int = 1
    lr_scale: float = 0.1
    lsq: bool = False
    out: str = "model.onnx"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.activations == "none":
            object.__setattr__(self, "activations", None)
        _check(self.method in ("ptq", "qat"), "method", self.method, "must be 'ptq' or 'qat'")
        _check(
            self.weights in ("int8", "int4"), "weights", self.weights, "must be 'int8' or 'int4'"
        )
        _check(
            self.activations in (*ACT_DTYPES, None),
            "activations",
            self.activations,
            "must be 'int8', 'uint8' or 'none'",
        )
        _check(
            self.observer in OBSERVERS,
            "observer",
            self.observer,
            f"must be one of {sorted(OBSERVERS)}",
        )
        _check(
            self.keep_first_last in KEEP,
            "keep_first_last",
            self.keep_first_last,
            "must be None, 'int8' or 'fp32'",
        )
        _check(
            isinstance(self.calibration, int) and self.calibration >= 1,
            "calibration",
            self.calibration,
            "must be an integer >= 1",
        )
        _check(
            isinstance(self.qat_epochs, int) and self.qat_epochs >= 1,
            "qat_epochs",
            self.qat_epochs,
            "must be an integer >= 1",
        )
        _check(self.lr_scale > 0, "lr_scale", self.lr_scale, "must be > 0")
        _check(str(self.out).endswith(".onnx"), "out", self.out, "must end in .onnx")
        _check(
            isinstance(self.threads, int) and self.threads >= 1,
            "threads",
            self.threads,
            "must be an integer >= 1",
        )
        self.quant_config()  # validates the shared fields and per_layer

    def quant_config(self) -> PTQConfig:
        common = {
            "weights": self.weights,
            "activations": self.activations,
            "per_channel": self.per_channel,
            "keep_first_last": self.keep_first_last,
            "per_layer": dict(self.per_layer),
            "reduce_range": self.reduce_range,
        }
        if self.method == "qat":
            obs = "moving_average" if self.observer == "minmax" else self.observer
            return QATConfig(observer=obs, lsq=self.lsq, **common)
        return PTQConfig(observer=self.observer, **common)


def run_quantize_stage(ctx: StageContext, config: QuantizeStageConfig) -> dict[str, Any]:
    """Quantize ``ctx.model``, export ``ctx.out_dir / config.out`` and report accuracies."""
    splits = ctx.splits
    qcfg = config.quant_config()
    calib = splits.loader("val", 64, limit=config.calibration)
    if config.method == "ptq":
        gm = quantize_ptq(ctx.model, calib, qcfg, progress=ctx.progress)
    else:
        tcfg = ctx.train_config.replace(epochs=config.qat_epochs)
        gm = quantize_qat(
            ctx.model,
            splits.loader("train", tcfg.batch_size, seed=tcfg.seed, augment=tcfg.augment),
            qcfg,
            tcfg,
            calibration_loader=calib,
            lr_scale=config.lr_scale,
            progress=ctx.progress,
        )
    test = splits.loader("test", 500)
    sim = evaluate(gm, test, progress=ctx.progress)["accuracy"]
    path = ctx.out_dir / config.out
    export_onnx(
        gm,
        path,
        tuple(splits.input_shape),
        metadata={
            "dataset": splits.describe(),
            "nncompress_quantize": {
                k: v for k, v in config.__dict__.items() if k not in ("out", "threads")
            },
            "layers": layer_precisions(gm),
        },
    )
    ctx.artifacts["onnx"] = path
    res = evaluate_onnx(path, test, threads=config.threads, progress=ctx.progress)
    ctx.model = quantized_float_model(gm, ctx.model, qcfg)
    n_params = sum(p.numel() for p in ctx.model.parameters())
    return {
        "method": config.method,
        "accuracy_onnx": res["accuracy"],
        "accuracy_sim": sim,
        "onnx_bytes": path.stat().st_size,
        "fp32_param_bytes": 4 * n_params,
        "onnx_path": str(path),
        "layers": layer_precisions(gm),
    }
