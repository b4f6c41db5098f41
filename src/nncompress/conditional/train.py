"""Training exit heads: jointly with the backbone (BranchyNet) or alone on a frozen backbone.

BranchyNet (Teerapittayanon et al. 2016, eq. 2) trains all exits at once on the weighted sum of
their losses,

.. math::  L = \\sum_{n=0}^{E} w_n \\, \\ell(z_n, y),

with :math:`z_E` the backbone's own output. Heads-only training keeps the backbone (and its
BatchNorm statistics) frozen, so the final exit stays exactly the original model. Either way the
early exits may learn from the final exit instead of (or beside) the labels: pass ``kd`` (for
example ``functools.partial(nncompress.distill.kd_loss, temperature=4.0, alpha=0.5)``) and
:math:`\\ell(z_n, y)` becomes ``kd(z_n, z_E, y)`` for the early exits, the final exit's logits
detached as the teacher (the family stays independent of :mod:`nncompress.distill`: the loss is
passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..core.progress import Progress
from ..core.validate import check
from ..engine.config import TrainConfig
from ..engine.train import History, fit
from .exits import EarlyExitNet

__all__ = ["MODES", "ExitTrainConfig", "exit_loss", "train_exits"]

MODES = ("joint", "heads")

KDLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExitTrainConfig:
    """How to train the exits (frozen; JSON/YAML-serialisable).

    Attributes
    ----------
    mode : ``"joint"`` (heads and backbone, BranchyNet) or ``"heads"`` (frozen backbone).
    weights : loss weight of each exit and, last, of the final output (``E + 1`` values);
        default 1.0 each. In ``heads`` mode the final output's weight is irrelevant.
    """

    mode: str = "joint"
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check(self.mode in MODES, "mode", self.mode, f"must be one of {MODES}")
        if self.weights is not None:
            try:
                weights = tuple(float(w) for w in self.weights)
            except (TypeError, ValueError):
                raise ConfigError(f"weights={self.weights!r}: must be a list of numbers") from None
            for i, w in enumerate(weights):
                if not w >= 0:
                    raise ConfigError(f"weights[{i}]={w!r}: must be >= 0")
            if not any(weights):
                raise ConfigError(f"weights={list(weights)}: at least one must be > 0")
            object.__setattr__(self, "weights", weights)


def exit_loss(
    weights: Sequence[float], *, kd: KDLoss | None = None, label_smoothing: float = 0.0
) -> Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]:
    """The joint loss ``sum_n w_n l(z_n, y)`` over ``E + 1`` outputs, as a ``loss_fn`` for
    :func:`nncompress.engine.fit` (outputs first, then targets and inputs).

    With ``kd``, each early exit's term is ``kd(z_n, z_E.detach(), y)``; the final output keeps
    cross-entropy.
    """
    weights = tuple(float(w) for w in weights)

    def loss_fn(outputs: list[torch.Tensor], y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if len(outputs) != len(weights):
            raise ValueError(f"{len(outputs)} outputs but {len(weights)} loss weights")
        final = outputs[-1]
        total = final.new_zeros(())
        for i, (z, w) in enumerate(zip(outputs, weights, strict=True)):
            if w == 0:
                continue
            if kd is not None and i < len(outputs) - 1:
                term = kd(z, final.detach(), y)
            else:
                term = F.cross_entropy(z, y, label_smoothing=label_smoothing)
            total = total + w * term
        return total

    return loss_fn


def train_exits(
    net: EarlyExitNet,
    train_loader: Iterable,
    config: TrainConfig | None = None,
    exits: ExitTrainConfig | None = None,
    *,
    kd: KDLoss | None = None,
    val_loader: Iterable | None = None,
    progress: Progress | None = None,
) -> History:
    """Train ``net``'s exits in place with :func:`nncompress.engine.fit`.

    In ``heads`` mode only the heads' parameters are optimised and the backbone stays in eval
    mode (restored to trainable afterwards). ``val_loader`` metrics (and ``restore_best``)
    measure ``net`` in eval mode, i.e. with its current thresholds: the final exit alone while
    every exit is closed.
    """
    if not isinstance(net, EarlyExitNet):
        raise ConfigError(f"net: expected an EarlyExitNet, got {type(net).__name__}")
    config = config or TrainConfig()
    exits = exits or ExitTrainConfig()
    weights = exits.weights or (1.0,) * (net.num_exits + 1)
    if len(weights) != net.num_exits + 1:
        raise ConfigError(
            f"weights={list(weights)}: need {net.num_exits + 1} (one per exit, then the final "
            "output)"
        )
    if exits.mode == "heads":
        weights = (*weights[:-1], 0.0)  # the frozen final output has nothing to learn
        if not any(weights):
            raise ConfigError(f"weights={list(exits.weights)}: every head has weight 0")
    loss_fn = exit_loss(weights, kd=kd, label_smoothing=config.label_smoothing)
    if exits.mode == "joint":
        return fit(
            net, train_loader, config, val_loader=val_loader, loss_fn=loss_fn, progress=progress
        )
    was_frozen = net.backbone_frozen
    flags = [p.requires_grad for p in net.backbone.parameters()]
    net.freeze_backbone_(True)
    try:
        return fit(
            net,
            train_loader,
            config,
            val_loader=val_loader,
            loss_fn=loss_fn,
            progress=progress,
            params=net.heads.parameters(),
        )
    finally:
        net.freeze_backbone_(was_frozen)  # then each parameter's own flag back
        for p, flag in zip(net.backbone.parameters(), flags, strict=True):
            p.requires_grad_(flag)
