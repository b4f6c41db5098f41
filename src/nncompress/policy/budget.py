"""Budgets of a policy search and the exact cost model that enforces them.

AMC (He et al., ECCV 2018, section 3.3) searches under a *hard* resource constraint: the
agent's action for layer ``t`` is clipped so that, even if every later layer is compressed as
much as allowed, the budget is met. Enforcing that needs the cost of a full assignment of
ratios without building the model; :class:`CostModel` computes it exactly from the layer
geometry and the channel couplings:

- ``macs``: ``sum_l positions_l * nnz_l`` (``nnz_l`` = weights kept in layer ``l`` after
  filter and connection pruning; with no connection pruning this is the dense Conv/Linear
  count of :func:`nncompress.stats.count_macs`);
- ``params``: parameters of the model with pruned weights not counted (biases and
  BatchNorm/LayerNorm parameters shrink with the channels they belong to);
- ``bytes``: an estimate of the ``.ncz`` file (:mod:`nncompress.io`) with fixed-width codes:
  a layer with ``b`` shared-weight bits stores ``2**b`` float32 centroids plus, whichever is
  smaller, one code per weight or one ``b``-bit code per nonzero with Deep Compression's
  relative index (8 bits for conv, 5 for FC layers, fillers estimated for uniformly spread
  nonzeros); other tensors raw. Huffman coding makes the real file smaller;
- ``latency``: ``t0 + c * dense MACs``, an affine model fitted to measured CPU latencies of
  uniformly thinned copies (:func:`nncompress.stages.search_model.fit_latency_model`).

A :class:`Budget` asks for at most ``fraction`` of the unpruned model's value; several can be
given at once and all are enforced.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import ConfigError

__all__ = [
    "METRICS",
    "Budget",
    "CostModel",
    "LatencyModel",
    "parse_budgets",
]

log = logging.getLogger(__name__)

METRICS = ("macs", "params", "bytes", "latency")
LATENCY_BATCHES = (1, 64)
_FRAME_BYTES = 8  # u32 length + u32 CRC32 per .ncz section
_HEADER_BYTES_PER_TENSOR = 40  # deflated JSON header entry, measured on the zoo models


@dataclass(frozen=True)
class Budget:
    """Keep at most ``fraction`` of the unpruned model's ``metric``.

    Attributes
    ----------
    metric : one of ``macs``, ``params``, ``bytes``, ``latency``.
    fraction : in (0, 1].
    batch : batch size of the latency measurement (1 or 64); latency budgets only.
    """

    metric: str
    fraction: float
    batch: int = 1

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"budget metric={self.metric!r}: must be one of {METRICS}")
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(
                f"budget {self.metric}={f!r}: must be a fraction in (0, 1] of the unpruned "
                "model's value"
            )
        object.__setattr__(self, "fraction", float(f))
        if self.batch not in LATENCY_BATCHES:
            raise ConfigError(f"budget batch={self.batch!r}: must be one of {LATENCY_BATCHES}")
        if self.metric != "latency" and self.batch != 1:
            raise ConfigError(f"budget {self.metric}: a batch size applies to latency only")

    def __str__(self) -> str:
        suffix = f"@{self.batch}" if self.metric == "latency" and self.batch != 1 else ""
        return f"{self.metric}{suffix}={self.fraction:g}"

    def to_dict(self) -> dict:
        return {"metric": self.metric, "fraction": self.fraction, "batch": self.batch}


_BUDGET_RE = re.compile(r"^\s*([a-z_]+)(?:@(\d+))?\s*=\s*([^\s,]+)\s*$")


def parse_budgets(text: str | Iterable[str | Budget | dict]) -> tuple[Budget, ...]:
    """Budgets from ``"macs=0.5,params=0.3"`` (or a list of such strings, dicts or Budgets).

    ``latency@64=0.7`` is a latency budget at batch 64 (batch 1 without ``@``). A metric may
    appear once (per latency batch).
    """
    items: list = []
    if isinstance(text, str):
        items = [t for t in text.split(",") if t.strip()]
    elif isinstance(text, list | tuple):
        items = list(text)
    else:
        raise ConfigError(f"budgets={text!r}: must be 'METRIC=FRACTION[,...]' or a list of them")
    if not items:
        raise ConfigError(f"budgets={text!r}: give at least one, e.g. 'macs=0.5'")
    out: list[Budget] = []
    for it in items:
        if isinstance(it, Budget):
            out.append(it)
            continue
        if isinstance(it, dict):
            try:
                out.append(Budget(**it))
            except TypeError as exc:
                raise ConfigError(f"budget {it!r}: {exc}") from None
            continue
        m = _BUDGET_RE.match(str(it))
        if not m:
            raise ConfigError(
                f"budgets: {it!r}: write METRIC=FRACTION, e.g. macs=0.5 (metrics: {METRICS}; "
                "latency@64=0.7 for batch 64)"
            )
        name, batch, value = m.group(1), m.group(2), m.group(3)
        if name not in METRICS:
            raise ConfigError(f"budget {it!r}: unknown metric {name!r}; allowed: {METRICS}")
        try:
            frac = float(value)
        except ValueError:
            raise ConfigError(f"budget {it!r}: {value!r} is not a number") from None
        out.append(Budget(name, frac, int(batch) if batch else 1))
    seen = set()
    for b in out:
        key = (b.metric, b.batch)
        if key in seen:
            raise ConfigError(f"budget {b}: {b.metric} is given twice")
        seen.add(key)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------


@dataclass
class LatencyModel:
    """``latency_ms = t0_ms + ms_per_mac * dense_macs`` at one batch size (least squares fit)."""

    batch: int
    t0_ms: float
    ms_per_mac: float
    dense_ms: float
    points: list[tuple[float, float]] = field(default_factory=list)  # (dense MACs, measured ms)

    def __call__(self, macs: float) -> float:
        return self.t0_ms + self.ms_per_mac * macs

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "t0_ms": self.t0_ms,
            "ms_per_mac": self.ms_per_mac,
            "dense_ms": self.dense_ms,
            "points": [list(p) for p in self.points],
        }


@dataclass
class LayerGeom:
    """One Conv/Linear layer as the cost model sees it."""

    name: str
    kind: str  # conv | linear | depthwise
    n_out: int
    n_in: int
    kernel: int
    groups: int
    positions: int  # output positions per sample
    bias: bool
    stride: int = 1


@dataclass
class FilterTable:
    """How removing the first ``r`` channels (in score order) of one coupled group shrinks the
    widths of every layer it touches: ``out[li][r]`` output channels of layer ``li``,
    ``inp[li][r]`` input features, ``follow[fi][r]`` channels of BatchNorm/LayerNorm ``fi``."""

    out: dict[int, np.ndarray]
    inp: dict[int, np.ndarray]
    follow: dict[int, np.ndarray]


def _expected_fillers(nnz: float, numel: float, index_bits: int) -> float:
    """Relative-index fillers for ``nnz`` nonzeros spread uniformly over ``numel`` positions.

    A gap ``g`` costs ``g // M`` fillers (``M = 2**b - 1``); with geometric gaps of density
    ``p``, ``E[g // M] = x / (1 - x)`` with ``x = (1 - p)**M``.
    """
    if nnz <= 0 or nnz >= numel:
        return 0.0
    p = nnz / numel
    x = (1.0 - p) ** ((1 << index_bits) - 1)
    return nnz * x / (1.0 - x)


def weight_bytes(numel: int, nnz: int, bits: int, conv: bool) -> float:
    """Estimated ``.ncz`` bytes of one weight tensor (see the module docstring).

    ``bits=0`` means no weight sharing: the tensor is stored raw (float32).
    """
    raw = 4.0 * numel + _FRAME_BYTES
    if bits <= 0 or numel == 0:
        return raw
    k = 1 << bits
    codebook = 4.0 * k + _FRAME_BYTES
    alphabet = k + 1 if nnz < numel else k
    dense_codes = numel * max(0, alphabet - 1).bit_length() / 8 + 2 + _FRAME_BYTES
    b_idx = 8 if conv else 5
    entries = nnz + _expected_fillers(nnz, numel, b_idx)
    sparse = (nnz * bits + entries * b_idx) / 8 + 4 + 2 * _FRAME_BYTES
    return min(raw, codebook + min(dense_codes, sparse))


class CostModel:
    """Exact MACs / params and estimated bytes / latency of any assignment of ratios.

    Built by :class:`nncompress.policy.env.ActionSpace`; all numbers are per sample.

    Parameters
    ----------
    layers : every Conv/Linear layer that ran in the forward pass.
    followers : ``(name, channels, params per channel, state elements per channel)`` of the
        BatchNorm/LayerNorm layers whose channels follow a coupled group.
    const_params, const_bytes : parameters and estimated bytes of everything else.
    tables : one :class:`FilterTable` per filter-pruning unit.
    latency : fitted latency models by batch size.
    """

    def __init__(
        self,
        layers: Sequence[LayerGeom],
        followers: Sequence[tuple[str, int, int, int]],
        const_params: int,
        const_bytes: float,
        tables: Sequence[FilterTable],
        latency: dict[int, LatencyModel] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.followers = list(followers)
        self.const_params = int(const_params)
        self.const_bytes = float(const_bytes)
        self.tables = list(tables)
        self.latency = dict(latency or {})
        self._n_out = np.array([g.n_out for g in self.layers], dtype=np.int64)
        self._n_in = np.array([g.n_in for g in self.layers], dtype=np.int64)
        self._kernel = np.array([g.kernel for g in self.layers], dtype=np.int64)
        self._groups = np.array([g.groups for g in self.layers], dtype=np.int64)
        self._pos = np.array([g.positions for g in self.layers], dtype=np.int64)
        self._bias = np.array([g.bias for g in self.layers], dtype=bool)
        self._dw = np.array([g.kind == "depthwise" for g in self.layers], dtype=bool)
        self._conv = np.array([g.kind != "linear" for g in self.layers], dtype=bool)
        self._f_ch = np.array([f[1] for f in self.followers], dtype=np.int64)
        self._f_par = np.array([f[2] for f in self.followers], dtype=np.int64)
        self._f_state = np.array([f[3] for f in self.followers], dtype=np.int64)
        self.index = {g.name: i for i, g in enumerate(self.layers)}

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def widths(self, removed: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Output widths, input widths (per layer) and follower widths after removing
        ``removed[u]`` channels of filter unit ``u``."""
        out, inp, fol = self._n_out.copy(), self._n_in.copy(), self._f_ch.copy()
        for table, r in zip(self.tables, removed, strict=True):
            if r:
                for li, cum in table.out.items():
                    out[li] -= cum[r]
                for li, cum in table.inp.items():
                    inp[li] -= cum[r]
                for fi, cum in table.follow.items():
                    fol[fi] -= cum[r]
        return out, inp, fol

    def numel(self, out: np.ndarray, inp: np.ndarray) -> np.ndarray:
        """Weight elements per layer for the given widths (depthwise: ``out * kernel``)."""
        dense = out * (inp // self._groups) * self._kernel
        return np.where(self._dw, out * self._kernel, dense)

    def evaluate(
        self,
        removed: Sequence[int],
        sparsity: np.ndarray | None = None,
        bits: np.ndarray | None = None,
        metrics: Iterable[str] = ("macs", "params", "bytes"),
    ) -> dict[str, float]:
        """Costs of one assignment.

        Parameters
        ----------
        removed : channels removed per filter unit (in the units' score order).
        sparsity : per layer, fraction of weights removed by connection pruning (0 = dense).
        bits : per layer, shared-weight bits (0 = float32, no sharing).
        metrics : which of ``macs``, ``dense_macs``, ``params``, ``bytes``, ``latency@B``.
        """
        out, inp, fol = self.widths(removed)
        numel = self.numel(out, inp)
        if sparsity is None:
            nnz = numel
        else:
            # prune_ keeps n - round(sparsity * n) (round half to even, as np.rint)
            nnz = numel - np.rint(sparsity * numel).astype(np.int64)
        res: dict[str, float] = {}
        for m in metrics:
            if m == "macs":
                res[m] = float(np.dot(self._pos, nnz))
            elif m == "dense_macs":
                res[m] = float(np.dot(self._pos, numel))
            elif m == "params":
                res[m] = float(
                    self.const_params
                    + nnz.sum()
                    + np.dot(self._bias, out)
                    + np.dot(self._f_par, fol)
                )
            elif m == "bytes":
                b = bits if bits is not None else np.zeros(self.n_layers, dtype=np.int64)
                wb = sum(
                    weight_bytes(int(numel[i]), int(nnz[i]), int(b[i]), bool(self._conv[i]))
                    for i in range(self.n_layers)
                )
                res[m] = float(
                    self.const_bytes
                    + wb
                    + float(np.dot(self._bias, out)) * 4
                    + float(np.dot(self._f_state, fol)) * 4
                )
            elif m.startswith("latency@"):
                batch = int(m.split("@")[1])
                model = self.latency.get(batch)
                if model is None:
                    raise ConfigError(f"no latency model fitted at batch {batch}")
                res[m] = float(model(float(np.dot(self._pos, numel))))
            else:
                raise ValueError(f"metric {m!r}: unknown")
        return res
