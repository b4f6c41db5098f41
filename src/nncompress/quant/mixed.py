"""Mixed-precision weight-only quantization under a file-size budget.

Which layers tolerate fewer bits is measured, not guessed (the issue that motivated this:
hand-picked per-layer bits on a BERT reached 7x only after trial and error). For each matrix
layer ``l`` (tied layers count once) and each candidate width ``b``, the layer alone is
quantized (round to nearest, group-wise) and the model's output distortion on calibration
batches is recorded,

    D_l(b) = ||f(x; W_l -> Q_b(W_l)) - f(x)||^2 / ||f(x)||^2,

as in the sensitivity scans of HAWQ (Dong et al. 2019, with the Hessian trace replaced by the
measured output error) and of Han et al.'s per-layer pruning sensitivity. With the additive
model ``D = sum_l D_l(b_l)``, choosing the widths is a multiple-choice knapsack:

    min sum_l D_l(b_l)   s.t.   sum_l C_l(b_l) + C_rest + C_header <= budget,

where ``C_l(b)`` is the exact size the ``.ncz`` affine scheme takes at fixed width (codes, float16
scales, zero points, section frames: an upper bound of what the file spends, since entropy
coding is only used when it is smaller), ``C_rest`` the size of every other tensor stored
dense in float16 (LayerNorms, biases, buffers) and ``C_header`` the compressed header. It is
solved exactly by dynamic programming over costs rounded *up* to a byte unit (at most 20,000
units), so the chosen widths never exceed the budget. A width of 16 means the layer stays in
float16 (cost ``2 * numel``, distortion taken as 0).

:func:`quantize_mixed_` then quantizes with those widths (GPTQ by default) and returns the
plan; saving with ``EncodeConfig(dense_dtype='fp16')`` gives a file within the budget.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..coding.bitpack import write_uvarint
from ..core.errors import ConfigError
from ..core.modules import model_device, strip_parametrizations_
from ..core.progress import ProgressEvent
from ..engine.batches import main_output, run_model, take_batches
from ..engine.layers import layer_kind, weight_matrix
from .groupwise import rtn_quantize
from .weight_only import WeightOnlyConfig, WeightOnlyReport, _plan, quantize_weights_

__all__ = [
    "MixedPrecisionConfig",
    "MixedPrecisionPlan",
    "affine_file_bytes",
    "plan_mixed_precision",
    "quantize_mixed_",
]

log = logging.getLogger(__name__)

FLOAT = 16  # "bits" of a layer left in float16
_FRAME = 8
_MAX_UNITS = 20_000


def _raw_stream_bytes(n: int, bits: int) -> int:
    return len(write_uvarint(n)) + 1 + math.ceil(n * bits / 8)


def affine_file_bytes(shape: tuple[int, int], bits: int, group: int, symmetric: bool) -> int:
    """Bytes the ``.ncz`` affine scheme spends on an (out x in) matrix at fixed width: the code
    stream, float16 scales, zero-point stream (asymmetric), one 8-byte frame per section. The
    file never spends more (an entropy-coded stream is kept only when smaller)."""
    out, inp = shape
    n_groups = out * (inp // group)
    total = _raw_stream_bytes(out * inp, bits) + _FRAME + 2 * n_groups + _FRAME
    if not symmetric:
        total += _raw_stream_bytes(n_groups, bits) + _FRAME
    return total


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Settings of :func:`quantize_mixed_`.

    Attributes
    ----------
    bit_choices : candidate widths per layer (2..8, and 16 = keep the layer in float16).
    quant : the :class:`WeightOnlyConfig` used for the final quantization (its ``bits`` and
        ``per_layer`` are replaced by the plan; group size, symmetry, method, embeddings,
        include/exclude apply to the scan too).
    sensitivity_batches : calibration batches used by the scan (each layer x width costs one
        forward pass over them).
    """

    bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 8, FLOAT)
    quant: WeightOnlyConfig = field(default_factory=WeightOnlyConfig)
    sensitivity_batches: int = 4

    def __post_init__(self) -> None:
        choices = tuple(self.bit_choices)
        if not choices or any(
            not isinstance(b, int) or isinstance(b, bool) or not (2 <= b <= 8 or b == FLOAT)
            for b in choices
        ):
            raise ConfigError(
                f"bit_choices={self.bit_choices!r}: must be a non-empty list of widths in "
                f"[2, 8] or {FLOAT} (float16)"
            )
        object.__setattr__(self, "bit_choices", tuple(sorted(set(choices))))
        if not isinstance(self.quant, WeightOnlyConfig):
            raise ConfigError(f"quant={self.quant!r}: must be a WeightOnlyConfig")
        if not isinstance(self.sensitivity_batches, int) or self.sensitivity_batches < 1:
            raise ConfigError(
                f"sensitivity_batches={self.sensitivity_batches!r}: must be an integer >= 1"
            )


@dataclass
class MixedPrecisionPlan:
    """The allocation: ``bits[layer]`` (16 = float16), the predicted file bytes (an upper
    bound) against ``budget``, and the measured ``distortion[layer][bits]``."""

    bits: dict[str, int]
    budget: int
    predicted_bytes: int
    fixed_bytes: int
    layer_bytes: dict[str, int]
    distortion: dict[str, dict[int, float]]
    predicted_distortion: float
    measured_bytes: int | None = None

    def per_layer(self) -> dict[str, int | None]:
        """``WeightOnlyConfig.per_layer`` of the plan (None = left in float)."""
        return {n: (None if b == FLOAT else b) for n, b in self.bits.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["distortion"] = {n: {str(b): v for b, v in r.items()} for n, r in self.distortion.items()}
        return d


def _dense_bytes(t: torch.Tensor) -> int:
    if t.dtype == torch.float32:
        return 2 * t.numel() + _FRAME  # dense_dtype='fp16'
    return t.numel() * t.element_size() + _FRAME


def _header_estimate(model: nn.Module, items, metadata: Any) -> int:
    """Prefix + framed header + framed metadata, from a header with the real names and shapes
    (values of the per-entry fields are close to the real ones; 64 bytes of slack)."""
    quantized = {f"{n}.weight" for it in items for n in it.names}
    entries = []
    for name, t in model.state_dict().items():
        e = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if name in quantized:
            rows, cols = weight_matrix(model.get_submodule(name[: -len(".weight")])).shape
            e.update(scheme="affine", bits=4, group=128, rows=rows, cols=cols, transpose=False)
            e.update(codes={"sec": 100, "codec": "huffman"}, scale=101)
            e.update(zero={"sec": 102, "codec": "huffman"})
        else:
            e.update(scheme="dense", store="float16", data=100)
        entries.append(e)
    header = {"format": "nncompress-ncz", "tensors": entries}
    head = zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), 9)
    meta = zlib.compress(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode(), 9)
    return 16 + len(head) + len(meta) + 2 * _FRAME + 64


def _sensitivity(
    model: nn.Module,
    items,
    choices: tuple[int, ...],
    qcfg: WeightOnlyConfig,
    batches: list,
    progress,
) -> dict[str, dict[int, float]]:
    """``D[layer][bits]``: relative output distortion with only that layer quantized (RTN)."""
    device = model_device(model)
    was = model.training
    model.eval()
    out: dict[str, dict[int, float]] = {}
    try:
        with torch.no_grad():
            refs = [main_output(run_model(model, b, device)).float() for b in batches]
            energy = sum(float(r.pow(2).sum()) for r in refs)
            total = len(items) * len([b for b in choices if b != FLOAT])
            done = 0
            if progress:
                progress(ProgressEvent("start", "sensitivity", total=total))
            for it in items:
                m = it.modules[it.primary]
                name = it.names[it.primary]
                w = m.weight  # the (tied) parameter
                saved = w.detach().clone()
                mat = weight_matrix(m)
                out[name] = {FLOAT: 0.0}
                for b in choices:
                    if b == FLOAT:
                        continue
                    q = rtn_quantize(mat, b, it.group, qcfg.symmetric, mse_clip=qcfg.mse_clip)
                    deq = q.dequantize(w.dtype)
                    w.data.copy_(deq.T if layer_kind(m) == "conv1d" else deq)
                    err = 0.0
                    for bt, r in zip(batches, refs, strict=True):
                        y = main_output(run_model(model, bt, device)).float()
                        err += float((y - r).pow(2).sum())
                    out[name][b] = err / max(energy, 1e-300)
                    w.data.copy_(saved)
                    done += 1
                    if progress:
                        progress(
                            ProgressEvent(
                                "advance",
                                "sensitivity",
                                total=total,
                                completed=done,
                                info={"layer": name},
                            )
                        )
    finally:
        model.train(was)
        if progress:
            progress(ProgressEvent("end", "sensitivity"))
    return out


def _knapsack(costs: list[list[int]], values: list[list[float]], budget: int) -> list[int] | None:
    """Multiple-choice knapsack: one option per row minimising the summed value with the
    summed cost <= budget. Exact on costs rounded up to ``unit`` bytes (never over budget);
    None when even the cheapest options do not fit."""
    if sum(min(c) for c in costs) > budget:
        return None
    unit = max(1, math.ceil(budget / _MAX_UNITS))
    cap = budget // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)  # best[u]: min value with rounded cost exactly <= u (so far)
    best[0:] = 0.0
    choice = np.zeros((len(costs), cap + 1), dtype=np.int16)
    for i, (cs, vs) in enumerate(zip(costs, values, strict=True)):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (c, v) in enumerate(zip(cs, vs, strict=True)):
            u = math.ceil(c / unit)
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + v
            better = cand < new
            new = np.where(better, cand, new)
            pick = np.where(better, j, pick)
        best = new
        choice[i] = pick
    if not np.isfinite(best[cap]):
        return None
    out, u = [], cap
    for i in range(len(costs) - 1, -1, -1):
        j = int(choice[i, u])
        out.append(j)
        u -= math.ceil(costs[i][j] / unit)
    return out[::-1]


def plan_mixed_precision(
    model: nn.Module,
    calibration: Iterable,
    config: MixedPrecisionConfig | None = None,
    *,
    target_bytes: int | None = None,
    target_ratio: float | None = None,
    metadata: Any = None,
    filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    distortion: dict[str, dict[int, float]] | None = None,
) -> MixedPrecisionPlan:
    """Per-layer widths meeting a ``.ncz`` size budget (see the module docstring).

    ``distortion``: a previous plan's scan of the same model, reused instead of measuring.

    Exactly one of ``target_bytes`` (file size) or ``target_ratio`` (dense float32 size of the
    state dict, tied tensors once, divided by the file size) must be given. ``metadata`` is
    what will be stored with the file (its size counts). Raises :class:`ConfigError` before
    the scan when even the narrowest widths exceed the budget.
    """
    cfg = config or MixedPrecisionConfig()
    if (target_bytes is None) == (target_ratio is None):
        raise ConfigError("give exactly one of target_bytes= or target_ratio=")
    items, _ = _plan(model, replace(cfg.quant, per_layer={}), filter)
    if not items:
        raise ConfigError("no layer to quantize: check include/exclude")
    quantized = {f"{n}.weight" for it in items for n in it.names}
    sd = model.state_dict()
    seen: set[tuple] = set()  # tied tensors (one storage under two names) count once
    dense_fp32 = 0
    fixed = 0
    for name, t in sd.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        dup = t.numel() > 0 and key in seen
        seen.add(key)
        if not dup:
            dense_fp32 += t.numel() * t.element_size()
        if name not in quantized and not dup:
            fixed += _dense_bytes(t)
    budget = int(target_bytes) if target_bytes is not None else int(dense_fp32 / target_ratio)
    if budget <= 0 or (target_ratio is not None and not target_ratio > 0):
        raise ConfigError(f"target: must give a positive size (got {budget} bytes)")
    header = _header_estimate(model, items, metadata)
    room = budget - fixed - header
    names = [it.names[it.primary] for it in items]
    costs = []
    for it in items:
        shape = tuple(weight_matrix(it.modules[it.primary]).shape)
        g = it.group or shape[1]
        row = [
            2 * shape[0] * shape[1] + _FRAME
            if b == FLOAT
            else affine_file_bytes(shape, b, g, cfg.quant.symmetric)
            for b in cfg.bit_choices
        ]
        costs.append(row)
    least = sum(min(c) for c in costs) + fixed + header
    if least > budget:
        raise ConfigError(
            f"target of {budget:,} bytes is below the smallest file these settings allow "
            f"({least:,} bytes: every layer at {min(cfg.bit_choices)} bits, the rest in float16)"
        )
    if distortion is None:
        batches = take_batches(calibration, cfg.sensitivity_batches, "calibration")
        dist = _sensitivity(model, items, cfg.bit_choices, cfg.quant, batches, progress)
    else:
        dist = distortion
    values = [[dist[n][b] for b in cfg.bit_choices] for n in names]
    pick = _knapsack(costs, values, room)
    assert pick is not None  # feasibility checked above
    bits = {n: cfg.bit_choices[j] for n, j in zip(names, pick, strict=True)}
    layer_bytes = {n: costs[i][j] for i, (n, j) in enumerate(zip(names, pick, strict=True))}
    # tied layers: the same width for every name sharing the weight
    for it in items:
        for n in it.names:
            bits[n] = bits[it.names[it.primary]]
    predicted = sum(layer_bytes.values()) + fixed + header
    return MixedPrecisionPlan(
        bits=bits,
        budget=budget,
        predicted_bytes=predicted,
        fixed_bytes=fixed + header,
        layer_bytes=layer_bytes,
        distortion=dist,
        predicted_distortion=float(sum(v[j] for v, j in zip(values, pick, strict=True))),
    )


def quantize_mixed_(
    model: nn.Module,
    calibration: Iterable,
    config: MixedPrecisionConfig | None = None,
    *,
    target_bytes: int | None = None,
    target_ratio: float | None = None,
    metadata: Any = None,
    filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    measure: Callable[[nn.Module], int] | None = None,
    refine: int = 2,
    distortion: dict[str, dict[int, float]] | None = None,
) -> tuple[MixedPrecisionPlan, WeightOnlyReport]:
    """Plan widths with :func:`plan_mixed_precision`, then quantize in place with them.

    ``calibration`` may be a list (it is read twice: the scan and GPTQ). Save with
    ``EncodeConfig(dense_dtype='fp16')`` to obtain a file within the budget.

    ``measure(model) -> bytes`` (e.g. the length of ``encode_state_dict``) enables up to
    ``refine`` refinements: the plan's sizes are fixed-width upper bounds, so the entropy-coded
    file usually comes out smaller; the slack is added to the budget of a new plan (same
    scan), which is kept only if its measured file still fits the original budget. The
    returned plan's ``budget`` is always the caller's. ``distortion``: a previous plan's scan
    of the same float model (e.g. for another budget), reused instead of measuring.
    """
    cfg = config or MixedPrecisionConfig()
    batches = list(calibration) if not isinstance(calibration, list) else calibration
    kwargs = dict(metadata=metadata, filter=filter, progress=progress)
    plan = plan_mixed_precision(
        model,
        batches,
        cfg,
        target_bytes=target_bytes,
        target_ratio=target_ratio,
        distortion=distortion,
        **kwargs,
    )
    budget = plan.budget
    original = copy.deepcopy(model) if measure is not None and refine > 0 else None
    qcfg = replace(cfg.quant, per_layer=plan.per_layer())
    report = quantize_weights_(model, qcfg, batches, filter=filter, progress=progress)
    if original is None:
        return plan, report
    size = measure(model)
    stretch, best = budget, None
    for _ in range(refine):
        if size >= budget:
            break
        stretch += budget - size
        trial = copy.deepcopy(original)
        try:
            p2 = plan_mixed_precision(
                trial, batches, cfg, target_bytes=stretch, distortion=plan.distortion, **kwargs
            )
        except ConfigError:
            break
        if p2.bits == plan.bits:
            continue
        quantize_weights_(
            trial, replace(cfg.quant, per_layer=p2.per_layer()), batches, filter=filter
        )
        s2 = measure(trial)
        if s2 > budget:
            break
        log.info("mixed precision refined: %d -> %d bytes of %d", size, s2, budget)
        plan, size, best = p2, s2, p2
    if best is not None:
        # redo the accepted plan on the model itself (GPTQ is deterministic: same result)
        strip_parametrizations_(model)
        model.load_state_dict(original.state_dict())
        report = quantize_weights_(
            model, replace(cfg.quant, per_layer=best.per_layer()), batches, filter=filter
        )
    plan.budget = budget
    plan.measured_bytes = size
    return plan, report
