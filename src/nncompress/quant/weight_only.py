"""Weight-only low-bit quantization of any model, no fx tracing: ``quantize_weights_``.

``quantize_ptq`` traces the model with ``torch.fx`` to place activation quantizers, which
Hugging Face control flow defeats. Weight-only quantization needs no graph: every selected
matrix layer (``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding``) gets an
:class:`AffineWeight` parametrization ``weight = (codes - zero) * scale`` (group-wise, see
:mod:`nncompress.quant.groupwise`), and the model stays an ordinary ``nn.Module`` that runs as
before, in float, on any input. The codes come from

* ``method='rtn'``: round to nearest, per group;
* ``method='gptq'``: GPTQ (Frantar et al., ICLR 2023, :mod:`nncompress.quant.gptq`),
  minimising each layer's output error on calibration batches. Layers are processed in
  stages (``sequential='block'``: one transformer block at a time, in module order), each
  stage's Hessians recorded with every earlier stage already quantized, so later layers see
  -- and compensate -- the error upstream, as in the paper.

Embeddings are quantized per row (``embedding_group_size=None``) or in groups along the
embedding dimension, by RTN (an embedding's "input" is one-hot: the Hessian is diagonal and
GPTQ reduces to RTN). A weight tied between layers (embedding and LM head) is quantized once,
GPTQ using the LM head's inputs, and the same parametrization is installed on every layer
that shares it, so the model stays tied and :func:`nncompress.io.save_compressed` stores the
codes once.

``save_compressed`` stores each quantized weight as its packed codes, float16 scales and
zero points (the ``.ncz`` "affine" scheme), exactly the numbers the model computed with.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import ProgressEvent
from ..engine.batches import take_batches
from ..engine.layers import (
    block_of,
    layer_kind,
    matrix_layers,
    record_inputs,
    tied_groups,
    weight_matrix,
)
from .gptq import HessianAccumulator, gptq_quantize, layer_output_error
from .groupwise import (
    MAX_WEIGHT_BITS,
    MIN_WEIGHT_BITS,
    QuantizedWeight,
    dequantize_codes,
    rtn_quantize,
)

__all__ = [
    "AffineWeight",
    "LayerQuantReport",
    "WeightOnlyConfig",
    "WeightOnlyReport",
    "install_quantized_",
    "quantize_weights_",
    "quantized_layers",
]

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
SEQUENTIAL = ("block", "layer", "none")
Progress = Callable[[ProgressEvent], None]


def _check(cond: bool, field_: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{field_}={value!r}: {allowed}")


def _is_bits(b: Any) -> bool:
    return (
        isinstance(b, int) and not isinstance(b, bool) and MIN_WEIGHT_BITS <= b <= MAX_WEIGHT_BITS
    )


def _is_group(g: Any) -> bool:
    return g is None or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)


_BITS_RULE = f"must be an integer in [{MIN_WEIGHT_BITS}, {MAX_WEIGHT_BITS}]"


@dataclass(frozen=True)
class WeightOnlyConfig:
    """What :func:`quantize_weights_` does (frozen, JSON/YAML-able).

    Attributes
    ----------
    bits : code width of Linear / Conv1D weights, in [2, 8].
    group_size : columns per scale (32/64/128 are usual); None = per output channel. A group
        at least as wide as a layer means per-channel for that layer; otherwise it must divide
        the layer's input width, unless ``per_channel_fallback``.
    per_channel_fallback : layers whose input width the group size does not divide (a ViT's
        49-pixel patch embedding) get one scale per output channel instead of an error.
    symmetric : symmetric range (zero point fixed at ``2**(bits-1)``, not stored).
    method : 'gptq' (needs calibration batches) or 'rtn'.
    per_layer : ``{module name or fnmatch pattern: bits or None}``; exact names win, then the
        first matching pattern; ``None`` leaves the layer in float.
    include, exclude : fnmatch patterns over module names choosing the layers.
    embeddings : also quantize ``nn.Embedding`` tables (RTN, per row by default).
    embedding_bits : bits of embeddings (default: ``bits``).
    embedding_group_size : None = one scale per row (token).
    damp, block_size, act_order, mse_clip : GPTQ settings (:func:`gptq_quantize`); mse_clip
        also applies to RTN.
    sequential : 'block' (Hessians recorded one transformer block at a time, upstream blocks
        already quantized), 'layer' (one layer at a time) or 'none' (all from the float model).
    calibration_batches : batches of the calibration loader used (None = all).
    """

    bits: int = 4
    group_size: int | None = 128
    per_channel_fallback: bool = False
    symmetric: bool = False
    method: str = "gptq"
    per_layer: dict[str, int | None] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    embeddings: bool = True
    embedding_bits: int | None = None
    embedding_group_size: int | None = None
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    mse_clip: bool = False
    sequential: str = "block"
    calibration_batches: int | None = 16

    def __post_init__(self) -> None:
        _check(_is_bits(self.bits), "bits", self.bits, _BITS_RULE)
        for name in ("group_size", "embedding_group_size"):
            v = getattr(self, name)
            _check(_is_group(v), name, v, "must be a positive integer or null (per channel)")
        _check(isinstance(self.symmetric, bool), "symmetric", self.symmetric, "true or false")
        _check(
            isinstance(self.per_channel_fallback, bool),
            "per_channel_fallback",
            self.per_channel_fallback,
            "true or false",
        )
        _check(self.method in METHODS, "method", self.method, f"must be one of {METHODS}")
        _check(isinstance(self.per_layer, dict), "per_layer", self.per_layer, "must be a mapping")
        for k, b in self.per_layer.items():
            _check(b is None or _is_bits(b), f"per_layer['{k}']", b, f"{_BITS_RULE} or null")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            _check(
                isinstance(v, (tuple, list)) and all(isinstance(p, str) for p in v),
                name,
                v,
                "must be a list of fnmatch patterns",
            )
            object.__setattr__(self, name, tuple(v))
        _check(
            self.embedding_bits is None or _is_bits(self.embedding_bits),
            "embedding_bits",
            self.embedding_bits,
            f"{_BITS_RULE} or null",
        )
        _check(
            isinstance(self.damp, (int, float)) and self.damp > 0, "damp", self.damp, "must be > 0"
        )
        _check(
            isinstance(self.block_size, int) and self.block_size >= 1,
            "block_size",
            self.block_size,
            "must be a positive integer",
        )
        _check(
            self.sequential in SEQUENTIAL,
            "sequential",
            self.sequential,
            f"must be one of {SEQUENTIAL}",
        )
        _check(
            self.calibration_batches is None
            or (isinstance(self.calibration_batches, int) and self.calibration_batches >= 1),
            "calibration_batches",
            self.calibration_batches,
            "must be a positive integer or null (all)",
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    def bits_for(self, name: str, kind: str) -> int | None:
        """Bits of layer ``name`` (None: left in float)."""
        if name in self.per_layer:
            return self.per_layer[name]
        for pattern, b in self.per_layer.items():
            if fnmatch.fnmatchcase(name, pattern):
                return b
        if kind == "embedding":
            return self.embedding_bits or self.bits
        return self.bits


class AffineWeight(nn.Module):
    """Parametrization ``weight = (codes - zero) * scale`` per group of columns.

    ``codes`` uint8 (out, in), ``scale`` float16 (out, G), ``zero`` uint8 (out, G) (absent when
    symmetric) are buffers; ``transpose`` returns the transposed matrix (HF ``Conv1D`` stores
    in x out). The input (the previous weight) is ignored. :meth:`storage_hint` tells
    :func:`nncompress.io.save_compressed` how to store the weight compactly.
    """

    def __init__(self, qw: QuantizedWeight, transpose: bool = False) -> None:
        super().__init__()
        self.bits = int(qw.bits)
        self.group_size = int(qw.group_size)
        self.transpose = bool(transpose)
        self.register_buffer("codes", qw.codes.detach().to(torch.uint8).clone())
        self.register_buffer("scale", qw.scale.detach().to(torch.float16).clone())
        zero = None if qw.zero is None else qw.zero.detach().to(torch.uint8).clone()
        self.register_buffer("zero", zero)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = dequantize_codes(
            self.codes, self.scale, self.zero, self.bits, self.group_size, weight.dtype
        )  # (out, in)
        return w.T.contiguous() if self.transpose else w

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.zero, self.bits, self.group_size)

    def storage_hint(self) -> dict[str, Any]:
        return {
            "scheme": "affine",
            "codes": self.codes,
            "scale": self.scale,
            "zero": self.zero,
            "bits": self.bits,
            "group_size": self.group_size,
            "transpose": self.transpose,
        }

    def extra_repr(self) -> str:
        g = self.group_size if self.group_size < self.codes.shape[1] else "channel"
        sym = "sym" if self.zero is None else "asym"
        return f"bits={self.bits}, group={g}, {sym}"


@dataclass
class LayerQuantReport:
    """One quantized weight: ``error`` is the relative output error on the calibration inputs
    (``tr(D H D^T) / tr(W H W^T)``) where a Hessian was recorded, else the relative squared
    weight error ``||D||^2 / ||W||^2``; ``nbytes`` the fixed-width storage."""

    name: str
    kind: str
    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    method: str
    error: float
    error_rtn: float | None
    nbytes: int
    tied: list[str] = field(default_factory=list)


@dataclass
class WeightOnlyReport:
    layers: list[LayerQuantReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    calibration_batches: int = 0
    passes: int = 0
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nbytes"] = self.nbytes
        return d


def quantized_layers(model: nn.Module) -> dict[str, AffineWeight]:
    """The :class:`AffineWeight` of every weight-only quantized layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, AffineWeight):
                    out[name] = p
    return out


def install_quantized_(modules: list[nn.Module], qw: QuantizedWeight) -> AffineWeight:
    """Install one :class:`AffineWeight` holding ``qw`` (an out x in matrix) on every module of
    ``modules`` (layers sharing one weight), so they stay tied."""
    kinds = {layer_kind(m) == "conv1d" for m in modules}
    if len(kinds) != 1:
        raise ConfigError("tied layers store their weight in different layouts: cannot share")
    first = modules[0]
    p = AffineWeight(qw, transpose=kinds.pop()).to(first.weight.device)
    for m in modules:
        parametrize.register_parametrization(m, "weight", p)
        m.parametrizations["weight"].original.requires_grad_(False)
    return p


@dataclass
class _Item:
    """One weight to quantize: the layers sharing it, the one whose inputs GPTQ uses."""

    names: list[str]
    modules: list[nn.Module]
    primary: int
    kind: str
    bits: int
    group: int | None


def _plan(model: nn.Module, cfg: WeightOnlyConfig, filter) -> tuple[list[_Item], list[str]]:
    kinds = ("linear", "conv1d", "embedding") if cfg.embeddings else ("linear", "conv1d")
    layers = matrix_layers(model, cfg.include, cfg.exclude, kinds, filter)
    names = [n for n, _ in layers]
    for key in cfg.per_layer:
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            raise ConfigError(
                f"per_layer['{key}']: matches no selected layer; layers: "
                f"{', '.join(names[:12])}{'...' if len(names) > 12 else ''}"
            )
    items, skipped = [], []
    already = quantized_layers(model)
    for group in tied_groups(layers):
        gnames = [n for n, _ in group]
        mods = [m for _, m in group]
        if any(n in already for n in gnames):
            log.info("layers %s are already quantized: skipped", gnames)
            continue
        for n, m in group:
            if parametrize.is_parametrized(m, "weight"):
                raise ConfigError(
                    f"layer '{n}' is already parametrized (pruned or shared); "
                    "weight-only quantization needs plain weights (fold the parametrizations "
                    "first with nncompress.engine.strip_parametrizations, or exclude it)"
                )
        kinds_g = [layer_kind(m) for m in mods]
        primary = next((i for i, k in enumerate(kinds_g) if k != "embedding"), 0)
        kind = kinds_g[primary]
        gkind = "embedding" if "embedding" in kinds_g else kind  # a tied pair: one rule
        bits_all = {cfg.bits_for(n, gkind) for n in gnames}
        if len(bits_all) != 1:
            raise ConfigError(
                f"tied layers {gnames} share one weight but get different bits {sorted(map(str, bits_all))}"
            )
        bits = bits_all.pop()
        if bits is None:
            skipped += gnames
            continue
        group = cfg.embedding_group_size if kind == "embedding" else cfg.group_size
        in_f = weight_matrix(mods[primary]).shape[1]
        if group is not None and group >= in_f:
            group = None
        if group is not None and in_f % group and cfg.per_channel_fallback:
            log.info("layer %s: width %d not divisible by %d: per channel", gnames[0], in_f, group)
            group = None
        if group is not None and in_f % group:
            raise ConfigError(
                f"group_size={group} for layer '{gnames[primary]}': does not divide its input "
                f"width {in_f}; use a divisor, or per_layer to give it other settings"
            )
        items.append(_Item(gnames, mods, primary, kind, bits, group))
    return items, skipped


def _stages(model: nn.Module, items: list[_Item], mode: str) -> list[list[_Item]]:
    if mode == "none":
        return [items]
    if mode == "layer":
        return [[it] for it in items]
    stages: dict[str, list[_Item]] = {}
    for it in items:
        stages.setdefault(block_of(model, it.names[it.primary]), []).append(it)
    return list(stages.values())


def _hessians(
    model: nn.Module, stage: list[_Item], batches: list, device: torch.device
) -> dict[str, torch.Tensor]:
    wanted = {
        it.names[it.primary]: it.modules[it.primary] for it in stage if it.kind != "embedding"
    }
    if not wanted:
        return {}
    acc = {n: HessianAccumulator(weight_matrix(m).shape[1], device) for n, m in wanted.items()}
    record_inputs(model, wanted, batches, lambda n, x: acc[n].add(x), device)
    out = {}
    for n, a in acc.items():
        if a.n == 0:
            raise ValueError(f"layer '{n}' was not called by the model on the calibration batches")
        out[n] = a.hessian
    return out


def quantize_weights_(
    model: nn.Module,
    config: WeightOnlyConfig | None = None,
    calibration: Iterable | None = None,
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Progress | None = None,
) -> WeightOnlyReport:
    """Quantize the weights of the selected matrix layers in place (see the module docstring).

    Parameters
    ----------
    model : any ``nn.Module`` (Hugging Face models included); not traced.
    config : :class:`WeightOnlyConfig`.
    calibration : batches for GPTQ: tensors, ``(inputs, targets)`` tuples or dicts of keyword
        arguments (``model(**batch)``), see :mod:`nncompress.engine.batches`. Also used by
        RTN, when given, to report each layer's output error.
    filter : ``filter(name, module) -> bool`` further restricting the layers.

    Returns
    -------
    WeightOnlyReport, one entry per quantized weight (tied layers share an entry).
    """
    cfg = config or WeightOnlyConfig()
    if not isinstance(cfg, WeightOnlyConfig):
        raise ConfigError(f"config: expected a WeightOnlyConfig, got {type(cfg).__name__}")
    start = time.perf_counter()
    items, skipped = _plan(model, cfg, filter)
    needs_h = any(it.kind != "embedding" for it in items)
    if cfg.method == "gptq" and needs_h and calibration is None:
        raise ConfigError(
            "method='gptq': needs calibration batches (calibration=...); or use method='rtn'"
        )
    batches = (
        take_batches(calibration, cfg.calibration_batches, "calibration")
        if calibration is not None and needs_h
        else []
    )
    device = model_device(model)
    report = WeightOnlyReport(skipped=skipped, calibration_batches=len(batches))
    stages = _stages(model, items, cfg.sequential) if batches else [items]
    if progress:
        progress(ProgressEvent("start", "quantize", total=len(items)))
    done = 0
    try:
        for stage in stages:
            hess = _hessians(model, stage, batches, device) if batches else {}
            report.passes += bool(hess)
            for it in stage:
                report.layers.append(_quantize_item(it, cfg, hess.get(it.names[it.primary])))
                done += 1
                if progress:
                    progress(
                        ProgressEvent(
                            "advance",
                            "quantize",
                            total=len(items),
                            completed=done,
                            info={"layer": it.names[it.primary]},
                        )
                    )
    finally:
        if progress:
            progress(ProgressEvent("end", "quantize"))
    report.seconds = time.perf_counter() - start
    return report


def _quantize_item(it: _Item, cfg: WeightOnlyConfig, hessian: torch.Tensor | None):
    m = it.modules[it.primary]
    w = weight_matrix(m)  # (out, in)
    rtn = rtn_quantize(w, it.bits, it.group, cfg.symmetric, mse_clip=cfg.mse_clip)
    method = "rtn"
    qw = rtn
    if cfg.method == "gptq" and hessian is not None:
        qw = gptq_quantize(
            w,
            hessian,
            it.bits,
            it.group,
            cfg.symmetric,
            block_size=cfg.block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            mse_clip=cfg.mse_clip,
        )
        method = "gptq"
    w_hat = qw.dequantize(torch.float32)
    if hessian is not None:
        error = layer_output_error(w, w_hat, hessian)
        error_rtn = layer_output_error(w, rtn.dequantize(torch.float32), hessian)
    else:
        wf = w.to(torch.float64)
        error = float((wf - w_hat.double()).pow(2).sum() / wf.pow(2).sum().clamp_min(1e-300))
        error_rtn = None
    install_quantized_(it.modules, qw)
    log.info("quantized %s (%s, %d bits): error %.3g", it.names[it.primary], method, it.bits, error)
    return LayerQuantReport(
        name=it.names[it.primary],
        kind=it.kind,
        shape=tuple(w.shape),
        bits=it.bits,
        group_size=qw.group_size,
        symmetric=cfg.symmetric,
        method=method,
        error=error,
        error_rtn=error_rtn,
        nbytes=qw.nbytes,
        tied=[n for i, n in enumerate(it.names) if i != it.primary],
    )
