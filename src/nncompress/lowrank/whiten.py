"""Data-aware (whitened) truncated SVD of matrix layers, after SVD-LLM (Wang, Zheng, Wan &
Zhang, ICLR 2025) and ASVD (Yuan et al. 2023).

Plain truncated SVD minimises ``||W - W_r||_F``, which ignores that a transformer's inputs are
far from isotropic: at rank 128 a BERT's output cosine fell to 0.35. What matters is the
layer's output on real inputs ``X`` (n x in):

    min_{rank W' <= r} ||X W^T - X W'^T||_F^2 = ||(W - W') L||_F^2,    X^T X = L L^T,

with ``L`` the Cholesky factor of the input Gram matrix (damped by ``damp * mean(diag)``).
Its solution is the truncated SVD of the *whitened* matrix ``W L = U S V^T``:
``W' = U_r S_r V_r^T L^{-1}`` (SVD-LLM's truncation-aware whitening: truncating the smallest
singular values of ``W L`` is exactly optimal for the output error). The layer becomes
``Linear(in, r, bias=False)`` with weight ``S_r^{1/2} V_r^T L^{-1}`` followed by
``Linear(r, out)`` with ``U_r S_r^{1/2}`` and the original bias, the same structure
:func:`~nncompress.lowrank.svd_linear` builds, so checkpoints record and rebuild it.

Speed: one forward pass over the calibration batches records every selected layer's Gram
matrix at once (hooks), then one SVD per layer; no per-layer passes over the data, no
iterative refit (the closed form is already the least-squares optimum given the inputs).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import ProgressEvent
from ..engine.batches import take_batches
from ..engine.layers import matrix_layers, record_inputs, weight_matrix

__all__ = ["LayerWhitenedSVD", "WhitenedSVDConfig", "decompose_whitened_", "whitened_svd"]

log = logging.getLogger(__name__)


def whitened_svd(
    w: torch.Tensor, gram: torch.Tensor, rank: int | None = None, *, damp: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of the output-optimal rank-``rank`` approximation of ``w`` given ``X^T X``.

    Parameters
    ----------
    w : (out, in) weight.
    gram : (in, in) ``X^T X`` (any positive scale) of the layer's inputs.
    rank : kept rank (None: all, for inspecting the spectrum).
    damp : relative diagonal damping of ``gram`` before its Cholesky factorisation.

    Returns
    -------
    a (r, in), b (out, r) with ``w ~ b @ a``, and the singular values (min(out, in),) of the
    whitened matrix ``w L`` (all of them), in float64.
    """
    out, inp = w.shape
    if gram.shape != (inp, inp):
        raise ValueError(f"gram {tuple(gram.shape)} does not match w {tuple(w.shape)}")
    g = gram.detach().to(torch.float64)
    eye = torch.eye(inp, dtype=torch.float64, device=g.device)
    lam = damp * float(g.diagonal().mean()) + 1e-12
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)  # (in, in) lower
        if int(info) == 0:
            break
        lam *= 10.0
    else:
        raise ValueError("whitened_svd: the Gram matrix stays singular after damping")
    wl = w.detach().to(torch.float64) @ chol  # (out, in)
    u, s, vh = torch.linalg.svd(wl, full_matrices=False)  # (out,k) (k,) (k,in)
    r = len(s) if rank is None else int(rank)
    if not 1 <= r <= len(s):
        raise ValueError(f"rank={rank}: must be in [1, {len(s)}]")
    root = s[:r].sqrt()  # (r,)
    # a = S^1/2 V^T L^-1, by a triangular solve: a L = S^1/2 V^T
    a = torch.linalg.solve_triangular(chol.T, (root[:, None] * vh[:r]).T, upper=True).T
    b = u[:, :r] * root[None, :]  # (out, r)
    return a.to(w.dtype), b.to(w.dtype), s


def _rank_for_energy(s: torch.Tensor, energy: float) -> int:
    e = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
    return int(torch.searchsorted(e, torch.tensor(energy, dtype=e.dtype)).item()) + 1


@dataclass(frozen=True)
class WhitenedSVDConfig:
    """Which layers and which ranks (exactly one of ``rank``, ``rank_fraction``, ``energy``).

    ``rank_fraction``: the largest rank whose two factors keep at most that fraction of the
    layer's weights; ``energy``: the smallest rank keeping that fraction of the whitened
    spectrum's energy (the output energy); ``per_layer`` ``{name or pattern: {rule: value}}``
    or ``{name: None}`` to skip. Layers whose factors would not be smaller are skipped.
    """

    rank: int | None = None
    rank_fraction: float | None = None
    energy: float | None = None
    per_layer: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    damp: float = 1e-4
    calibration_batches: int | None = 16

    def __post_init__(self) -> None:
        rules = [k for k in ("rank", "rank_fraction", "energy") if getattr(self, k) is not None]
        if len(rules) != 1:
            raise ConfigError(
                f"exactly one of rank, rank_fraction, energy must be set (got {rules or 'none'})"
            )
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank={self.rank!r}: must be an integer >= 1")
        for k in ("rank_fraction", "energy"):
            v = getattr(self, k)
            if v is not None and not 0 < v <= 1:
                raise ConfigError(f"{k}={v!r}: must be in (0, 1]")
        for name in ("include", "exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.damp > 0:
            raise ConfigError(f"damp={self.damp!r}: must be > 0")

    def rule_for(self, name: str) -> dict[str, Any] | None:
        for key, v in self.per_layer.items():
            if key == name or fnmatch.fnmatchcase(name, key):
                return v
        return {k: getattr(self, k) for k in ("rank", "rank_fraction", "energy")}


@dataclass
class LayerWhitenedSVD:
    """One decomposed layer: rank, weights before/after, and the relative output error on the
    calibration inputs of the whitened factors and of plain SVD at the same rank."""

    name: str
    rank: int
    params_before: int
    params_after: int
    output_error: float
    output_error_plain_svd: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank(rule: dict[str, Any], s: torch.Tensor, out: int, inp: int) -> int:
    if rule.get("rank") is not None:
        return min(int(rule["rank"]), len(s))
    if rule.get("energy") is not None:
        return min(_rank_for_energy(s, float(rule["energy"])), len(s))
    return max(1, int(math.floor(float(rule["rank_fraction"]) * out * inp / (out + inp))))


def _rel_output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    d = (w - w_hat).double()
    g = gram.double()
    return float(((d @ g) * d).sum() / ((w.double() @ g) * w.double()).sum().clamp_min(1e-300))


def decompose_whitened_(
    model: nn.Module,
    config: WhitenedSVDConfig,
    calibration: Iterable,
    *,
    filter: Callable[[str, nn.Module], bool] | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> list[LayerWhitenedSVD]:
    """Replace each selected Linear / HF Conv1D layer by whitened low-rank factors, in place.

    ``calibration``: batches as :mod:`nncompress.engine.batches` describes; their inputs to
    every selected layer are recorded in one pass. Returns one entry per decomposed layer.
    """
    if not isinstance(config, WhitenedSVDConfig):
        raise ConfigError(f"config: expected a WhitenedSVDConfig, got {type(config).__name__}")
    layers = matrix_layers(model, config.include, config.exclude, ("linear", "conv1d"), filter)
    layers = [(n, m) for n, m in layers if config.rule_for(n) is not None]
    batches = take_batches(calibration, config.calibration_batches, "calibration")
    grams: dict[str, torch.Tensor] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (n, in)
        g = (rows.T @ rows).to(torch.float64)
        grams[name] = grams[name] + g if name in grams else g

    record_inputs(model, dict(layers), batches, on_input, model_device(model))
    results: list[LayerWhitenedSVD] = []
    if progress:
        progress(ProgressEvent("start", "whitened-svd", total=len(layers)))
    try:
        for i, (name, m) in enumerate(layers):
            if name not in grams:
                raise ValueError(f"layer '{name}' was not called on the calibration batches")
            res = _decompose_one(model, name, m, grams[name], config)
            if res is not None:
                results.append(res)
            if progress:
                progress(
                    ProgressEvent("advance", "whitened-svd", total=len(layers), completed=i + 1)
                )
    finally:
        if progress:
            progress(ProgressEvent("end", "whitened-svd"))
    return results


def _decompose_one(model, name, m, gram, config) -> LayerWhitenedSVD | None:
    w = weight_matrix(m)  # (out, in)
    out, inp = w.shape
    _, _, s = whitened_svd(w, gram, None, damp=config.damp)
    r = _rank(config.rule_for(name), s, out, inp)
    if r * (out + inp) >= out * inp:
        log.info("whitened SVD %s: rank %d would not save weights; skipped", name, r)
        return None
    a, b, _ = whitened_svd(w, gram, r, damp=config.damp)
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    plain = (u[:, :r] * sv[:r]) @ vh[:r]
    bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
    first = nn.Linear(inp, r, bias=False)
    second = nn.Linear(r, out, bias=bias is not None)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if bias is not None:
            second.bias.copy_(bias)
    block = nn.Sequential(first, second).to(device=w.device, dtype=w.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, block)
    return LayerWhitenedSVD(
        name=name,
        rank=r,
        params_before=out * inp,
        params_after=r * (out + inp),
        output_error=_rel_output_error(w, (b.double() @ a.double()).to(w.dtype), gram),
        output_error_plain_svd=_rel_output_error(w, plain.to(w.dtype), gram),
    )
