"""Linear integer quantization of whole models: BN folding, PTQ, QAT (STE / LSQ), mixed precision.

The flow (SPEC 2b; Jacob et al. 2018; Krishnamoorthi 2018 "Quantizing deep convolutional networks
for efficient inference: A whitepaper"):

1. :func:`fold_batchnorm` folds every Conv -> BatchNorm pair into the convolution
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
   :func:`convert` freezes the scales and zero points. :func:`quantize_ptq` does 1-3.
4. Quantization-aware training: :func:`prepare_qat` then any training loop (e.g.
   :func:`nncompress.engine.finetune`); activations track moving-average ranges while training,
   gradients pass the rounding by the straight-through estimator, or scales are learned (LSQ).
   :func:`convert` freezes them.

The result is a ``torch.fx.GraphModule`` whose forward pass is the fake-quantized
(simulated-integer) model; :func:`nncompress.quant.onnx_export.export_onnx` writes its integer
ONNX form.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError
from ..core.modules import model_device, set_submodule, strip_parametrizations
from ..core.progress import Progress, progress_task
from ..core.validate import check as _check
from .observers import OBSERVERS, Observer, make_observer
from .primitives import QParams, affine_qparams, fake_quantize, lsq_fake_quantize

__all__ = [
    "ActivationQuantizer",
    "PTQConfig",
    "QATConfig",
    "WeightFakeQuant",
    "calibrate",
    "config_from_dict",
    "convert",
    "fold_batchnorm",
    "layer_precisions",
    "prepare",
    "prepare_qat",
    "quantize_ptq",
    "quantize_qat",
    "quantized_float_model",
    "quantized_layers",
]

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("int8", "int4", "fp32")
ACT_DTYPES = ("int8", "uint8")
KEEP = (None, "int8", "fp32")
QUANT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------- configs


def _check_layer_entry(name: str, entry: Any) -> None:
    _check(isinstance(entry, Mapping), f"per_layer[{name!r}]", entry, "must be a mapping")
    for k, v in entry.items():
        if k == "weights":
            _check(
                v in WEIGHT_DTYPES,
                f"per_layer[{name!r}].weights",
                v,
                f"must be one of {list(WEIGHT_DTYPES)}",
            )
        elif k == "activations":
            _check(
                v in (*ACT_DTYPES, None),
                f"per_layer[{name!r}].activations",
                v,
                f"must be one of {[*ACT_DTYPES, None]}",
            )
        else:
            raise ConfigError(
                f"per_layer[{name!r}] has key {k!r}: allowed keys are 'weights', 'activations'"
            )


@dataclass(frozen=True)
class PTQConfig:
    """Post-training linear quantization.

    Attributes
    ----------
    weights : 'int8' | 'int4' - weight format of quantized layers (symmetric, zero point 0).
    activations : 'int8' | 'uint8' | None - activation format (asymmetric; ``None`` =
        weight-only quantization, float activations).
    per_channel : one weight scale per output channel (else one per tensor).
    observer : activation range estimator: 'minmax' | 'moving_average' | 'percentile' | 'kl'.
    percentile : for ``observer='percentile'``.
    keep_first_last : None (treat like the others) | 'int8' (first/last layers at 8-bit weights
        even when ``weights='int4'``) | 'fp32' (first/last layers left in float).
    per_layer : mixed precision, ``{layer_name: {'weights': 'int8'|'int4'|'fp32',
        'activations': 'int8'|'uint8'|None}}``; overrides the rest. A layer with fp32 weights runs
        in float.
    fold_bn : fold Conv-BatchNorm pairs before quantizing.
    keep_zeros : keep weights that are exactly zero (pruned) at zero, also during QAT.
    reduce_range : 7-bit weight grid ([-63, 63] for int8). x86 CPUs without VNNI multiply
        uint8 x int8 pairs with 16-bit saturating adds (``vpmaddubsw``); 7-bit weights keep the
        integer kernels exact, as ONNX Runtime's documentation recommends.
    """

    weights: str = "int8"
    activations: str | None = "int8"
    per_channel: bool = True
    observer: str = "minmax"
    percentile: float = 99.99
    keep_first_last: str | None = None
    per_layer: dict = field(default_factory=dict)
    fold_bn: bool = True
    keep_zeros: bool = True
    reduce_range: bool = True

    def __post_init__(self) -> None:
        _check(
            self.weights in ("int8", "int4"), "weights", self.weights, "must be 'int8' or 'int4'"
        )
        _check(
            self.activations in (*ACT_DTYPES, None),
            "activations",
            self.activations,
            "must be 'int8', 'uint8' or None",
        )
        _check(
            self.observer in OBSERVERS,
            "observer",
            self.observer,
            f"must be one of {sorted(OBSERVERS)}",
        )
        _check(0 < self.percentile <= 100, "percentile", self.percentile, "must be in (0, 100]")
        _check(
            self.keep_first_last in KEEP,
            "keep_first_last",
            self.keep_first_last,
            "must be None, 'int8' or 'fp32'",
        )
        _check(
            isinstance(self.per_layer, Mapping),
            "per_layer",
            self.per_layer,
            "must be a mapping of layer name -> {'weights': ..., 'activations': ...}",
        )
        for name, entry in self.per_layer.items():
            _check_layer_entry(name, entry)


@dataclass(frozen=True)
class QATConfig(PTQConfig):
    """Quantization-aware training: :class:`PTQConfig` plus how ranges are learned.

    Attributes
    ----------
    lsq : learn weight and activation step sizes (LSQ, Esser et al. 2020) instead of
        min/max (weights) and moving-average ranges (activations).
    averaging_constant : moving-average rate of the activation observers while training.
    """

    observer: str = "moving_average"
    lsq: bool = False
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            0 < self.averaging_constant <= 1,
            "averaging_constant",
            self.averaging_constant,
            "must be in (0, 1]",
        )


def config_from_dict(data: Mapping[str, Any], qat: bool = False) -> PTQConfig:
    """Build a :class:`PTQConfig` (or :class:`QATConfig`) from a JSON/YAML mapping."""
    cls = QATConfig if qat else PTQConfig
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}: allowed {sorted(names)}")
    return cls(**dict(data))


# --------------------------------------------------------------------------- modules


class WeightFakeQuant(nn.Module):
    """Parametrization ``w -> fake_quantize(w * mask)`` with symmetric min/max scales.

    Scales are recomputed from the current weight on every call (per output channel, axis 0,
    or per tensor): ``scale = max|w| / qmax``, ``zero_point = 0``. With ``lsq=True`` the scale is
    a learned parameter (initialised to the min/max scale) and gradients follow LSQ. ``mask``
    (optional, 0/1) pins pruned weights at exactly zero.
    """

    def __init__(
        self,
        dtype: str,
        weight: torch.Tensor,
        *,
        per_channel: bool = True,
        lsq: bool = False,
        mask: torch.Tensor | None = None,
        reduce_range: bool = False,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.reduce_range = reduce_range
        self.axis = 0 if per_channel else None
        self.lsq = lsq
        if mask is not None:
            self.register_buffer("mask", mask.to(weight.dtype))
        else:
            self.mask = None
        if lsq:
            self.scale = nn.Parameter(self.minmax_qparams(weight).scale.clone())

    def minmax_qparams(self, w: torch.Tensor) -> QParams:
        w = w.detach()
        if self.axis is None:
            mn, mx = w.min(), w.max()
        else:
            flat = w.reshape(w.shape[0], -1)  # (C_out, C_in*k*k)
            mn, mx = flat.min(1).values, flat.max(1).values
        return affine_qparams(
            mn, mx, self.dtype, symmetric=True, axis=self.axis, reduce_range=self.reduce_range
        )

    def qparams(self, w: torch.Tensor) -> QParams:
        """The parameters the forward pass uses for weight ``w`` (the unparametrized one)."""
        if self.lsq:
            s = self.scale.detach().abs().clamp(min=1e-12)
            return QParams(
                s.clone(),
                torch.zeros_like(s, dtype=torch.int32),
                self.dtype,
                self.axis,
                self.reduce_range,
            )
        return self.minmax_qparams(self._masked(w))

    def _masked(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask if self.mask is not None else w

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w = self._masked(w)
        if self.lsq:
            return lsq_fake_quantize(
                w,
                self.scale.abs() + 1e-12,
                0,
                self.dtype,
                axis=self.axis,
                reduce_range=self.reduce_range,
            )
        qp = self.minmax_qparams(w)
        return fake_quantize(
            w, qp.scale, qp.zero_point, self.dtype, axis=self.axis, reduce_range=self.reduce_range
        )

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, axis={self.axis}, lsq={self.lsq}"


class ActivationQuantizer(nn.Module):
    """Observer plus fake quantization of one activation tensor (asymmetric, per tensor).

    Modes: ``'observe'`` (record ranges, pass through: PTQ calibration), ``'qat'`` (in training
    update the observer and fake-quantize with the current range; in eval use the frozen one),
    ``'lsq'`` (learned scale, fixed zero point), ``'quantize'`` (frozen parameters: after
    :func:`convert`). ``scale``/``zero_point`` buffers hold the frozen parameters.
    """

    def __init__(self, observer: Observer, dtype: str = "int8", mode: str = "observe") -> None:
        super().__init__()
        if mode not in ("observe", "qat", "lsq", "quantize"):
            raise ValueError(f"mode={mode!r}: must be 'observe', 'qat', 'lsq' or 'quantize'")
        self.observer = observer
        self.dtype = dtype
        self.mode = mode
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.lsq_scale: nn.Parameter | None = None

    def freeze(self) -> QParams:
        """Compute and store the parameters from the observer (or the learned LSQ scale)."""
        if self.mode == "lsq" and self.lsq_scale is not None:
            self.scale = self.lsq_scale.detach().abs().clamp(min=1e-12).clone()
        else:
            qp = self.observer.calculate_qparams(self.dtype, symmetric=False)
            self.scale, self.zero_point = qp.scale.clone(), qp.zero_point.clone()
        return self.qparams()

    def qparams(self) -> QParams:
        return QParams(self.scale.detach().clone(), self.zero_point.clone(), self.dtype)

    def start_lsq(self) -> None:
        """Switch to learned step size, initialised from the observer's range."""
        self.freeze()
        self.lsq_scale = nn.Parameter(self.scale.clone())
        self.mode = "lsq"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            return self.observer(x)
        if self.mode == "qat" and self.training:
            self.observer(x)
            self.freeze()
        if self.mode == "lsq" and self.lsq_scale is not None:
            return lsq_fake_quantize(x, self.lsq_scale.abs() + 1e-12, self.zero_point, self.dtype)
        return fake_quantize(x, self.scale, self.zero_point, self.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, mode={self.mode}"


# --------------------------------------------------------------------------- BN folding


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(
            mods[node.target], nn.BatchNorm2d | nn.BatchNorm1d
        ):
            continue
        src = node.args[0]
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods[src.target], nn.Conv1d | nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a convolution into it, in place.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel,
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; the BatchNorm becomes ``nn.Identity``.
    Uses the running statistics, so the folded model equals the original in eval mode
    (Jacob et al. 2018, section 3.2). Parametrizations are folded into plain weights first.
    Returns the folded ``(conv_name, bn_name)`` pairs.
    """
    strip_parametrizations(model)
    pairs = _conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_var is None:
            raise ValueError(f"cannot fold BatchNorm '{bn_name}': it keeps no running statistics")
        inv = torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        factor = gamma * inv  # (C_out,)
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta  # (C_out,)
        conv.bias = nn.Parameter(new_bias.detach().clone())
        set_submodule(model, bn_name, nn.Identity())
    log.info("folded %d Conv-BatchNorm pairs", len(pairs))
    return pairs


# --------------------------------------------------------------------------- graph analysis

_PASS_FUNCS = {
    torch.flatten,
    torch.relu,
    nn.functional.relu,
    nn.functional.max_pool2d,
    nn.functional.dropout,
}
_PASS_METHODS = {"flatten", "view", "reshape", "relu", "contiguous"}
_PASS_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_ADD_FUNCS = {operator.add, torch.add, operator.iadd}
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)


def _is_relu(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, nn.functional.relu)
    return node.op == "call_method" and node.target == "relu"


def _is_pass(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Ops that map a quantized grid onto itself (no new quantizer needed)."""
    if node.op == "call_module":
        return isinstance(mods.get(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in ("add", "__add__")
    )


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the Conv/Linear modules in graph (execution) order."""
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(mods.get(n.target), QUANT_LAYERS)
    ]


def _resolve_precisions(layers: list[str], config: PTQConfig) -> dict[str, tuple[str, str | None]]:
    """``{layer: (weights, activations)}`` after keep_first_last and per_layer overrides."""
    unknown = sorted(set(config.per_layer) - set(layers))
    if unknown:
        raise ConfigError(
            f"per_layer names {unknown} are not Conv/Linear layers of the model; allowed: {layers}"
        )
    out: dict[str, tuple[str, str | None]] = {}
    for i, name in enumerate(layers):
        w, a = config.weights, config.activations
        if config.keep_first_last and i in (0, len(layers) - 1):
            w = config.keep_first_last
            if w == "fp32":
                a = None
        entry = config.per_layer.get(name, {})
        w = entry.get("weights", w)
        a = entry.get("activations", a) if w != "fp32" else None
        out[name] = (w, a)
    return out


def _make_act(config: PTQConfig, dtype: str, qat: bool) -> ActivationQuantizer:
    if config.observer == "percentile":
        obs = make_observer("percentile", percentile=config.percentile)
    elif config.observer == "moving_average":
        avg = config.averaging_constant if isinstance(config, QATConfig) else 0.01
        obs = make_observer("moving_average", averaging_constant=avg)
    else:
        obs = make_observer(config.observer)
    return ActivationQuantizer(obs, dtype, mode="qat" if qat else "observe")


# --------------------------------------------------------------------------- prepare / convert


def prepare(
    model: nn.Module, config: PTQConfig | None = None, *, qat: bool = False
) -> fx.GraphModule:
    """Copy ``model``, fold BatchNorm, and insert weight and activation fake quantization.

    The input model is not modified. Returns a ``torch.fx.GraphModule`` whose activation
    quantizers are in ``'observe'`` mode (PTQ: run :func:`calibrate`, then :func:`convert`) or in
    ``'qat'`` mode (train it, then :func:`convert`). Raises ``ValueError`` naming the module when
    the model cannot be traced.
    """
    config = config or PTQConfig()
    was_training = model.training
    model = copy.deepcopy(model)
    model.eval()
    if config.fold_bn:
        fold_batchnorm(model)
    else:
        strip_parametrizations(model)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; report which model failed
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx (data-dependent control flow?): "
            f"{exc}"
        ) from exc
    graph = gm.graph
    mods = dict(gm.named_modules())
    # drop Identity modules (folded BatchNorms) so fusion patterns are adjacent
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    layers = quantized_layers(gm)
    prec = _resolve_precisions(layers, config)
    lsq = bool(qat and isinstance(config, QATConfig) and config.lsq)
    # weights
    for name in layers:
        wdt, _ = prec[name]
        if wdt == "fp32":
            continue
        mod = mods[name]
        mask = None
        if config.keep_zeros and bool((mod.weight == 0).any()):
            mask = (mod.weight != 0).float()
        parametrize.register_parametrization(
            mod,
            "weight",
            WeightFakeQuant(
                wdt,
                mod.weight.detach(),
                per_channel=config.per_channel,
                lsq=lsq,
                mask=mask,
                reduce_range=config.reduce_range and wdt == "int8",
            ),
        )
    # activations: which node outputs carry a quantized tensor (value: dtype)
    qdt: dict[fx.Node, str | None] = {}
    counter = [0]

    def insert_after(node: fx.Node, dtype: str, only_user: fx.Node | None = None) -> fx.Node:
        name = f"act_quant_{counter[0]}"
        counter[0] += 1
        gm.add_submodule(name, _make_act(config, dtype, qat))
        with graph.inserting_after(node):
            q = graph.call_module(name, (node,))
        if only_user is None:
            node.replace_all_uses_with(q, delete_user_cb=lambda u: u is not q)
        else:
            only_user.replace_input_with(node, q)
        qdt[q] = dtype
        return q

    def source(node: Any) -> Any:
        while isinstance(node, fx.Node) and _is_pass(node, mods) and node not in qdt:
            node = node.args[0]
        return node

    int_layers = {n for n in layers if prec[n][0] != "fp32" and prec[n][1] is not None}
    # graph inputs consumed by an integer layer get a quantizer right after them
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in int_layers:
            src = source(node.args[0])
            if isinstance(src, fx.Node) and src.op == "placeholder" and src not in qdt:
                qdt[src] = None
                insert_after(src, prec[node.target][1])

    def fused_end(node: fx.Node) -> fx.Node:
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], mods):
            return users[0]
        return node

    done: set[fx.Node] = set(qdt)
    for node in list(graph.nodes):
        if node in done:
            continue
        done.add(node)
        if node.op == "call_module" and node.target in int_layers:
            end = fused_end(node)
            done.add(end)
            insert_after(end, prec[node.target][1])
        elif _is_add(node):
            ins = [a for a in node.args if isinstance(a, fx.Node)]
            dts = [qdt.get(source(a)) for a in ins]
            if ins and all(dts):
                end = fused_end(node)
                done.add(end)
                insert_after(end, dts[0])
        elif node.op == "call_module" and isinstance(mods.get(node.target), _POOL_MODULES):
            dt = qdt.get(source(node.args[0]))
            if dt:
                insert_after(node, dt)
    # the network's output (logits) keeps its full range: clipping it (percentile / KL) changes
    # which class wins, so its quantizer always uses min/max (or the moving average in QAT)
    for node in graph.nodes:
        if node.op == "output" and isinstance(node.args[0], fx.Node):
            last = node.args[0]
            if last in qdt and last.op == "call_module" and config.observer in ("percentile", "kl"):
                aq = gm.get_submodule(last.target)
                aq.observer = make_observer("moving_average" if qat else "minmax")
    # integer layers whose input is not on a quantized grid get a quantizer on that edge
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in int_layers:
            if not qdt.get(source(node.args[0])):
                insert_after(node.args[0], prec[node.target][1], only_user=node)
    graph.lint()
    gm.recompile()
    gm.train(was_training if qat else False)
    log.info(
        "prepared %d layers (%s), %d activation quantizers",
        len(layers),
        ", ".join(f"{k}:{w}/{a or 'fp32'}" for k, (w, a) in prec.items()),
        counter[0],
    )
    return gm


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


def convert(gm: nn.Module) -> nn.Module:
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


def quantize_ptq(
    model: nn.Module,
    calibration_loader: Iterable | None,
    config: PTQConfig | None = None,
    *,
    max_samples: int | None = None,
    progress: Progress | None = None,
) -> fx.GraphModule:
    """Post-training quantization: :func:`prepare`, :func:`calibrate`, :func:`convert`.

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
    return convert(gm)


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
    return convert(gm)


@torch.no_grad()
def quantized_float_model(gm: nn.Module, model: nn.Module, config: PTQConfig) -> nn.Module:
    """A plain copy of ``model`` (BatchNorm folded as in ``gm``) with ``gm``'s quantized weights.

    Every quantized weight is exactly ``scale * q`` (the dequantized integer weight), so the copy
    can be saved as an ordinary checkpoint; activations are not quantized in it.
    """
    out = copy.deepcopy(model)
    out.eval()
    if config.fold_bn:
        fold_batchnorm(out)
    else:
        strip_parametrizations(out)
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
            if not _is_pass(inp, mods):
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
