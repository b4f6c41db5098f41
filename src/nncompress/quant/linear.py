"""Linear integer quantization of whole models: BN folding, PTQ, QAT (STE / LSQ), mixed precision.

The flow (SPEC 2b; Jacob et al. 2018; Krishnamoorthi 2018 "Quantizing deep convolutional networks
for efficient inference: A whitepaper"):

1. :func:`~nncompress.quant.fold.fold_batchnorm_` folds every Conv -> BatchNorm pair into the convolution
   (``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``).
2. :func:`prepare` traces the folded model with ``torch.fx`` and

   - registers a :class:`WeightFakeQuant` parametrization on each quantized Conv/Linear weight
     (symmetric, per output channel by default; weights use min/max, so a pruned weight's zeros
     stay exactly zero), and
   - inserts :class:`ActivationQuantizer` modules (observer + fake quantization) on the graph's
     activation tensors: the input, the output of every quantized layer (after its ReLU, which
     is fused), of residual additions and of average pools. Order-preserving ops (ReLU,
     max-pool, flatten, dropout) keep their input's grid, so they need no new quantizer. This
     placement is exactly where :mod:`nncompress.quant.onnx_export` puts QuantizeLinear /
     DequantizeLinear pairs, so the simulation and the integer model agree.
3. Post-training: :func:`calibrate` feeds held-out batches through the observers;
   :func:`convert_` freezes the scales and zero points. :func:`quantize_ptq` does 1-3 on a
   copy (the model passed in is left unchanged).
4. Quantization-aware training: :func:`prepare_qat` then any training loop (e.g.
   :func:`nncompress.engine.finetune`); activations track moving-average ranges while training,
   gradients pass the rounding by the straight-through estimator, or scales are learned (LSQ).
   :func:`convert_` freezes them.

The pieces live in :mod:`.qconfig` (configs), :mod:`.fakequant` (the modules), :mod:`.fold`
(BatchNorm folding) and :mod:`.placement` (where quantizers go); this module composes them and
re-exports their public names.

The result is a ``torch.fx.GraphModule`` whose forward pass is the fake-quantized
(simulated-integer) model; :func:`nncompress.quant.onnx_export.export_onnx` writes its integer
ONNX form.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..core.convs import is_conv_leaf, is_conv_subclass, unrecognised_conv_message
from ..core.coverage import CoverageReport, coverage_report
from ..core.fx import module_of, op_name, trace
from ..core.modules import model_device, strip_parametrizations_
from ..core.progress import Progress, progress_task
from .fakequant import ActivationQuantizer, WeightFakeQuant
from .fold import fold_batchnorm, fold_batchnorm_
from .placement import (
    QUANT_LAYERS,
    insert_activation_quantizers,
    keeps_grid,
    quantize_weights_,
    quantized_layers,
)
from .qconfig import (
    ACT_DTYPES,
    KEEP,
    WEIGHT_DTYPES,
    PTQConfig,
    QATConfig,
    config_from_dict,
    resolve_precisions,
)

__all__ = [
    "ACT_DTYPES",
    "KEEP",
    "WEIGHT_DTYPES",
    "ActivationQuantizer",
    "PTQConfig",
    "QATConfig",
    "WeightFakeQuant",
    "calibrate",
    "config_from_dict",
    "convert",
    "convert_",
    "fold_batchnorm",
    "fold_batchnorm_",
    "layer_precisions",
    "prepare",
    "prepare_qat",
    "quantization_coverage",
    "quantize_ptq",
    "quantize_qat",
    "quantized_float_model",
    "quantized_layers",
]

log = logging.getLogger(__name__)

# functional calls of layer weights that fx leaves as call_function nodes (they run in float)
_FUNCTIONAL_LAYERS = (
    torch.conv1d,
    torch.conv2d,
    nn.functional.conv1d,
    nn.functional.conv2d,
    nn.functional.linear,
)


def _plain_copy(model: nn.Module, config: PTQConfig) -> nn.Module:
    """A copy of ``model`` in eval mode, BatchNorm folded (or just parametrizations folded)."""
    out = copy.deepcopy(model)
    out.eval()
    if config.fold_bn:
        fold_batchnorm_(out)
    else:
        strip_parametrizations_(out)
    return out


def prepare(
    model: nn.Module, config: PTQConfig | None = None, *, qat: bool = False
) -> fx.GraphModule:
    """Copy ``model``, fold BatchNorm, and insert weight and activation fake quantization.

    The input model is not modified. Returns a ``torch.fx.GraphModule`` whose activation
    quantizers are in ``'observe'`` mode (PTQ: run :func:`calibrate`, then :func:`convert_`) or
    in ``'qat'`` mode (train it, then :func:`convert_`). Raises ``ValueError`` naming the module
    when the model cannot be traced.
    """
    config = config or PTQConfig()
    was_training = model.training
    model = _plain_copy(model, config)
    params_total = sum(p.numel() for p in model.parameters())
    gm = trace(model)  # TraceError (a ValueError) names the module that failed
    graph = gm.graph
    mods = dict(gm.named_modules())
    # drop Identity modules (folded BatchNorms) so fusion patterns are adjacent
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    layers = quantized_layers(gm)
    prec = resolve_precisions(layers, config)
    lsq = bool(qat and isinstance(config, QATConfig) and config.lsq)
    quantize_weights_(gm, layers, prec, config, lsq)
    count = insert_activation_quantizers(gm, layers, prec, config, qat)
    graph.lint()
    gm.recompile()
    gm.train(was_training if qat else False)
    report = _coverage(model, gm, layers, prec, params_total)
    gm.meta[COVERAGE_KEY] = report
    stayed = [x for x in report.skipped if not x.detail.startswith("kept in float by")]
    report.warn(
        [
            f"quantize: {len(stayed)} Conv/Linear layer(s) stayed in float: "
            + "; ".join(f"'{x.name}': {x.detail}" for x in stayed)
        ]
        if stayed
        else []
    )
    log.info(
        "prepared %d layers (%s), %d activation quantizers",
        len(layers),
        ", ".join(f"{k}:{w}/{a or 'fp32'}" for k, (w, a) in prec.items()),
        count,
    )
    return gm


COVERAGE_KEY = "nncompress.coverage"


def _coverage(
    model: nn.Module,
    gm: fx.GraphModule,
    layers: list[str],
    prec: dict[str, tuple[str, str | None]],
    params_total: int,
) -> CoverageReport:
    """Which Conv/Linear layers got integer weights, and why the others stayed in float."""
    changed, skipped = {}, {}
    for name in layers:
        w, a = prec[name]
        if w == "fp32":
            skipped[name] = "kept in float by keep_first_last / per_layer"
        else:
            changed[name] = f"{w} weights, {a or 'fp32'} activations"
    functional = {}
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            functional.setdefault(module_of(node), op_name(node))
    for name, m in model.named_modules():
        if not name or not isinstance(m, QUANT_LAYERS) or name in changed or name in skipped:
            continue
        if is_conv_subclass(m) and not is_conv_leaf(m):
            skipped[name] = unrecognised_conv_message(name, m) + "; it runs in float"
        elif name in functional or name not in mods:
            skipped[name] = (
                f"its weights are used by {functional.get(name, 'a functional call')} rather "
                "than by calling the module, so it runs in float"
            )
        else:
            skipped[name] = "not called in forward"
    return coverage_report("quantize", model, changed, skipped, params_total=params_total)


def quantization_coverage(gm: nn.Module) -> CoverageReport | None:
    """The :class:`~nncompress.core.coverage.CoverageReport` :func:`prepare` recorded: the
    layers quantized and those left in float with the reason (``None`` for other models)."""
    meta = getattr(gm, "meta", None)
    return meta.get(COVERAGE_KEY) if isinstance(meta, dict) else None


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> fx.GraphModule:
    """:func:`prepare` for quantization-aware training (moving-average ranges or LSQ).

    With ``config.lsq`` the activation scales are learned too; they start from one
    calibration pass, so call :func:`calibrate` on a few batches after this (it then switches the
    quantizers to learned step sizes). Returns a model in training mode.
    """
    config = config or QATConfig()
    gm = prepare(model, config, qat=True)
    gm.train()
    return gm


def _act_quantizers(gm: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in gm.modules() if isinstance(m, ActivationQuantizer)]


@torch.no_grad()
def calibrate(
    gm: nn.Module,
    loader: Iterable,
    *,
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Feed batches (inputs only) through the observers; returns the number of samples used.

    Activation quantizers in ``'observe'`` mode record ranges. For QAT models (``'qat'`` mode)
    this seeds the moving averages; LSQ models then switch to learned step sizes.
    """
    was = gm.training
    quants = _act_quantizers(gm)
    modes = [q.mode for q in quants]
    for q in quants:
        if q.mode in ("qat", "lsq"):
            q.mode = "observe"
    gm.eval()
    device = model_device(gm)
    seen, n = 0, (len(loader) if hasattr(loader, "__len__") else None)
    with progress_task(progress, "calibrate", n) as task:
        try:
            for i, batch in enumerate(loader):
                x = batch[0] if isinstance(batch, list | tuple) else batch
                if max_samples is not None:
                    x = x[: max(0, max_samples - seen)]
                    if len(x) == 0:
                        break
                gm(x.to(device))
                seen += len(x)
                task.advance(i + 1)
        finally:
            gm.train(was)
    if seen == 0:
        raise ValueError("calibrate: the calibration loader yielded no samples")
    wants_lsq = any(isinstance(m, WeightFakeQuant) and m.lsq for m in gm.modules())
    for q, mode in zip(quants, modes, strict=True):
        if mode == "qat" and wants_lsq:
            q.start_lsq()
        elif mode in ("qat", "lsq"):
            q.freeze()
            q.mode = mode
    return seen


def convert_(gm: nn.Module) -> nn.Module:
    """Freeze every activation quantizer's scale and zero point; the model is then final.

    The returned model (the same object) runs the simulated integer model in eval mode.
    """
    for q in _act_quantizers(gm):
        if q.mode == "observe" and not q.observer.observed:
            raise RuntimeError("convert: an activation quantizer saw no data; run calibrate()")
        if q.mode != "quantize":
            q.freeze()
            q.mode = "quantize"
            q.lsq_scale = None
    gm.eval()
    return gm


def convert(gm: nn.Module) -> nn.Module:
    """Deprecated name of :func:`convert_` (it freezes ``gm`` in place)."""
    return convert_(gm)


def quantize_ptq(
    model: nn.Module,
    calibration_loader: Iterable | None,
    config: PTQConfig | None = None,
    *,
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> fx.GraphModule:
    """Post-training quantization: :func:`prepare`, :func:`calibrate`, :func:`convert_`.

    Returns a new ``GraphModule``; ``model`` itself is left unchanged (so this is not an
    in-place transform and has no trailing underscore).

    ``calibration_loader`` yields ``(x, y)`` batches from the held-out split (labels unused);
    it may be ``None`` only for weight-only quantization (``activations=None``).
    """
    config = config or PTQConfig()
    gm = prepare(model, config)
    if _act_quantizers(gm):
        if calibration_loader is None:
            raise ValueError(
                "quantize_ptq: activations are quantized, so a calibration loader is required"
            )
        calibrate(gm, calibration_loader, max_samples=max_samples, progress=progress)
    return convert_(gm)


def quantize_qat(
    model: nn.Module,
    train_loader: Iterable,
    config: QATConfig | None = None,
    train_config: Any = None,
    *,
    calibration_loader: Iterable | None = None,
    val_loader: Iterable | None = None,
    lr_scale: float = 0.1,
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> fx.GraphModule:
    """Quantization-aware training: :func:`prepare_qat`, calibrate, fine-tune, :func:`convert`.

    Fine-tunes with :func:`nncompress.engine.finetune` at ``lr_scale`` times the learning rate
    of ``train_config`` (a :class:`~nncompress.engine.TrainConfig`; its ``epochs`` are the QAT
    epochs). The forward pass fake-quantizes weights and activations; rounding passes gradients
    straight through (zero where values were clipped), or step sizes are learned (LSQ).
    """
    from ..engine.config import TrainConfig
    from ..engine.train import finetune

    config = config or QATConfig()
    train_config = train_config or TrainConfig(epochs=1)
    gm = prepare_qat(model, config)
    if calibration_loader is not None:
        calibrate(gm, calibration_loader, max_samples=max_samples, progress=progress)
    elif config.lsq:
        raise ValueError("quantize_qat: lsq=True needs a calibration_loader to initialise scales")
    finetune(
        gm, train_loader, train_config, lr_scale=lr_scale, val_loader=val_loader, progress=progress
    )
    return convert_(gm)


@torch.no_grad()
def quantized_float_model(gm: nn.Module, model: nn.Module, config: PTQConfig) -> nn.Module:
    """A plain copy of ``model`` (BatchNorm folded as in ``gm``) with ``gm``'s quantized weights.

    Every quantized weight is exactly ``scale * q`` (the dequantized integer weight), so the copy
    can be saved as an ordinary checkpoint; activations are not quantized in it.
    """
    out = _plain_copy(model, config)
    mods = dict(gm.named_modules())
    for name, mod in out.named_modules():
        src = mods.get(name)
        if isinstance(mod, QUANT_LAYERS) and src is not None:
            mod.weight.copy_(src.weight.detach())
            if mod.bias is not None and src.bias is not None:
                mod.bias.copy_(src.bias.detach())
    return out


def layer_precisions(gm: nn.Module) -> list[dict[str, Any]]:
    """One row per Conv/Linear layer: name, weight format, activation format, weight bits."""
    if not isinstance(gm, fx.GraphModule):
        raise ValueError("layer_precisions: expected a model returned by prepare/quantize_ptq")
    mods = dict(gm.named_modules())
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), QUANT_LAYERS):
            continue
        mod = mods[node.target]
        wq = None
        if parametrize.is_parametrized(mod, "weight"):
            wq = next(
                (p for p in mod.parametrizations.weight if isinstance(p, WeightFakeQuant)), None
            )
        inp = node.args[0]
        act = None
        while isinstance(inp, fx.Node):
            if inp.op == "call_module" and isinstance(mods.get(inp.target), ActivationQuantizer):
                act = mods[inp.target].dtype
                break
            if not keeps_grid(inp, mods):
                break
            inp = inp.args[0]
        rows.append(
            {
                "layer": node.target,
                "type": type(mod).__name__,
                "weights": wq.dtype if wq else "fp32",
                "per_channel": bool(wq and wq.axis is not None),
                "activations": act or "fp32",
                "params": int(mod.weight.numel()),
            }
        )
    return rows
