"""Fidelity of a compressed model to its original when there are no labels: output cosine,
relative error, KL divergence of the output distributions and, for language models,
perplexity on held-out text."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.progress import Progress, progress_task
from ..engine.batches import main_output, run_model, split_batch

__all__ = ["fidelity", "is_causal_lm"]


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (``...ForCausalLM`` / ``...LMHeadModel``)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count (positions 1.. predicted)."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    tgt = ids[:, 1:]  # (B, T-1)
    nll = -lp.gather(-1, tgt[..., None])[..., 0]  # (B, T-1)
    keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(tgt, dtype=torch.bool)
    return float(nll[keep].sum()), int(keep.sum())


@torch.no_grad()
def fidelity(
    reference: nn.Module,
    model: nn.Module,
    batches: Iterable[Any],
    *,
    causal: bool | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Compare ``model`` with ``reference`` on unlabelled ``batches``.

    Returns ``cosine`` (mean cosine similarity between the two main outputs, per token for
    (B, T, D) outputs with padding masked out, per sample otherwise), ``rel_error``
    (``||y - y_ref|| / ||y_ref||``), ``kl`` (mean ``KL(softmax(y_ref) || softmax(y))`` over the
    last dimension, for logits), and for causal language models ``perplexity`` and
    ``perplexity_ref`` (exp of the mean next-token NLL of the batch's ``input_ids``) and
    ``perplexity_increase`` (relative). Both models are run in eval mode (flags restored).
    """
    causal = is_causal_lm(reference) if causal is None else causal
    flags = (reference.training, model.training)
    reference.eval()
    model.eval()
    cos_sum = cos_n = 0.0
    num = den = 0.0
    kl_sum = kl_n = 0.0
    nll = [0.0, 0.0]
    tokens = 0
    batches = list(batches)
    try:
        with progress_task(progress, "fidelity", len(batches)) as task:
            for b in batches:
                _, kwargs, _ = split_batch(b)
                r_out, m_out = run_model(reference, b), run_model(model, b)
                r, m = main_output(r_out).float(), main_output(m_out).float()
                mask = kwargs.get("attention_mask")
                if r.dim() == 3 and mask is not None and mask.shape == r.shape[:2]:
                    keep = mask.bool()
                    rr, mm = r[keep], m[keep]  # (N, D)
                else:
                    rr, mm = r.flatten(1), m.flatten(1)
                cos = F.cosine_similarity(rr, mm, dim=-1)
                cos_sum += float(cos.sum())
                cos_n += cos.numel()
                num += float((mm - rr).pow(2).sum())
                den += float(rr.pow(2).sum())
                is_logits = isinstance(r_out, dict) and "logits" in r_out
                if is_logits:
                    lr, lm = F.log_softmax(rr, -1), F.log_softmax(mm, -1)
                    kl = (lr.exp() * (lr - lm)).sum(-1)
                    kl_sum += float(kl.sum())
                    kl_n += kl.numel()
                if causal and "input_ids" in kwargs and r.dim() == 3:
                    s_r, t = _nll(r, kwargs["input_ids"], mask)
                    s_m, _ = _nll(m, kwargs["input_ids"], mask)
                    nll[0] += s_r
                    nll[1] += s_m
                    tokens += t
                task.advance()
    finally:
        reference.train(flags[0])
        model.train(flags[1])
    out = {"cosine": cos_sum / max(cos_n, 1), "rel_error": math.sqrt(num / max(den, 1e-300))}
    if kl_n:
        out["kl"] = kl_sum / kl_n
    if tokens:
        out["perplexity_ref"] = math.exp(nll[0] / tokens)
        out["perplexity"] = math.exp(nll[1] / tokens)
        out["perplexity_increase"] = out["perplexity"] / out["perplexity_ref"] - 1.0
    return out
