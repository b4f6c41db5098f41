"""Configuration and reports of :func:`nncompress.quant.pq_transform.pq_quantize_` (product
quantization, Stock et al. 2020): a frozen, validated, JSON-able config and per-layer reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..core.validate import check as _check
from ..core.validate import is_int, is_number
from .pq import INITS, MAX_K, METRICS, OBJECTIVES

__all__ = ["CODEBOOK_DTYPES", "PQConfig", "PQLayerReport", "PQReport"]

CODEBOOK_DTYPES = ("fp16", "fp32")


def _is_int(v: Any, lo: int = 0) -> bool:
    return is_int(v) and v >= lo


def _is_num(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


@dataclass(frozen=True)
class PQConfig:
    """How :func:`pq_quantize_` quantizes a network.

    Attributes
    ----------
    block_size_conv, block_size_pw, block_size_fc : subvector size ``d`` for k x k convs
        (k > 1), 1x1 convs and Linear layers. "Small blocks" 9 / 4 / 4 (default), "large
        blocks" 18 / 8 / 8 (Stock et al. 4.1).
    per_layer_block_size : module name -> ``d``.
    k : codewords per layer (<= 65536); clamped per layer to the largest power of two with at
        least ``min_per_codeword`` subvectors per codeword (0 disables the clamp; ``k`` above a
        layer's subvector count is then an error).
    bits_per_weight : if set, each layer gets the largest power-of-two ``k <= k`` whose
        indices plus fp16 codebook take at most this many bits per weight.
    per_layer_k : module name -> exact ``k`` (must not exceed the layer's subvectors).
    objective : 'activation' (output reconstruction on calibration inputs) or 'weight'
        (``||W - W_hat||^2``, the ablation).
    metric : 'block' (one Gram per block) or 'shared' (one for all, as the reference code).
    em_iters, init, seed : EM settings.
    calibration_batches : calibration batches whose inputs each layer's ``X`` is sampled from.
    max_rows : rows of ``X`` sampled per layer (spread evenly over the batches).
    layer_steps, layer_lr : per-layer codeword fine-tuning (SGD steps on calibration batches).
    global_steps, global_lr : final fine-tuning of all codewords together.
    momentum, temperature : SGD momentum; distillation temperature ``T``.
    bn_batches : calibration batches for the BatchNorm statistics refresh (0: no refresh).
    bias_correction : for a layer with a bias, add the mean output error on the calibration
        rows to the bias after EM, and (activation objective) fit the codebook to the centered
        inputs, whose Gram is the covariance: the mean part of the error costs nothing then.
    zero_blocks : all-zero blocks (pruned) stay zero with a reserved code.
    codebook_dtype : 'fp16' rounds codebooks to float16 (what the file stores), or 'fp32'.
    """

    block_size_conv: int = 9
    block_size_pw: int = 4
    block_size_fc: int = 4
    per_layer_block_size: dict[str, int] = field(default_factory=dict)
    k: int = 256
    bits_per_weight: float | None = None
    min_per_codeword: int = 4
    per_layer_k: dict[str, int] = field(default_factory=dict)
    objective: str = "activation"
    metric: str = "block"
    em_iters: int = 20
    init: str = "kmeans++"
    seed: int = 0
    calibration_batches: int = 8
    max_rows: int = 16384
    layer_steps: int = 100
    layer_lr: float = 0.01
    global_steps: int = 0
    global_lr: float = 0.001
    momentum: float = 0.9
    temperature: float = 1.0
    bn_batches: int = 20
    bias_correction: bool = True
    zero_blocks: bool = True
    codebook_dtype: str = "fp16"

    def __post_init__(self) -> None:
        for name in ("block_size_conv", "block_size_pw", "block_size_fc"):
            v = getattr(self, name)
            _check(_is_int(v, 1), name, v, "must be an integer >= 1")
        for fname, lo, hi in (("per_layer_block_size", 1, None), ("per_layer_k", 1, MAX_K)):
            mapping = getattr(self, fname)
            _check(isinstance(mapping, dict), fname, mapping, "must be a mapping name -> int")
            for key, v in mapping.items():
                ok = _is_int(v, lo) and (hi is None or v <= hi)
                rng = f"[{lo}, {hi}]" if hi else f">= {lo}"
                _check(ok, f"{fname}['{key}']", v, f"must be an integer {rng}")
        _check(_is_int(self.k, 1) and self.k <= MAX_K, "k", self.k, f"must be in [1, {MAX_K}]")
        _check(
            self.bits_per_weight is None
            or (_is_num(self.bits_per_weight) and self.bits_per_weight > 0),
            "bits_per_weight",
            self.bits_per_weight,
            "must be a number > 0 or null",
        )
        _check(_is_int(self.min_per_codeword), "min_per_codeword", self.min_per_codeword, ">= 0")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"one of {OBJECTIVES}")
        _check(self.metric in METRICS, "metric", self.metric, f"must be one of {METRICS}")
        _check(self.init in INITS, "init", self.init, f"must be one of {INITS}")
        for name in ("em_iters", "calibration_batches", "max_rows"):
            v = getattr(self, name)
            _check(_is_int(v, 1), name, v, "must be an integer >= 1")
        for name in ("layer_steps", "global_steps", "bn_batches", "seed"):
            v = getattr(self, name)
            _check(_is_int(v), name, v, "must be an integer >= 0")
        for name in ("layer_lr", "global_lr", "temperature"):
            v = getattr(self, name)
            _check(_is_num(v) and v > 0, name, v, "must be a number > 0")
        _check(
            _is_num(self.momentum) and 0 <= self.momentum < 1,
            "momentum",
            self.momentum,
            "must be in [0, 1)",
        )
        for name in ("zero_blocks", "bias_correction"):
            v = getattr(self, name)
            _check(isinstance(v, bool), name, v, "must be true or false")
        _check(
            self.codebook_dtype in CODEBOOK_DTYPES,
            "codebook_dtype",
            self.codebook_dtype,
            f"must be one of {CODEBOOK_DTYPES}",
        )

    def block_size_for(self, name: str, module: nn.Module) -> int:
        if name in self.per_layer_block_size:
            return self.per_layer_block_size[name]
        if isinstance(module, nn.Linear):
            return self.block_size_fc
        return self.block_size_pw if math.prod(module.kernel_size) == 1 else self.block_size_conv

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PQLayerReport:
    """What :func:`pq_quantize_` did to one layer. Bits are fixed-width (indices at
    ``ceil(log2(k + zero code))`` bits, codebook in fp16); the ``.ncz`` file may entropy-code
    the indices below that."""

    name: str
    shape: tuple[int, ...]
    block_size: int
    k: int
    subvectors: int
    zero_blocks: int
    index_bits: int
    codebook_bits: int
    bits_per_weight: float
    em_iters: int
    objective: list[float]
    reseeded: int
    em_s: float = 0.0
    capture_s: float = 0.0
    finetune_s: float = 0.0
    kd_loss_before: float | None = None  # distillation loss on a batch, right after EM
    kd_loss_after: float | None = None  # ... after the layer's fine-tuning
    finetune_reverted: bool = False  # the fine-tuning raised that loss: EM's codebook kept


@dataclass
class PQReport:
    layers: list[PQLayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    coverage: Any = None  # nncompress.core.coverage.CoverageReport, set by pq_quantize_

    @property
    def weights(self) -> int:
        return sum(math.prod(r.shape) for r in self.layers)

    @property
    def bits(self) -> int:
        return sum(r.index_bits + r.codebook_bits for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "timings": dict(self.timings),
            "weights": self.weights,
            "bits": self.bits,
            "bits_per_weight": self.bits / self.weights if self.weights else 0.0,
            **({"coverage": self.coverage.to_dict()} if self.coverage is not None else {}),
        }
