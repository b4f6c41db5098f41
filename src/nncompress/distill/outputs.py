"""Distillation on any output: hidden states, pooled embeddings, logits of any shape.

:func:`distillation_loss` (Hinton et al. 2015) scores classifier logits. A sentence encoder
or a language model is distilled on other tensors: the last hidden state (TinyBERT, Jiao et al.
2020, uses the MSE of hidden states), a pooled embedding (cosine, as sentence-embedding
distillation does), or per-token next-token distributions (KL at temperature ``T``, the soft
targets of Hinton et al. applied to every position). :func:`output_distillation_loss` builds
the ``loss_fn(outputs, targets, inputs)`` of :func:`nncompress.engine.fit` for any of them.

Run the student with dropout off (``fit(..., train_mode=False)``): with random dropout masks
the student cannot match a deterministic teacher's hidden states. Padding positions are left
out when the batch has an ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..engine.batches import call_inputs, main_output

__all__ = ["OutputDistillConfig", "output_distillation_loss", "output_loss"]

LOSSES = ("mse", "cosine", "kl")


def output_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between a student and a teacher tensor of the same shape (..., D).

    * ``mse``: mean over positions of ``||s - t||^2 / D``;
    * ``cosine``: mean over positions of ``1 - cos(s, t)`` along the last dimension;
    * ``kl``: mean over positions of ``T^2 KL(softmax(t/T) || softmax(s/T))`` along the last
      dimension (Hinton et al. 2015).

    ``mask`` (the leading dims of the tensors, e.g. (B, T) attention mask) keeps positions with
    nonzero entries. The teacher's tensor is detached.
    """
    if kind not in LOSSES:
        raise ValueError(f"kind={kind!r}: must be one of {LOSSES}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}: shapes differ"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    t = teacher.detach()
    if kind == "mse":
        per = (student - t).pow(2).mean(dim=-1)  # (...,)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(student, t, dim=-1)  # (...,)
    else:
        T = float(temperature)
        log_s = F.log_softmax(student / T, dim=-1)
        log_t = F.log_softmax(t / T, dim=-1)
        per = (log_t.exp() * (log_t - log_s)).sum(dim=-1) * T * T  # (...,)
    if mask is not None and mask.shape == per.shape:
        keep = mask.to(per.dtype)
        return (per * keep).sum() / keep.sum().clamp_min(1.0)
    return per.mean()


@dataclass(frozen=True)
class OutputDistillConfig:
    """Which output to distil and how.

    Attributes
    ----------
    loss : 'mse', 'cosine' or 'kl'.
    output : 'main' (the tensor :func:`nncompress.engine.batches.main_output` picks: the
        output itself, ``logits``, ``last_hidden_state`` or ``pooler_output``), or a key of the
        output mapping ('last_hidden_state', 'pooler_output', 'logits', 'hidden_states': then
        ``layer`` picks one; the batches must ask for ``output_hidden_states=True``).
    layer : index into ``hidden_states`` (default -1, the last).
    temperature : for 'kl'.
    own_loss_weight : weight of the loss the student computes itself (a Hugging Face model
        given ``labels``) added to the distillation term; 0 ignores it.
    """

    loss: str = "mse"
    output: str = "main"
    layer: int = -1
    temperature: float = 1.0
    own_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: must be one of {LOSSES}")
        if not isinstance(self.output, str) or not self.output:
            raise ConfigError(f"output={self.output!r}: must be 'main' or an output key")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ConfigError(f"layer={self.layer!r}: must be an integer")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r}: must be a number > 0")
        if not isinstance(self.own_loss_weight, (int, float)) or self.own_loss_weight < 0:
            raise ConfigError(f"own_loss_weight={self.own_loss_weight!r}: must be >= 0")


def _pick(out: Any, cfg: OutputDistillConfig, who: str) -> torch.Tensor:
    if cfg.output == "main":
        return main_output(out)
    if not isinstance(out, Mapping) or out.get(cfg.output) is None:
        keys = list(out.keys()) if isinstance(out, Mapping) else type(out).__name__
        raise ValueError(f"output={cfg.output!r}: the {who}'s output has no such entry ({keys})")
    v = out[cfg.output]
    if isinstance(v, (tuple, list)):
        return v[cfg.layer]
    return v


def output_distillation_loss(
    teacher: nn.Module, config: OutputDistillConfig | None = None
) -> Callable[[Any, Any, Any], torch.Tensor]:
    """``loss_fn(outputs, targets, inputs)`` for :func:`nncompress.engine.fit`: the frozen
    ``teacher`` runs on ``inputs`` in eval mode without gradients, and the chosen output of the
    student is scored against the teacher's with :func:`output_loss`."""
    cfg = config or OutputDistillConfig()
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher={type(teacher).__name__}: must be an nn.Module")

    def loss_fn(outputs: Any, targets: Any, inputs: Any) -> torch.Tensor:
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                t_out = call_inputs(teacher, inputs)
        finally:
            teacher.train(was_training)
        s, t = _pick(outputs, cfg, "student"), _pick(t_out, cfg, "teacher")
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        loss = output_loss(s, t, cfg.loss, temperature=cfg.temperature, mask=mask)
        own = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if cfg.own_loss_weight > 0 and isinstance(own, torch.Tensor):
            loss = loss + cfg.own_loss_weight * own
        return loss

    return loss_fn
