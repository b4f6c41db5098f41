"""Training, evaluation and fine-tuning loops with callbacks.

Compression techniques plug in through :class:`Callback` (after backward, after the optimizer
step, at epoch end) and through ``loss_fn`` (distillation). Library code never prints; pass a
``progress`` callable to receive :class:`ProgressEvent` objects (the CLI draws bars from them).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .config import TrainConfig

__all__ = [
    "Callback",
    "History",
    "ProgressEvent",
    "evaluate",
    "finetune",
    "fit",
    "model_device",
    "seed_everything",
]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[["ProgressEvent"], None]


@dataclass
class ProgressEvent:
    """What a long loop reports: ``kind`` in {'start', 'advance', 'end'}, ``task`` its name."""

    kind: str
    task: str
    total: int | None = None
    completed: int = 0
    info: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch RNGs (reproducible training on CPU)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class Callback:
    """Hooks into :func:`fit`. Override what you need; every hook gets the model."""

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def on_after_backward(self, model: nn.Module, step: int) -> None: ...
    def on_step_end(self, model: nn.Module, step: int) -> None: ...
    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> None: ...
    def on_train_end(self, model: nn.Module) -> None: ...


@dataclass
class History:
    """Per-epoch metrics returned by :func:`fit`.

    ``best_epoch``: the epoch whose weights were restored (early stopping or ``restore_best``;
    0 = the starting weights). ``start_val_accuracy``: held-out accuracy before training
    (measured with ``restore_best``).
    """

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    start_val_accuracy: float | None = None
    wall_time_s: float = 0.0

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}


def _weight_params(model: nn.Module) -> list[torch.Tensor]:
    """Parameters that L1 regularises: those with 2+ dims (weights, not biases or BN)."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


def _make_optimizer(model: nn.Module, cfg: TrainConfig, l2: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": l2}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # onecycle: linear ramp up for 30%, cosine down after
    if progress < 0.3:
        return 0.1 + 0.9 * progress / 0.3
    return 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))


def _default_loss(cfg: TrainConfig) -> LossFn:
    ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return lambda out, y, x: ce(out, y)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    progress: Progress | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (in %) and mean cross-entropy of ``model`` over ``loader``.

    The model's ``training`` flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct, total, loss_sum = 0, 0, 0.0
    n = len(loader) if hasattr(loader, "__len__") else None
    if progress:
        progress(ProgressEvent("start", "evaluate", total=n))
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
            if progress:
                progress(ProgressEvent("advance", "evaluate", total=n, completed=i + 1))
    finally:
        model.train(was_training)
        if progress:
            progress(ProgressEvent("end", "evaluate"))
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "samples": total}


def fit(
    model: nn.Module,
    train_loader: Iterable,
    config: TrainConfig | None = None,
    *,
    val_loader: Iterable | None = None,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    progress: Progress | None = None,
    params: Iterable[torch.Tensor] | None = None,
) -> History:
    """Train ``model`` in place and return its :class:`History`.

    Parameters
    ----------
    loss_fn : ``loss_fn(outputs, targets, inputs) -> loss``; cross-entropy by default.
        Distillation passes a loss that also runs the teacher on ``inputs``.
    params : parameters to optimise (default: all trainable parameters of ``model``).
    """
    cfg = config or TrainConfig()
    if cfg.early_stopping and val_loader is None:
        raise ValueError(
            f"early_stopping={cfg.early_stopping}: needs val_loader= (the held-out split); "
            "pass one or set early_stopping=0"
        )
    if cfg.restore_best and val_loader is None:
        raise ValueError(
            "restore_best=True: needs val_loader= (the held-out split); pass one or set it false"
        )
    seed_everything(cfg.seed)
    device = model_device(model)
    loss_fn = loss_fn or _default_loss(cfg)
    if params is not None:
        params = list(params)
        trainable = {id(p) for p in params}
        frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    else:
        frozen = []
    l1_on = cfg.l1 > 0
    l2 = cfg.weight_decay if (cfg.regularization_switch_epoch is None or not l1_on) else 0.0
    optimizer = _make_optimizer(model, cfg, l2)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = len(train_loader)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    history, step = History(), 0
    best_loss, best_state, bad_epochs = math.inf, None, 0
    if cfg.restore_best:  # (accuracy, weights, epoch) of the best held-out accuracy so far
        history.start_val_accuracy = evaluate(model, val_loader)["accuracy"]
        best_acc = (history.start_val_accuracy, copy.deepcopy(model.state_dict()), 0)
    start = time.perf_counter()
    for cb in callbacks:
        cb.on_train_begin(model, optimizer)
    if progress:
        progress(ProgressEvent("start", "train", total=total_steps))
    try:
        for epoch in range(cfg.epochs):
            if (
                cfg.regularization_switch_epoch is not None
                and epoch == cfg.regularization_switch_epoch
            ):
                l1_on = False  # L1 then L2 (Han 2015)
                optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in train_loader:
                factor = _lr_factor(cfg, step, total_steps, steps_per_epoch)
                for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                    g["lr"] = lr * factor
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss = loss_fn(out, y, x)
                if l1_on:
                    loss = loss + cfg.l1 * sum(p.abs().sum() for p in _weight_params(model))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for cb in callbacks:
                    cb.on_after_backward(model, step)
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                for cb in callbacks:
                    cb.on_step_end(model, step)
                step += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out.detach().argmax(1) == y).sum())
                seen += len(y)
                if progress:
                    progress(
                        ProgressEvent(
                            "advance",
                            "train",
                            total=total_steps,
                            completed=step,
                            info={
                                "epoch": epoch + 1,
                                "loss": loss_sum / seen,
                                "acc": 100.0 * correct / seen,
                            },
                        )
                    )
            metrics = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(1, seen),
                "train_accuracy": 100.0 * correct / max(1, seen),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if val_loader is not None:
                val = evaluate(model, val_loader)
                metrics.update(val_accuracy=val["accuracy"], val_loss=val["loss"])
            history.epochs.append(metrics)
            log.info("epoch %d: %s", epoch + 1, metrics)
            for cb in callbacks:
                cb.on_epoch_end(model, epoch, metrics)
            if cfg.restore_best and metrics["val_accuracy"] > best_acc[0]:
                best_acc = (metrics["val_accuracy"], copy.deepcopy(model.state_dict()), epoch + 1)
            if cfg.early_stopping and val_loader is not None:
                if metrics["val_loss"] < best_loss:
                    best_loss, bad_epochs, history.best_epoch = metrics["val_loss"], 0, epoch + 1
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
                    if bad_epochs >= cfg.early_stopping:
                        log.info("early stopping after epoch %d", epoch + 1)
                        break
        if cfg.restore_best:
            model.load_state_dict(best_acc[1])
            history.best_epoch = best_acc[2]
        elif best_state is not None:
            model.load_state_dict(best_state)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if progress:
            progress(ProgressEvent("end", "train"))
    for cb in callbacks:
        cb.on_train_end(model)
    history.wall_time_s = time.perf_counter() - start
    return history


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    config: TrainConfig | None = None,
    *,
    lr_scale: float = 0.1,
    **kwargs,
) -> History:
    """Retrain from the current weights at ``lr_scale`` times the config's learning rate.

    Han 2015 retrains pruned LeNets at 1/10 of the original rate (1/100 for AlexNet).
    """
    if lr_scale <= 0:
        raise ValueError(f"lr_scale={lr_scale}: must be > 0")
    cfg = config or TrainConfig()
    return fit(model, train_loader, cfg.replace(lr=cfg.lr * lr_scale), **kwargs)
