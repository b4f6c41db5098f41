"""Knowledge-distillation losses: soft targets (Hinton), attention transfer, relational KD.

All three are plain tensor functions (the teacher's tensors are treated as constants: they are
detached here, so passing a teacher output that still carries a graph is harmless).
:func:`distillation_loss` wraps :func:`kd_loss` into the ``loss_fn(outputs, targets, inputs)``
that :func:`nncompress.engine.fit` accepts, running a frozen teacher on each batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..engine.batches import call_inputs, main_output

__all__ = [
    "DistillConfig",
    "attention_map",
    "attention_transfer_loss",
    "distillation_loss",
    "kd_loss",
    "relational_kd_loss",
]

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)}: "
            "must both be (batch, classes) with the same shape"
        )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    .. math::

        L = \\alpha T^2 \\, \\mathrm{KL}\\big(\\mathrm{softmax}(t/T) \\,\\|\\,
            \\mathrm{softmax}(s/T)\\big) + (1 - \\alpha)\\, \\mathrm{CE}(s, y)

    with the KL divergence averaged over the batch. The soft term's gradient with respect to
    the student logits is ``T * (softmax(s/T) - softmax(t/T)) / B``; without the ``T^2`` factor
    it would shrink as ``1/T^2`` for large ``T`` (the paper's reason for the scaling), so the
    relative weight of the two terms stays ``alpha`` whatever the temperature.

    Parameters
    ----------
    student_logits, teacher_logits : ``(B, K)`` raw scores (the teacher's are detached).
    targets : ``(B,)`` integer labels; may be ``None`` only when ``alpha == 1``.
    temperature : ``T > 0``.
    alpha : weight of the soft-target term, in ``[0, 1]``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in [0, 1]")
    _check_logits(student_logits, teacher_logits)
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)  # (B, K)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)  # (B, K)
    # KL(p_t || p_s) = sum_k p_t (log p_t - log p_s), mean over the batch
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    loss = alpha * t * t * soft
    if alpha < 1.0:
        if targets is None:
            raise ValueError(f"targets=None: labels are needed when alpha={alpha} < 1")
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits, targets)
    return loss


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis 2017, flattened and L2-normalised.

    ``Q = vec(sum_c |A_c|^p)`` over the channels ``c`` of ``features`` ``(B, C, H, W)``, then
    ``Q / ||Q||_2`` per sample. Returns ``(B, H*W)``.
    """
    if features.dim() < 3:
        raise ValueError(
            f"features of shape {tuple(features.shape)}: need (B, C, H, W) or (B, C, L)"
        )
    if not p > 0:
        raise ValueError(f"p={p}: must be > 0")
    q = features.abs().pow(p).sum(dim=1).flatten(1)  # (B, H*W)
    return F.normalize(q, p=2.0, dim=1)


def attention_transfer_loss(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    p: float = 2.0,
) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention").

    .. math::

        L_{AT} = \\sum_j \\frac{1}{B} \\sum_b \\left\\| \\frac{Q_S^{j,b}}{\\|Q_S^{j,b}\\|_2}
            - \\frac{Q_T^{j,b}}{\\|Q_T^{j,b}\\|_2} \\right\\|_2,
        \\quad Q = \\mathrm{vec}\\Big(\\sum_c |A_c|^p\\Big)

    summed over the pairs ``j`` of (student, teacher) feature maps. Channel counts may differ
    between student and teacher; spatial sizes must match. The paper's weight ``beta / 2`` is
    left to the caller (it multiplies this value before adding it to the task loss).

    Parameters
    ----------
    student_feats, teacher_feats : one ``(B, C, H, W)`` tensor each, or equal-length sequences.
    p : exponent of the attention map (the paper uses 2).
    """
    if isinstance(student_feats, torch.Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, torch.Tensor):
        teacher_feats = [teacher_feats]
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"{len(student_feats)} student and {len(teacher_feats)} teacher feature maps: "
            "need the same number (at least one)"
        )
    total = student_feats[0].new_zeros(())
    for j, (s, t) in enumerate(zip(student_feats, teacher_feats, strict=True)):
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                f"feature pair {j}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}: batch "
                "and spatial sizes must match (channels may differ)"
            )
        diff = attention_map(s, p) - attention_map(t.detach(), p)  # (B, H*W)
        total = total + diff.norm(p=2, dim=1).mean()
    return total


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(N, N)`` between the rows of ``e`` ``(N, D)``.

    Computed from explicit differences rather than ``torch.cdist``: cdist's gradient at the
    zero diagonal is NaN-prone, while the masked square root below is exact and safe.
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # (N, N, D)
    sq = diff.pow(2).sum(-1)  # (N, N)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return torch.where(off, sq.clamp_min(1e-12).sqrt(), torch.zeros_like(sq))


def _distance_potential(e: torch.Tensor) -> torch.Tensor:
    d = _pairwise_distances(e)  # (N, N)
    n = len(e)
    mu = d.sum() / (n * (n - 1))  # mean over the ordered pairs i != j
    return d / mu.clamp_min(1e-12)


def _angle_potential(e: torch.Tensor) -> torch.Tensor:
    # unit difference vectors e_ij = (t_i - t_j) / ||t_i - t_j||, zero when i == j
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2.0, dim=2)  # (N, N, D)
    # cos of the angle at vertex j between t_i and t_k: <e_ij, e_kj>, all (j, i, k)
    unit = unit.transpose(0, 1)  # (N_j, N_i, D): unit[j, i] = e_ij
    return torch.bmm(unit, unit.transpose(1, 2))  # (N_j, N_i, N_k)


def relational_kd_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019), RKD-DA.

    Distance-wise potential ``psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu`` with ``mu`` the mean
    distance over all pairs ``i != j`` of the batch; angle-wise potential
    ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>`` with ``e_ij = (t_i - t_j) / ||t_i - t_j||_2``.

    .. math::

        L = \\lambda_D \\, \\overline{\\ell_\\delta}(\\psi_D^S, \\psi_D^T)
          + \\lambda_A \\, \\overline{\\ell_\\delta}(\\psi_A^S, \\psi_A^T)

    where :math:`\\ell_\\delta` is the Huber loss (delta = 1, i.e. smooth L1) averaged over all
    ``N^2`` pairs and ``N^3`` triplets (degenerate ones contribute zero to both sides). The
    defaults ``25`` and ``50`` are the paper's weights. Student and teacher embeddings may have
    different widths; only their relations are compared.

    Parameters
    ----------
    student_emb, teacher_emb : ``(N, D_s)`` and ``(N, D_t)`` (extra dims are flattened), N >= 2.
    """
    if distance_weight < 0 or angle_weight < 0:
        raise ValueError(
            f"distance_weight={distance_weight}, angle_weight={angle_weight}: must be >= 0"
        )
    s = student_emb.flatten(1)  # (N, D_s)
    t = teacher_emb.detach().flatten(1)  # (N, D_t)
    if len(s) != len(t) or len(s) < 2:
        raise ValueError(
            f"student_emb {tuple(student_emb.shape)} and teacher_emb {tuple(teacher_emb.shape)}: "
            "need the same batch size N >= 2"
        )
    loss = s.new_zeros(())
    if distance_weight > 0:
        with torch.no_grad():
            t_d = _distance_potential(t)
        loss = loss + distance_weight * F.smooth_l1_loss(_distance_potential(s), t_d)
    if angle_weight > 0:
        with torch.no_grad():
            t_a = _angle_potential(t)
        loss = loss + angle_weight * F.smooth_l1_loss(_angle_potential(s), t_a)
    return loss


@dataclass(frozen=True)
class DistillConfig:
    """Soft-target distillation settings (Hinton 2015), validated and JSON/YAML-serialisable.

    Attributes
    ----------
    temperature : softmax temperature ``T > 0`` (Hinton used 2-20; 4 is a common default).
    alpha : weight of the soft-target term in ``[0, 1]``; ``1 - alpha`` weighs the hard-label
        cross-entropy.
    label_free : use the soft-target term only (``alpha`` is then ignored and labels are never
        read), as when fine-tuning product-quantized codewords (Stock et al. 2019).
    """

    temperature: float = 4.0
    alpha: float = 0.9
    label_free: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature!r}: must be a number > 0")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha={self.alpha!r}: must be a number in [0, 1]")
        if not isinstance(self.label_free, bool):
            raise ConfigError(f"label_free={self.label_free!r}: must be true or false")


def distillation_loss(teacher: nn.Module, config: DistillConfig | None = None) -> LossFn:
    """A ``loss_fn(outputs, targets, inputs)`` for :func:`nncompress.engine.fit` that distils.

    On every call the frozen ``teacher`` runs on ``inputs`` in eval mode under ``no_grad``
    (its own ``training`` flag is restored afterwards and its parameters receive no gradient),
    and the student's ``outputs`` are scored with :func:`kd_loss`. With
    ``config.label_free`` the loss is ``T^2 KL(p_t || p_s)`` alone and ``targets`` are ignored.

    Example
    -------
    >>> fit(student, splits.loader("train"), cfg,
    ...     loss_fn=distillation_loss(teacher, DistillConfig(temperature=4, alpha=0.9)))
    """
    cfg = config or DistillConfig()
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher={type(teacher).__name__}: must be an nn.Module")
    alpha = 1.0 if cfg.label_free else cfg.alpha

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor):
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                teacher_logits = main_output(call_inputs(teacher, inputs))  # (B, K)
        finally:
            teacher.train(was_training)
        return kd_loss(
            main_output(outputs),
            teacher_logits,
            None if cfg.label_free else targets,
            temperature=cfg.temperature,
            alpha=alpha,
        )

    return loss_fn
