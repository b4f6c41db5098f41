"""Codeword fine-tuning by label-free distillation and the BatchNorm refresh of
:func:`nncompress.quant.pq_transform.pq_quantize_` (Stock et al. 2020, section 3.3).

The loss is Hinton et al.'s soft-target term alone, ``T^2 KL(softmax(t/T) || softmax(s/T))``
between the teacher's outputs ``t`` and the student's ``s``: no labels are needed, so any
unlabelled calibration batches will do. (Written here rather than imported from
``nncompress.distill``: families do not import each other.)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import Progress, progress_task

__all__ = ["batches", "cycle", "distill", "inputs", "kd", "kd_on", "refresh_batchnorm_"]


def inputs(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise ConfigError(
            f"calibration_loader: a batch is a {type(x).__name__}; expected a tensor or an "
            "(inputs, targets) pair"
        )
    return x


def batches(loader: Iterable, n: int, device: torch.device) -> Iterable[torch.Tensor]:
    for batch in itertools.islice(loader, n):
        yield inputs(batch).to(device)


def cycle(loader: Iterable, device: torch.device) -> Iterable[torch.Tensor]:
    """Batches forever, restarting the loader when it ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield inputs(batch).to(device)
        if empty:
            raise ConfigError("calibration_loader: yielded no batches")


def kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` over the last dim, mean over the rest
    (Hinton et al. 2015; labels are never used)."""
    log_s = F.log_softmax(student.flatten(0, -2) / t, dim=-1)  # (rows, classes)
    log_t = F.log_softmax(teacher.detach().flatten(0, -2) / t, dim=-1)  # (rows, classes)
    return t * t * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def distill(
    model: nn.Module,
    teacher: nn.Module,
    codebooks: list[torch.Tensor],
    loader: Iterable,
    steps: int,
    lr: float,
    *,
    momentum: float,
    temperature: float,
    train: bool,
    progress: Progress | None,
    task: str,
) -> float | None:
    """``steps`` SGD steps (momentum) on ``codebooks`` minimising :func:`kd` against the
    teacher, the model in train or eval mode (``train``); returns the last loss."""
    was = model.training
    model.train(train)
    device = model_device(model)
    opt = torch.optim.SGD(codebooks, lr=lr, momentum=momentum)
    loss_v = None
    try:
        with progress_task(progress, task, steps) as bar:
            for _, x in zip(range(steps), cycle(loader, device), strict=False):
                with torch.no_grad():
                    t_out = teacher(x)
                loss = kd(model(x), t_out, temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_v = float(loss.detach())
                bar.advance(loss=loss_v)
    finally:
        model.train(was)
    return loss_v


@torch.no_grad()
def kd_on(model, teacher, x, t: float) -> float:
    was = model.training
    model.eval()
    try:
        return float(kd(model(x), teacher(x), t))
    finally:
        model.train(was)


@torch.no_grad()
def refresh_batchnorm_(model: nn.Module, loader: Iterable, n_batches: int) -> int:
    """Recompute every BatchNorm's running mean / variance as the cumulative average over
    ``n_batches`` batches (momentum None), in train mode without gradients. Returns the number
    of BatchNorm layers refreshed."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches == 0:
        return 0
    device = model_device(model)
    saved = [(m, m.momentum) for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for x in batches(loader, n_batches, device):
            model(x)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return len(bns)
