"""BatchNorm folding (Jacob et al. 2018, section 3.2)."""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from ..core.fx import trace
from ..core.modules import set_submodule, strip_parametrizations_

__all__ = ["fold_batchnorm", "fold_batchnorm_"]

log = logging.getLogger(__name__)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    gm = trace(model)
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(
            mods[node.target], nn.BatchNorm2d | nn.BatchNorm1d
        ):
            continue
        src = node.args[0]
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(mods[src.target], nn.Conv1d | nn.Conv2d)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows a convolution into it, in place.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel,
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``; the BatchNorm becomes ``nn.Identity``.
    Uses the running statistics, so the folded model equals the original in eval mode
    (Jacob et al. 2018, section 3.2). Parametrizations are folded into plain weights first.
    Returns the folded ``(conv_name, bn_name)`` pairs.
    """
    strip_parametrizations_(model)
    pairs = _conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_var is None:
            raise ValueError(f"cannot fold BatchNorm '{bn_name}': it keeps no running statistics")
        inv = torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
        gamma = bn.weight if bn.affine else torch.ones_like(inv)
        beta = bn.bias if bn.affine else torch.zeros_like(inv)
        factor = gamma * inv  # (C_out,)
        conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta  # (C_out,)
        conv.bias = nn.Parameter(new_bias.detach().clone())
        set_submodule(model, bn_name, nn.Identity())
    log.info("folded %d Conv-BatchNorm pairs", len(pairs))
    return pairs


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Deprecated name of :func:`fold_batchnorm_` (it changes ``model`` in place)."""
    return fold_batchnorm_(model)
