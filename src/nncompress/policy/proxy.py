"""The fast accuracy proxy of a candidate policy (AMC section 3.2): no fine-tuning.

A copy of the model is compressed as the candidate says (channels cut, connections pruned,
weights shared), the layers that lost input channels are refitted by least squares to the
original responses (:func:`nncompress.prune.reconstruct_`, AMC's channel-pruning
reconstruction), and the copy is evaluated on a fixed held-out subset. This is what each
executor worker runs; it takes plain data (:class:`ProxyData`, :class:`CompressionPlan`) so it
can run in another process or on another machine.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import ConfigError
from ..data.datasets import BatchLoader
from ..engine.train import evaluate
from ..prune.magnitude import magnitude_mask
from ..prune.reconstruct import (
    ReconstructionData,
    reconstruct_,
    reconstruction_data,
)
from ..prune.thin import thin_module
from ..quant.kmeans import KMeansConfig, share_weights_
from .env import ActionSpace, CompressionPlan

__all__ = ["ProxyConfig", "ProxyData", "evaluate_plan", "make_proxy_data"]


@dataclass(frozen=True)
class ProxyConfig:
    """How candidates are scored.

    Attributes
    ----------
    val_samples : size of the fixed held-out subset (drawn once with ``seed`` from the val
        split; all of it if smaller).
    calib_samples : training images used for the least-squares refit.
    points_per_image : output positions sampled per calibration image (AMC: 10).
    refit : refit the layers that lost input channels (filter pruning only).
    ridge : Tikhonov weight of the refit.
    batch_size : evaluation batch size.
    threads : torch threads while a candidate is evaluated (same in every executor, so the
        local and the Ray executor give bit-identical results).
    seed : seeds the subsets and the sampled positions.
    """

    val_samples: int = 1000
    calib_samples: int = 128
    points_per_image: int = 16
    refit: bool = True
    ridge: float = 1e-4
    batch_size: int = 250
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_samples", "calib_samples", "points_per_image", "batch_size", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"proxy.{name}={v!r}: must be an integer >= 1")
        if not isinstance(self.refit, bool):
            raise ConfigError(f"proxy.refit={self.refit!r}: must be true or false")
        if not self.ridge >= 0:
            raise ConfigError(f"proxy.ridge={self.ridge!r}: must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ProxyData:
    """What every worker needs once: the model, the held-out subset, the refit targets."""

    model: nn.Module
    val_x: torch.Tensor
    val_y: torch.Tensor
    recon: ReconstructionData | None


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _subset(x: torch.Tensor, y: torch.Tensor | None, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[: min(n, len(x))].sort().values
    return x[idx], (y[idx] if y is not None else None)


def make_proxy_data(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    space: ActionSpace,
    config: ProxyConfig,
) -> ProxyData:
    """Fix the held-out subset and compute the refit targets of every layer that any filter
    unit can cut (one forward pass of the unpruned model)."""
    if len(val[0]) == 0:
        raise ConfigError("val split is empty: the proxy needs held-out samples")
    work = copy.deepcopy(model).eval()
    vx, vy = _subset(val[0], val[1], config.val_samples, config.seed)
    recon = None
    if config.refit:
        names = sorted(
            {
                space.cost.layers[li].name
                for u in space.units
                if u.kind == "filter" and u.table is not None
                for li in u.table.inp
            }
        )
        if names:
            cx, _ = _subset(train[0], None, config.calib_samples, config.seed + 1)
            with _threads(config.threads):
                recon = reconstruction_data(
                    work, cx, names, points_per_image=config.points_per_image, seed=config.seed
                )
    return ProxyData(work, vx, vy, recon)


def apply_plan_(
    model: nn.Module,
    plan: CompressionPlan,
    data: ProxyData | None = None,
    config: ProxyConfig | None = None,
) -> list:
    """Compress ``model`` in place as ``plan`` says (refit when ``data`` has targets)."""
    for name, cut in plan.cuts.items():
        model.set_submodule(name, thin_module(model.get_submodule(name), cut))
    refit = []
    if data is not None and data.recon is not None and plan.refit:
        keep_out = {n: plan.cuts[n].keep_out for n in plan.refit}
        ridge = config.ridge if config is not None else 1e-4
        refit = reconstruct_(model, data.recon, plan.refit, keep_out=keep_out, ridge=ridge)
    with torch.no_grad():
        for name, s in plan.sparsity.items():
            w = model.get_submodule(name).weight
            w.mul_(magnitude_mask(w, s).to(w.dtype))
    if plan.bits:
        named = set(plan.bits)
        share_weights_(
            model, KMeansConfig(per_layer=dict(plan.bits)), filter=lambda n, m: n in named
        )
    return refit


def evaluate_plan(data: ProxyData, plan: CompressionPlan, config: ProxyConfig) -> dict:
    """Proxy accuracy (%) and loss of one candidate on the held-out subset.

    Runs with ``config.threads`` torch threads and restores the previous setting.
    """
    t0 = time.perf_counter()
    with _threads(config.threads):
        model = copy.deepcopy(data.model)
        refit = apply_plan_(model, plan, data, config)
        loader = BatchLoader(data.val_x, data.val_y, config.batch_size)
        res = evaluate(model, loader)
    return {
        "accuracy": float(res["accuracy"]),
        "loss": float(res["loss"]),
        "refit_error": (float(sum(r.error_after for r in refit) / len(refit)) if refit else None),
        "wall_s": time.perf_counter() - t0,
    }
