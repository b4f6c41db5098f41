"""Per-layer parameter, nonzero, byte and MAC counts, and measured latency, for any nn.Module.

MACs are counted by running one forward pass with hooks on every Conv/Linear layer, so any
architecture works (no per-model tables). Dense MACs: ``out_elements * (C_in / groups) * kh * kw``
for convolutions and ``batch * in * out`` for Linear layers. Sparse MACs count only nonzero
weights: ``out_positions * nnz(weight)``, i.e. the work a sparse kernel would do.

Conditional models (early-exit networks, cascades) run only some branches per sample. They
follow a small protocol: ``forward_all(x)`` runs every branch (MACs are counted over it, the
worst case) and ``expected_macs(input_shape)`` returns the average MACs per sample implied by
the exit rates they record, or ``None``; :func:`model_stats` reports it as ``expected_macs``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..engine.train import model_device

__all__ = [
    "LayerStats",
    "ModelStats",
    "count_macs",
    "is_mac_layer",
    "layer_macs",
    "measure_latency",
    "model_stats",
]

_MAC_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class LayerStats:
    name: str
    type: str
    shape: list[int]
    params: int
    nonzeros: int
    macs: int = 0
    macs_nonzero: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def bytes_fp32(self) -> int:
        return 4 * self.params

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "bytes_fp32": self.bytes_fp32}


@dataclass
class ModelStats:
    layers: list[LayerStats]
    params: int
    nonzeros: int
    macs: int
    macs_nonzero: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    expected_macs: float | None = None

    @property
    def bytes_fp32(self) -> int:
        return 4 * self.params

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        out = {
            "params": self.params,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "bytes_fp32": self.bytes_fp32,
            "macs": self.macs,
            "macs_nonzero": self.macs_nonzero,
            "latency_ms": self.latency_ms,
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.expected_macs is not None:
            out["expected_macs"] = self.expected_macs
        return out


def is_mac_layer(m: nn.Module) -> bool:
    """Whether :func:`layer_macs` counts ``m`` (Conv1d/Conv2d/Linear, or a ``macs_per_row``)."""
    return isinstance(m, _MAC_TYPES) or hasattr(m, "macs_per_row")


def layer_macs(mod: nn.Module, output: torch.Tensor) -> tuple[int, int]:
    """``(dense, nonzero)`` MACs of one call of a MAC layer that produced ``output``."""
    if hasattr(mod, "macs_per_row"):  # TTLinear: the contractions of its cores
        dense = output.numel() // output.shape[-1] * mod.macs_per_row()
        return dense, dense
    w = mod.weight
    channels = output.shape[-1] if isinstance(mod, nn.Linear) else output.shape[1]
    positions = output.numel() // channels
    return positions * w.numel(), positions * int(torch.count_nonzero(w))


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """``{layer_name: (dense_macs, nonzero_macs)}`` for one sample of ``input_shape`` (no batch).

    A model with ``forward_all`` (a conditional model) is counted over it: every branch runs.
    """
    out: dict[str, tuple[int, int]] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs, output) -> None:
            dense, nonzero = layer_macs(mod, output)
            prev = out.get(name, (0, 0))
            out[name] = (prev[0] + dense, prev[1] + nonzero)

        return fn

    for name, m in model.named_modules():
        if is_mac_layer(m):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    run = getattr(model, "forward_all", model)
    try:
        with torch.no_grad():
            run(torch.zeros(1, *input_shape, device=model_device(model)))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    *,
    repeats: int = 50,
    warmup: int = 10,
    min_time_s: float = 0.0,
) -> float:
    """Median wall time in milliseconds of one forward pass at ``batch_size`` (warm-up excluded).

    Runs under ``torch.inference_mode`` with the model in eval mode; the training flag is
    restored afterwards.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: need repeats >= 1, warmup >= 0")
    x = torch.randn(batch_size, *input_shape, device=model_device(model))
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            start = time.perf_counter()
            while len(times) < repeats or time.perf_counter() - start < min_time_s:
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def model_stats(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    latency_batches: tuple[int, ...] = (),
    repeats: int = 50,
) -> ModelStats:
    """Per-layer and total statistics of ``model``.

    A "layer" is any module owning parameters directly (Conv, Linear, BatchNorm, ...). MACs need
    ``input_shape`` (one sample, e.g. ``(1, 28, 28)``); latency is measured for each batch size in
    ``latency_batches``.
    """
    macs = count_macs(model, input_shape) if input_shape is not None else {}
    layers = []
    for name, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        # a parametrized bias-free conv owns no parameter directly (its weight lives under
        # m.parametrizations.weight.original) but is still a layer
        if not own and not parametrize.is_parametrized(m):
            continue
        # Parametrized weights (masks, shared weights) are counted as their effective tensor.
        tensors = {}
        for pname, p in own:
            tensors[pname] = p
        if hasattr(m, "parametrizations"):
            tensors = {k: v for k, v in tensors.items() if k != "parametrizations"}
            for pname in m.parametrizations:
                tensors[pname] = getattr(m, pname)
        weight = tensors.get("weight")
        params = sum(t.numel() for t in tensors.values())
        nonzeros = sum(int(torch.count_nonzero(t)) for t in tensors.values())
        dense, sparse = macs.get(name, (0, 0))
        layers.append(
            LayerStats(
                name=name,
                type=type(m).__name__.removeprefix("Parametrized"),
                shape=list(weight.shape) if weight is not None else [],
                params=params,
                nonzeros=nonzeros,
                macs=dense,
                macs_nonzero=sparse,
            )
        )
    # parameters of parametrized modules live under m.parametrizations.*, which named_modules
    # lists as separate (ParametrizationList) modules: skip those to avoid double counting.
    layers = [layer for layer in layers if ".parametrizations." not in f".{layer.name}."]
    stats = ModelStats(
        layers=layers,
        params=sum(x.params for x in layers),
        nonzeros=sum(x.nonzeros for x in layers),
        macs=sum(x.macs for x in layers),
        macs_nonzero=sum(x.macs_nonzero for x in layers),
    )
    if input_shape is not None and callable(getattr(model, "expected_macs", None)):
        stats.expected_macs = model.expected_macs(input_shape)
    if input_shape is not None:
        for b in latency_batches:
            stats.latency_ms[f"batch_{b}"] = measure_latency(model, input_shape, b, repeats=repeats)
    return stats
