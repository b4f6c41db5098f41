"""Training, evaluation and fine-tuning loops with callbacks.

Compression techniques plug in through :class:`Callback` (after backward, after the optimizer
step, at epoch end) and through ``loss_fn`` (distillation). Library code never prints; pass a
``progress`` callable to receive :class:`ProgressEvent` objects (the CLI draws bars from them).

Batches may be ``(x, y)`` tuples, tensors or dicts of keyword arguments (Hugging Face,
``model(**batch)``; see :mod:`nncompress.engine.batches`). Nothing assumes classification
except the classification metrics: accuracy is reported only when the output is ``(B, K)``
scores and the target ``(B,)`` labels; a model that computes its own loss (a Hugging Face
output with ``loss``, given ``labels`` in the batch) is trained on that loss by default.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import TrainingError
from ..core.modules import model_device
from ..core.progress import Progress, ProgressEvent, progress_task
from .batches import LABEL_KEYS, main_output, split_batch, to_device
from .config import TrainConfig

__all__ = [
    "Callback",
    "EarlyStopping",
    "History",
    "L1ThenL2",
    "RestoreBest",
    "ProgressEvent",
    "evaluate",
    "finetune",
    "fit",
    "model_device",
    "seed_everything",
]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch RNGs (reproducible training on CPU)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Callback:
    """Hooks into :func:`fit`. Override what you need; every hook gets the model.

    ``on_loss`` may add terms to the training loss (it returns the new loss); setting
    ``stop_training = True`` in ``on_epoch_end`` ends training after that epoch.
    """

    stop_training: bool = False

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def on_epoch_begin(self, model: nn.Module, epoch: int) -> None: ...
    def on_loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        return loss

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

    def loss(out, y, x):
        own = _own_loss(out)
        if own is not None:
            return own
        if y is None:
            raise ValueError(
                "the batches carry no targets and the model returns no loss: pass loss_fn= "
                "(e.g. a distillation loss) or batches with targets"
            )
        return ce(main_output(out), y)

    return loss


def _own_loss(out) -> torch.Tensor | None:
    """The loss a model computed itself (Hugging Face outputs given ``labels``), if any."""
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    return None


def _takes_labels(model: nn.Module, key: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _prepare(batch, device, model: nn.Module):
    """``(model inputs, targets, (args, call kwargs))`` of a batch on ``device``; a dict batch
    keeps its labels in the call when the model's forward takes them (a Hugging Face model
    then computes its own loss)."""
    args, kwargs, y = split_batch(batch)
    args, kwargs = to_device(args, device), to_device(kwargs, device)
    y = to_device(y, device)
    inputs = kwargs if not args else (args[0] if len(args) == 1 and not kwargs else args)
    call = dict(kwargs)
    if isinstance(batch, dict):
        for k in LABEL_KEYS:
            if k in batch and _takes_labels(model, k):
                call[k] = to_device(batch[k], device)
    return inputs, y, (args, call)


def _is_classification(out: torch.Tensor, y) -> bool:
    return (
        isinstance(y, torch.Tensor)
        and out.dim() == 2
        and y.dim() == 1
        and len(y) == len(out)
        and not y.is_floating_point()
    )


def _val_score(val: dict) -> float:
    """Held-out score to maximise: accuracy, or minus the loss when there is none."""
    return val["accuracy"] if "accuracy" in val else -val["loss"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    progress: Progress | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (in %) and mean cross-entropy of ``model`` over ``loader``.

    For outputs that are not ``(B, K)`` scores with ``(B,)`` labels, ``loss`` is the mean of the
    loss the model computes itself (Hugging Face outputs with ``labels`` in the batch) and
    ``accuracy`` is absent. The model's ``training`` flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct, total, loss_sum, classified = 0, 0, 0.0, True
    n = len(loader) if hasattr(loader, "__len__") else None
    with progress_task(progress, "evaluate", n) as task:
        try:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                _, y, (args, call) = _prepare(batch, device, model)
                raw = model(*args, **call)
                out = main_output(raw)
                if _is_classification(out, y):
                    loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                    correct += int((out.argmax(1) == y).sum())
                    total += len(y)
                elif _own_loss(raw) is not None:
                    classified = False
                    loss_sum += float(_own_loss(raw)) * len(out)
                    total += len(out)
                else:
                    raise ValueError(
                        f"evaluate: output {tuple(out.shape)} with targets "
                        f"{None if y is None else tuple(y.shape)} is not classification and "
                        "the model returns no loss; use fidelity metrics instead"
                    )
                task.advance(i + 1)
        finally:
            model.train(was_training)
    if total == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    if not classified:
        return {"loss": loss_sum / total, "samples": total}
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "samples": total}


class L1ThenL2(Callback):
    """L1 penalty ``loss + l1 * sum |W|`` on the weights (2+ dims), switched to L2 (weight
    decay) at ``switch_epoch`` (Han 2015's L1-then-L2; ``None``: L1 throughout)."""

    def __init__(self, l1: float, weight_decay: float, switch_epoch: int | None) -> None:
        self.l1, self.weight_decay, self.switch_epoch = l1, weight_decay, switch_epoch
        self.active = l1 > 0
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def on_epoch_begin(self, model: nn.Module, epoch: int) -> None:
        if self.switch_epoch is not None and epoch == self.switch_epoch:
            self.active = False  # L1 then L2 (Han 2015)
            self.optimizer.param_groups[0]["weight_decay"] = self.weight_decay

    def on_loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return loss
        return loss + self.l1 * sum(p.abs().sum() for p in _weight_params(model))


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a lower held-out loss; at the end, put back the
    weights of the best epoch (unless ``restore`` is false) and record it as
    ``history.best_epoch``."""

    def __init__(self, patience: int, history: History, restore: bool = True) -> None:
        self.patience, self.history, self.restore = patience, history, restore
        self.best_loss, self.best_state, self.bad_epochs = math.inf, None, 0

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> None:
        if metrics["val_loss"] < self.best_loss:
            self.best_loss, self.bad_epochs = metrics["val_loss"], 0
            self.history.best_epoch = epoch + 1
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                log.info("early stopping after epoch %d", epoch + 1)
                self.stop_training = True

    def on_train_end(self, model: nn.Module) -> None:
        if self.restore and self.best_state is not None:
            model.load_state_dict(self.best_state)


class RestoreBest(Callback):
    """Evaluate the held-out split before training and after every epoch; at the end, restore
    the weights with the best held-out accuracy (the starting weights included, so training
    never ends worse on held-out data than it began); minus the held-out loss for models
    without a classification output."""

    def __init__(self, val_loader: Iterable, history: History) -> None:
        self.val_loader, self.history = val_loader, history
        self.best: tuple[float, dict, int] | None = None  # (accuracy, weights, epoch)

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        val = evaluate(model, self.val_loader)
        self.history.start_val_accuracy = val.get("accuracy")
        self.best = (_val_score(val), copy.deepcopy(model.state_dict()), 0)

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict) -> None:
        score = metrics["val_accuracy"] if "val_accuracy" in metrics else -metrics["val_loss"]
        if score > self.best[0]:
            self.best = (score, copy.deepcopy(model.state_dict()), epoch + 1)

    def on_train_end(self, model: nn.Module) -> None:
        model.load_state_dict(self.best[1])
        self.history.best_epoch = self.best[2]


def _builtin_callbacks(cfg: TrainConfig, val_loader: Iterable | None, history: History):
    """The callbacks a :class:`TrainConfig` asks for (regularisation, early stopping,
    restore-best), in the order they must run after the user's."""
    out: list[Callback] = []
    if cfg.l1 > 0 or cfg.regularization_switch_epoch is not None:
        out.append(L1ThenL2(cfg.l1, cfg.weight_decay, cfg.regularization_switch_epoch))
    if cfg.early_stopping:
        out.append(EarlyStopping(cfg.early_stopping, history, restore=not cfg.restore_best))
    if cfg.restore_best:
        out.append(RestoreBest(val_loader, history))
    return out


def _freeze_others(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list:
    """Turn off ``requires_grad`` of the trainable parameters not in ``params``; returns them."""
    if params is None:
        return []
    trainable = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


@dataclass
class _Loop:
    """What every step of :func:`fit` needs."""

    cfg: TrainConfig
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    callbacks: list[Callback]
    loss_fn: LossFn
    device: torch.device
    total_steps: int
    task: Any
    train_mode: bool = True


def _train_epoch(
    model: nn.Module, loader: Iterable, loop: _Loop, epoch: int, step: int
) -> tuple[dict, int]:
    """One pass over ``loader``; returns the epoch's training metrics and the next step."""
    cfg, optimizer, callbacks = loop.cfg, loop.optimizer, loop.callbacks
    steps_per_epoch = len(loader)
    model.train(loop.train_mode)
    loss_sum, correct, seen, classified = 0.0, 0, 0, True
    for batch in loader:
        factor = _lr_factor(cfg, step, loop.total_steps, steps_per_epoch)
        for g, lr in zip(optimizer.param_groups, loop.base_lrs, strict=True):
            g["lr"] = lr * factor
        x, y, (args, call) = _prepare(batch, loop.device, model)
        raw = model(*args, **call)
        loss = loop.loss_fn(raw, y, x)
        # a model with several outputs (early exits) lists them; the last is the final one
        out = main_output(raw[-1] if isinstance(raw, (list, tuple)) else raw).detach()
        for cb in callbacks:
            loss = cb.on_loss(model, loss)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} "
                f"(lr={optimizer.param_groups[0]['lr']:.4g}): training diverged, nothing is "
                "saved; lower the learning rate (or check the data)"
            )
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
        n_b = len(out)
        loss_sum += value * n_b
        if classified and _is_classification(out, y):
            correct += int((out.argmax(1) == y).sum())
        else:
            classified = False  # accuracy only for (B, K) scores with (B,) labels
        seen += n_b
        info = {"epoch": epoch + 1, "loss": loss_sum / seen}
        if classified:
            info["acc"] = 100.0 * correct / seen
        loop.task.advance(step, **info)
    metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen)}
    if classified:
        metrics["train_accuracy"] = 100.0 * correct / max(1, seen)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics, step


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
    train_mode: bool = True,
) -> History:
    """Train ``model`` in place and return its :class:`History`.

    The config's L1-then-L2 regularisation, early stopping and restore-best run as the
    callbacks :class:`L1ThenL2`, :class:`EarlyStopping` and :class:`RestoreBest`, after the
    caller's ``callbacks``.

    Parameters
    ----------
    loss_fn : ``loss_fn(outputs, targets, inputs) -> loss``; by default the loss the model
        computes itself (Hugging Face outputs given ``labels``), else cross-entropy of the
        main output. ``inputs`` is what the model was called with (a tensor, a tuple of
        positional tensors or a dict of keyword arguments; see
        :func:`nncompress.engine.batches.call_inputs`); distillation runs the teacher on it.
    params : parameters to optimise (default: all trainable parameters of ``model``).
    train_mode : False keeps the model in eval mode while training (dropout off, BatchNorm
        statistics frozen), e.g. to distill a transformer's hidden states.
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
    frozen = _freeze_others(model, params)
    # L1 then L2: no weight decay while the L1 penalty is on
    l2 = 0.0 if (cfg.l1 > 0 and cfg.regularization_switch_epoch is not None) else cfg.weight_decay
    optimizer = _make_optimizer(model, cfg, l2)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = len(train_loader)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    history, step = History(), 0
    builtins = _builtin_callbacks(cfg, val_loader, history)
    callbacks = [*callbacks, *builtins]
    start = time.perf_counter()
    for cb in callbacks:
        cb.on_train_begin(model, optimizer)
    with progress_task(progress, "train", total_steps) as task:
        loop = _Loop(
            cfg, optimizer, base_lrs, callbacks, loss_fn, device, total_steps, task, train_mode
        )
        try:
            for epoch in range(cfg.epochs):
                for cb in callbacks:
                    cb.on_epoch_begin(model, epoch)
                metrics, step = _train_epoch(model, train_loader, loop, epoch, step)
                if val_loader is not None:
                    val = evaluate(model, val_loader)
                    metrics["val_loss"] = val["loss"]
                    if "accuracy" in val:
                        metrics["val_accuracy"] = val["accuracy"]
                history.epochs.append(metrics)
                log.info("epoch %d: %s", epoch + 1, metrics)
                shown = {k: v for k, v in metrics.items() if k != "epoch"}
                task.advance(step, epoch=epoch + 1, epochs=cfg.epochs, epoch_done=True, **shown)
                for cb in callbacks:
                    cb.on_epoch_end(model, epoch, metrics)
                if any(cb.stop_training for cb in callbacks):
                    break
        finally:
            for p in frozen:
                p.requires_grad_(True)
    # the built-in callbacks (restoring the best weights) end first, then the caller's
    for cb in [*builtins, *callbacks[: len(callbacks) - len(builtins)]]:
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
