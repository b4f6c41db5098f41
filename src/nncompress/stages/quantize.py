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
from typing import Any

from ..core.validate import check, is_int
from ..engine.train import evaluate
from ..quant.linear import (
    PTQConfig,
    QATConfig,
    layer_precisions,
    quantization_coverage,
    quantize_ptq,
    quantize_qat,
    quantized_float_model,
)
from ..quant.onnx_export import evaluate_onnx, export_onnx
from .base import RetrainKeys, StageConfig, StageContext, stage_config

__all__ = ["QuantizeStageConfig", "run_quantize_stage"]

log = logging.getLogger(__name__)


@stage_config(
    PTQConfig,
    keys=("weights", "activations", "per_channel", "keep_first_last", "per_layer", "reduce_range"),
    defaults={"activations": "uint8"},
    retrain=RetrainKeys({"qat_epochs": 1, "lr_scale": 0.1}, epochs_key="qat_epochs"),
)
class QuantizeStageConfig(StageConfig):
    """Options of the ``quantize`` stage.

    Attributes
    ----------
    weights, activations, per_channel, keep_first_last, per_layer, reduce_range : the
        :class:`~nncompress.quant.linear.PTQConfig` (``activations='none'`` or ``None`` for
        weight-only; 8-bit activations default to ``uint8``, onnxruntime's x86 kernels).
    qat_epochs, lr_scale : the :class:`~nncompress.stages.base.RetrainSpec` of QAT: fine-tuning
        epochs and learning rate relative to the recipe's training configuration.
    method : 'ptq' | 'qat'.
    observer : activation range estimator (QAT uses moving averages instead of 'minmax').
    lsq : QAT with learned step sizes.
    calibration : number of held-out samples fed to the observers.
    out : file name of the ONNX model inside the run folder.
    threads : onnxruntime threads for the accuracy measurement.
    """

    method: str = "ptq"
    observer: str = "minmax"
    lsq: bool = False
    calibration: int = 512
    out: str = "model.onnx"
    threads: int = 1

    def _check_options(self) -> None:
        if self.activations == "none":
            object.__setattr__(self, "activations", None)
        check(self.method in ("ptq", "qat"), "method", self.method, "must be 'ptq' or 'qat'")
        check(
            is_int(self.calibration) and self.calibration >= 1,
            "calibration",
            self.calibration,
            "must be an integer >= 1",
        )
        check(
            is_int(self.qat_epochs) and self.qat_epochs >= 1,
            "qat_epochs",
            self.qat_epochs,
            "must be an integer >= 1",
        )
        check(str(self.out).endswith(".onnx"), "out", self.out, "must end in .onnx")
        self._unused_unless(
            self.method == "qat",
            ("qat_epochs", "lr_scale", "lsq"),
            f"only with method='qat' (got {self.method!r})",
        )
        check(
            is_int(self.threads) and self.threads >= 1,
            "threads",
            self.threads,
            "must be an integer >= 1",
        )

    def _build_algorithm(self, values: dict[str, Any]) -> PTQConfig:
        if self.method == "qat":
            obs = "moving_average" if self.observer == "minmax" else self.observer
            return QATConfig(observer=obs, lsq=self.lsq, **values)
        return PTQConfig(observer=self.observer, **values)

    def quant_config(self) -> PTQConfig:
        """The :class:`PTQConfig` (a :class:`QATConfig` for ``method='qat'``)."""
        return self.algorithm


def run_quantize_stage(ctx: StageContext, config: QuantizeStageConfig) -> dict[str, Any]:
    """Quantize ``ctx.model``, export ``ctx.out_dir / config.out`` and report accuracies."""
    splits = ctx.splits
    qcfg = config.quant_config()
    calib = splits.loader("val", 64, limit=config.calibration)
    if config.method == "ptq":
        gm = quantize_ptq(ctx.model, calib, qcfg, progress=ctx.progress)
    else:
        tcfg = config.retrain.train_config(ctx.train_config)
        gm = quantize_qat(
            ctx.model,
            splits.loader("train", tcfg.batch_size, seed=tcfg.seed, augment=tcfg.augment),
            qcfg,
            tcfg,
            calibration_loader=calib,
            lr_scale=config.lr_scale,
            progress=ctx.progress,
        )
    coverage = quantization_coverage(gm)
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
                k: v for k, v in config.to_dict().items() if k not in ("out", "threads")
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
        "coverage": coverage.to_dict() if coverage is not None else None,
    }
