"""Soft weight-sharing (Ullrich, Meeds & Welling, ICLR 2017): a Gaussian-mixture prior over
the weights, learned jointly with them, then the weights snapped to its component means.

Retraining minimises ``CE + tau * L_C / N`` (``N`` training examples) with the complexity

    L_C = -sum_i log sum_j pi_j N(w_i | mu_j, 1 / lambda_j) - sum_j log Gamma(lambda_j | a, b)

over every weight of the selected layers (biases excluded). Component 0 has its mean fixed at
0 and its mixing proportion fixed at ``pi_zero`` (the paper: 0.999): weights that fall into it
are pruned. The other ``J - 1`` means start evenly spaced over the weights' range, their
precisions and proportions are learned too (the Gamma hyperprior keeps the precisions from
collapsing on a single weight; the paper's (a, b) = (5000, 2) for the zero component and
(250, 0.1) for the others are the defaults). Four learning rates as in the paper's code (Adam):
weights, means, log-precisions, mixing logits.

At the end (:meth:`SoftWeightSharing.quantize_`): components whose means lie within
``merge_sigmas`` standard deviations of each other are merged (proportion-weighted), and each
weight is set to the mean of the component with the highest responsibility; weights assigned
to component 0 become exactly zero. The layers then take at most ``J`` values and
:func:`~nncompress.quant.kmeans.share_from_values_` turns them into shared weights for
centroid fine-tuning and the entropy coder.

This training loop is written here rather than with :func:`nncompress.engine.fit` because
the prior's parameters are not the model's and need their own optimizer groups.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modules import model_device
from ..core.progress import ProgressEvent
from ..engine.train import evaluate, seed_everything

__all__ = ["SoftShareConfig", "SoftWeightSharing", "soft_share_"]

log = logging.getLogger(__name__)


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: {allowed}")


def _pos(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class SoftShareConfig:
    """Settings of :func:`soft_share_` (defaults after Ullrich et al. 2017, section 6).

    ``components``: J, the zero component included; ``tau``: weight of the complexity term
    (per training example); ``epochs``, ``batch_size``; learning rates of the weights, the
    means, the log-precisions and the mixing logits; ``pi_zero``: fixed proportion of the zero
    component; Gamma hyperprior ``(a, b)`` of the zero and the other precisions;
    ``merge_sigmas``: merge components closer than this many standard deviations.
    """

    components: int = 17
    tau: float = 5e-3
    epochs: int = 10
    batch_size: int = 128
    lr_weights: float = 5e-4
    lr_means: float = 1e-4
    lr_log_precisions: float = 3e-3
    lr_mixing: float = 3e-4
    pi_zero: float = 0.999
    gamma_zero: tuple[float, float] = (5000.0, 2.0)
    gamma_other: tuple[float, float] = (250.0, 0.1)
    merge_sigmas: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.components, int) and 2 <= self.components <= 257,
            "components",
            self.components,
            "must be an integer in [2, 257] (the zero component included)",
        )
        for name in ("tau", "lr_weights", "lr_means", "lr_log_precisions", "lr_mixing"):
            _check(_pos(getattr(self, name)), name, getattr(self, name), "must be a number > 0")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= (name == "batch_size"),
                   name, v, "must be a non-negative integer (batch_size >= 1)")  # fmt: skip
        _check(
            _pos(self.pi_zero) and self.pi_zero < 1, "pi_zero", self.pi_zero, "must be in (0, 1)"
        )
        for name in ("gamma_zero", "gamma_other"):
            v = tuple(getattr(self, name))
            _check(len(v) == 2 and all(_pos(x) for x in v), name, v, "must be two numbers > 0")
            object.__setattr__(self, name, v)
        _check(_pos(self.merge_sigmas), "merge_sigmas", self.merge_sigmas, "must be > 0")


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights the prior covers: every Linear / Conv weight."""
    return {
        name: m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
    }


class SoftWeightSharing(nn.Module):
    """The mixture prior: ``mu`` (J,) with ``mu[0] = 0`` fixed, ``log_precision`` (J,),
    ``mixing_logits`` (J - 1,) for the non-zero components (``pi_0`` fixed)."""

    def __init__(self, weights: torch.Tensor, config: SoftShareConfig) -> None:
        super().__init__()
        self.config = config
        J = config.components
        w = weights.detach().reshape(-1)  # (n,)
        lo, hi = float(w.min()), float(w.max())
        means = torch.linspace(lo, hi, J - 1, dtype=torch.float64)  # (J-1,)
        self.mu_rest = nn.Parameter(means)
        spread = (hi - lo) / max(1, J - 1)
        # sigma = half the spacing of the means: neighbours overlap little at the start
        lp = torch.full((J,), math.log(4.0 / max(spread, 1e-8) ** 2), dtype=torch.float64)
        a0, b0 = config.gamma_zero
        lp[0] = math.log((a0 - 1) / b0) if a0 > 1 else lp[0]  # the zero prior's mode
        self.log_precision = nn.Parameter(lp)
        self.mixing_logits = nn.Parameter(torch.zeros(J - 1, dtype=torch.float64))

    @property
    def mu(self) -> torch.Tensor:
        return torch.cat([self.mu_rest.new_zeros(1), self.mu_rest])  # (J,)

    @property
    def log_pi(self) -> torch.Tensor:
        rest = torch.log_softmax(self.mixing_logits, 0) + math.log(1 - self.config.pi_zero)
        return torch.cat([rest.new_full((1,), math.log(self.config.pi_zero)), rest])  # (J,)

    def log_resp(self, w: torch.Tensor) -> torch.Tensor:
        """(n, J) ``log pi_j + log N(w_i | mu_j, 1/lambda_j)``."""
        lam = self.log_precision.exp()
        d = w.reshape(-1, 1).double() - self.mu[None, :]  # (n, J)
        return self.log_pi + 0.5 * (self.log_precision - math.log(2 * math.pi)) - 0.5 * lam * d**2

    def complexity(self, w: torch.Tensor) -> torch.Tensor:
        """``L_C``: negative log prior of the weights and of the precisions."""
        nll = -torch.logsumexp(self.log_resp(w), dim=1).sum()
        lam = self.log_precision.exp()
        a = torch.tensor([self.config.gamma_zero[0]] + [self.config.gamma_other[0]] * (lam.numel() - 1), dtype=lam.dtype)  # fmt: skip
        b = torch.tensor([self.config.gamma_zero[1]] + [self.config.gamma_other[1]] * (lam.numel() - 1), dtype=lam.dtype)  # fmt: skip
        log_gamma = (a - 1) * self.log_precision - b * lam  # up to constants
        return nll - log_gamma.sum()

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mu, log_precision, log_pi)`` after merging components closer than
        ``merge_sigmas`` standard deviations (the zero component absorbs its neighbours and
        keeps mean 0)."""
        with torch.no_grad():
            mu, lp, pi = self.mu.clone(), self.log_precision.clone(), self.log_pi.exp().clone()
            order = torch.argsort(mu)
            mu, lp, pi = mu[order], lp[order], pi[order]
            zero = int((order == 0).nonzero()[0, 0])
            comps = [[float(mu[i]), float(lp[i]), float(pi[i]), i == zero] for i in range(len(mu))]
            merged = [comps[0]]
            for m, l_, p, z in comps[1:]:
                pm, pl, pp, pz = merged[-1]
                sigma = min(math.exp(-0.5 * pl), math.exp(-0.5 * l_))
                if abs(m - pm) < self.config.merge_sigmas * sigma:
                    new_mu = 0.0 if (z or pz) else (pm * pp + m * p) / (pp + p)
                    merged[-1] = [new_mu, max(pl, l_), pp + p, z or pz]
                else:
                    merged.append([m, l_, p, z])
            t = torch.tensor([c[:3] for c in merged], dtype=torch.float64)
            return t[:, 0], t[:, 1], t[:, 2].log()

    @torch.no_grad()
    def quantize_(self, model: nn.Module) -> dict[str, int]:
        """Snap every covered weight to the mean of its most responsible (merged) component;
        returns ``{'components': J', 'nonzeros': n}``."""
        mu, lp, log_pi = self.merged()
        nonzero = 0
        for _, w in _weights(model).items():
            d = w.detach().reshape(-1, 1).double() - mu[None, :]
            score = log_pi + 0.5 * lp - 0.5 * lp.exp() * d**2  # (n, J')
            snapped = mu[score.argmax(1)].to(w.dtype).reshape(w.shape)
            snapped[snapped.abs() < 1e-12] = 0.0
            w.copy_(snapped)
            nonzero += int((snapped != 0).sum())
        return {"components": int(mu.numel()), "nonzeros": nonzero}


def soft_share_(
    model: nn.Module,
    train_loader: Iterable,
    config: SoftShareConfig | None = None,
    *,
    n_train: int | None = None,
    val_loader: Iterable | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> dict[str, Any]:
    """Retrain ``model`` under a learned Gaussian-mixture prior, then snap its weights to the
    prior's (merged) component means, in place (Ullrich et al. 2017).

    Parameters
    ----------
    train_loader : batches ``(x, y)`` of the training split.
    n_train : number of training examples (the complexity term is divided by it); default:
        the loader's dataset size.
    val_loader : the held-out split, evaluated after snapping.

    Returns
    -------
    dict: ``components`` (after merging), ``nonzeros``, ``kept`` (fraction of the covered
    weights), ``complexity`` (final L_C), ``val_accuracy`` (after snapping, if a val_loader).
    """
    cfg = config or SoftShareConfig()
    for name, m in model.named_modules():
        from torch.nn.utils import parametrize

        if parametrize.is_parametrized(m):
            raise ConfigError(
                f"soft_share_: module '{name}' is parametrized (pruned or shared); fold the "
                "parametrizations first (nncompress.engine.strip_parametrizations)"
            )
    ws = _weights(model)
    if not ws:
        raise ConfigError("soft_share_: the model has no Linear or Conv weight")
    seed_everything(cfg.seed)
    device = model_device(model)
    flat = torch.cat([w.detach().reshape(-1) for w in ws.values()])
    prior = SoftWeightSharing(flat, cfg).to(device)
    if n_train is None:
        n_train = len(getattr(train_loader, "dataset", [])) or 1
    opt = torch.optim.Adam(
        [
            {"params": list(model.parameters()), "lr": cfg.lr_weights},
            {"params": [prior.mu_rest], "lr": cfg.lr_means},
            {"params": [prior.log_precision], "lr": cfg.lr_log_precisions},
            {"params": [prior.mixing_logits], "lr": cfg.lr_mixing},
        ]
    )
    total = cfg.epochs * len(train_loader)
    if progress:
        progress(ProgressEvent("start", "soft-share", total=total))
    step = 0
    lc = torch.tensor(0.0)
    model.train()
    for epoch in range(cfg.epochs):
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            ce = nn.functional.cross_entropy(model(x), y)
            lc = prior.complexity(torch.cat([w.reshape(-1) for w in ws.values()]))
            loss = ce + cfg.tau * lc.float() / n_train
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress:
                progress(
                    ProgressEvent(
                        "advance", "soft-share", total=total, completed=step,
                        info={"epoch": epoch + 1, "ce": float(ce), "complexity": float(lc)},
                    )
                )  # fmt: skip
    if progress:
        progress(ProgressEvent("end", "soft-share", total=total, completed=step))
    model.eval()
    out = prior.quantize_(model)
    out["kept"] = out["nonzeros"] / flat.numel()
    out["complexity"] = float(lc.detach())
    if val_loader is not None:
        out["val_accuracy"] = evaluate(model, val_loader)["accuracy"]
    log.info("soft weight-sharing: %s", out)
    return out
