"""Layer-wise pruning sensitivity analysis (Han et al. 2015, Figure 5).

Each prunable layer is pruned alone, by magnitude, to each sparsity of a grid (no retraining),
and the model is evaluated on the held-out split. The curves show which layers tolerate
pruning (Han: the first conv layer is the most sensitive, FC layers the least) and set
per-layer sparsities: :func:`thresholds_from_sensitivity` picks, per layer, the largest
sparsity whose accuracy drop stays within a tolerance; :func:`sparsities_for_budget` searches
the tolerance that reaches an overall sparsity target.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.files import atomic_write, atomic_write_json
from ..core.modules import folded_copy
from ..core.progress import Progress, progress_task
from ..core.select import Selectable
from ..engine.train import evaluate
from .magnitude import DEFAULT_INCLUDE, _check_sparsity, magnitude_mask, prunable_layers

__all__ = [
    "DEFAULT_SPARSITIES",
    "SensitivityResult",
    "plot_sensitivity",
    "sensitivity_analysis",
    "sparsities_for_budget",
    "thresholds_from_sensitivity",
    "write_sensitivity",
]

log = logging.getLogger(__name__)

#: default grid 0.1, 0.2, ..., 0.9, 0.95
DEFAULT_SPARSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class SensitivityResult:
    """Accuracy (%) on the held-out split with one layer pruned at a time.

    ``curves[layer]`` lists the accuracies at ``sparsities`` (same order); ``baseline`` is the
    accuracy of the unpruned model; ``params[layer]`` the layer's weight count.
    """

    sparsities: list[float]
    curves: dict[str, list[float]]
    baseline: float
    params: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sparsities": self.sparsities,
            "curves": self.curves,
            "baseline": self.baseline,
            "params": self.params,
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityResult:
        return cls(
            sparsities=[float(s) for s in d["sparsities"]],
            curves={k: [float(a) for a in v] for k, v in d["curves"].items()},
            baseline=float(d["baseline"]),
            params={k: int(v) for k, v in d.get("params", {}).items()},
            samples=int(d.get("samples", 0)),
        )


def _check_grid(sparsities: Sequence[float]) -> list[float]:
    grid = [float(s) for s in sparsities]
    if not grid:
        raise ConfigError("sparsities=[]: give at least one sparsity")
    for s in grid:
        _check_sparsity(s)
    if grid != sorted(grid):
        raise ConfigError(f"sparsities={grid}: must be increasing")
    return grid


@torch.no_grad()
def sensitivity_analysis(
    model: nn.Module,
    val_loader: Iterable,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    filter: Selectable = None,  # noqa: A002
    max_batches: int | None = None,
    progress: Progress | None = None,
) -> SensitivityResult:
    """Prune each layer alone to each sparsity of ``sparsities`` and evaluate on ``val_loader``.

    ``model`` is not modified (a copy with parametrizations folded is used). Pruning here is
    :func:`magnitude_mask` on the layer's current weights (existing zeros are pruned first).
    ``max_batches`` evaluates on a prefix of the loader for speed.
    """
    grid = _check_grid(sparsities)
    work = folded_copy(model)
    layers = prunable_layers(work, include, exclude, filter)
    if not layers:
        raise ConfigError(
            f"no prunable layer matched include={list(include)} exclude={list(exclude)}"
        )
    total = len(layers) * len(grid) + 1
    with progress_task(progress, "sensitivity", total) as task:
        base = evaluate(work, val_loader, max_batches=max_batches)
        task.completed = 1
        curves: dict[str, list[float]] = {}
        for name, m in layers.items():
            original = m.weight.detach().clone()  # (layer weight shape)
            nonzero = original != 0
            accs = []
            for s in grid:
                mask = magnitude_mask(original, s, nonzero)
                m.weight.copy_(original * mask)
                accs.append(evaluate(work, val_loader, max_batches=max_batches)["accuracy"])
                task.advance(layer=name, sparsity=s)
            m.weight.copy_(original)
            curves[name] = accs
            log.info("sensitivity %s: %s", name, dict(zip(grid, accs, strict=True)))
    return SensitivityResult(
        sparsities=grid,
        curves=curves,
        baseline=base["accuracy"],
        params={n: m.weight.numel() for n, m in layers.items()},
        samples=int(base["samples"]),
    )


def thresholds_from_sensitivity(
    result: SensitivityResult | Mapping[str, Any],
    max_drop: float,
) -> dict[str, float]:
    """Per-layer sparsity: the largest grid sparsity ``s`` such that the accuracy at ``s`` and
    at every smaller grid sparsity is at least ``baseline - max_drop`` (points). Layers that
    fail already at the first grid point get 0. Usable as ``MagnitudeConfig.per_layer``."""
    if not isinstance(result, SensitivityResult):
        result = SensitivityResult.from_dict(result)
    if max_drop < 0 or not math.isfinite(max_drop):
        raise ConfigError(f"max_drop={max_drop!r}: must be a finite number >= 0")
    floor = result.baseline - max_drop
    out = {}
    for name, accs in result.curves.items():
        best = 0.0
        for s, a in zip(result.sparsities, accs, strict=True):
            if a < floor:
                break
            best = s
        out[name] = best
    return out


def _loss_curves(result: SensitivityResult, names: list[str]) -> dict[str, list[float]]:
    """Accuracy loss of every layer at every grid point, made non-increasing in accuracy (a
    running minimum)."""
    loss: dict[str, list[float]] = {}
    for n in names:
        run, acc_min = [], result.baseline
        for a in result.curves[n]:
            acc_min = min(acc_min, a)
            run.append(result.baseline - acc_min)
        loss[n] = run
    return loss


def _greedy_moves(
    result: SensitivityResult,
    loss: dict[str, list[float]],
    pos: dict[str, int],
    per: dict[str, float],
    enough: Callable[[dict[str, float]], bool],
) -> None:
    """Move layers up the grid, smallest loss per weight removed first, until ``enough(per)``;
    then step layers back down while it still holds, largest loss saved per weight given back
    first (the last move may overshoot). Updates ``pos`` and ``per`` in place."""
    names, grid = list(result.curves), result.sparsities
    while not enough(per):
        best: tuple[float, float, str, int] | None = None
        for n in names:
            cur_loss = loss[n][pos[n]] if pos[n] >= 0 else 0.0
            cur_s = per[n]
            for j in range(pos[n] + 1, len(grid)):
                gain = (grid[j] - cur_s) * result.params[n]
                if gain <= 0:
                    continue
                ratio = max(0.0, loss[n][j] - cur_loss) / gain
                key = (ratio, -gain, n, j)
                if best is None or key < best:
                    best = key
        if best is None:  # pragma: no cover - excluded by the reachability check
            break
        _, _, n, j = best
        pos[n], per[n] = j, grid[j]
    while True:
        undo: tuple[float, str, int] | None = None
        for n in names:
            if pos[n] < 0:
                continue
            j = pos[n] - 1
            trial = {**per, n: grid[j] if j >= 0 else 0.0}
            if not enough(trial):
                continue
            saved = loss[n][pos[n]] - (loss[n][j] if j >= 0 else 0.0)
            back = (per[n] - trial[n]) * result.params[n]
            key = (-saved / back, n, j)
            if undo is None or key < undo:
                undo = key
        if undo is None:
            break
        _, n, j = undo
        pos[n], per[n] = j, grid[j] if j >= 0 else 0.0


def sparsities_for_budget(
    result: SensitivityResult,
    target_sparsity: float,
    *,
    method: str = "greedy",
    max_drop_grid: Sequence[float] | None = None,
) -> tuple[float, dict[str, float]]:
    """Per-layer sparsities (grid points) that prune at least ``target_sparsity`` of all the
    analysed weights, chosen from the sensitivity curves.

    ``method='greedy'`` (default): start from no pruning and repeatedly take the move (one
    layer to a larger grid sparsity) with the smallest accuracy loss per weight removed, using
    the curves made non-increasing (running minimum) and assuming the layers' losses add up.
    Large, tolerant layers are pruned hardest, as in Han's hand-set ratios. The overshoot of the
    last move is then trimmed: layers step back down the grid while the target still holds
    (largest loss saved per weight given back first).
    ``method='uniform'``: the smallest tolerated drop (from ``max_drop_grid``, default
    0.05..~30 points) for which :func:`thresholds_from_sensitivity` reaches the target.

    Returns ``(predicted or tolerated drop in points, per_layer_sparsity)``; raises if even the
    largest grid sparsities cannot reach the target (extend the analysis' grid).
    """
    _check_sparsity(target_sparsity)
    if method not in ("greedy", "uniform"):
        raise ConfigError(f"method={method!r}: must be 'greedy' or 'uniform'")
    total = sum(result.params.values())
    if not total:
        raise ConfigError("the sensitivity result has no parameter counts")
    names = list(result.curves)
    grid = result.sparsities

    def reached(per: Mapping[str, float]) -> float:
        return sum(per[n] * result.params[n] for n in names) / total

    best_possible = {n: max(grid) for n in names}
    if reached(best_possible) < target_sparsity - 1e-12:
        raise ConfigError(
            f"target_sparsity={target_sparsity}: the sensitivity grid up to {max(grid)} "
            f"reaches at most {reached(best_possible):.4f}; add larger sparsities"
        )
    if method == "uniform":
        drops = (
            list(max_drop_grid)
            if max_drop_grid is not None
            else [round(0.05 * 1.2**k, 4) for k in range(40)]
        )
        for d in drops:
            per = thresholds_from_sensitivity(result, d)
            if reached(per) >= target_sparsity - 1e-12:
                return d, per
        raise ConfigError(
            f"target_sparsity={target_sparsity}: no tolerated drop in {drops[-1]} points reaches "
            "it with method='uniform'"
        )
    # greedy: loss[n][j] = accuracy loss at grid point j (non-increasing accuracy assumed)
    loss = _loss_curves(result, names)
    pos = {n: -1 for n in names}  # -1 = unpruned
    per = {n: 0.0 for n in names}
    _greedy_moves(result, loss, pos, per, lambda p: reached(p) >= target_sparsity - 1e-12)
    predicted = sum(loss[n][pos[n]] for n in names if pos[n] >= 0)
    return predicted, per


def plot_sensitivity(result: SensitivityResult, path: str | Path, title: str = "") -> Path:
    """PNG plot, one accuracy-vs-sparsity curve per layer (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    xs = [100 * s for s in result.sparsities]
    for name, accs in result.curves.items():
        ax.plot(xs, accs, marker="o", markersize=3, label=name)
    ax.axhline(result.baseline, color="gray", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("parameters pruned away (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title or "pruning sensitivity (one layer at a time, no retraining)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def write_sensitivity(
    result: SensitivityResult, out_dir: str | Path, title: str = ""
) -> dict[str, Path]:
    """Write ``sensitivity.json`` and ``sensitivity.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    js = out_dir / "sensitivity.json"
    atomic_write_json(js, result.to_dict(), indent=2, sort_keys=True)
    png = plot_sensitivity(result, out_dir / "sensitivity.png", title)
    return {"json": js, "png": png}
