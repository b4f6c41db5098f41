"""Physical thinning: replace layers by smaller dense ones that keep only the surviving channels.

Li et al., ICLR 2017, section 3.1: pruning filter ``j`` of layer ``i`` removes the filter, its
feature map, and the kernels that read that feature map in the next layer. Here the channel
:class:`~nncompress.prune.graph.DependencyGraph` expands a plan (output channels of a few
Conv/Linear layers) to every coupled module (BatchNorm, depthwise convs, residual partners,
concatenation consumers, flatten -> Linear features), and every touched module is replaced by
an ordinary ``nn.Conv2d`` (a copy of a conv subclass that pads in its ``forward``) / ``nn.Linear`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm`` holding the
kept slices of its weights, biases and running statistics::

    W'_conv = W[keep_out][:, keep_in]          # (C_out', C_in', kh, kw)
    b'      = b[keep_out]                      # (C_out',)
    BN'     = (gamma, beta, mean, var)[keep]   # (C',)

The result is an ordinary dense model: fewer channels, fewer MACs, real CPU speed-up, and it
saves with :func:`nncompress.engine.save_checkpoint` (the new shapes are recorded as structural
replacements) and reloads with :func:`nncompress.engine.load_checkpoint`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.convs import is_conv_subclass, resized_conv
from ..core.modules import plain_type as _plain_type
from ..core.modules import set_submodule
from .graph import DependencyGraph, GraphError, LayerCut, build_dependency_graph

__all__ = ["ThinReport", "remove_channels_", "thin_module"]

log = logging.getLogger(__name__)


@dataclass
class ThinReport:
    """What :func:`remove_channels_` changed.

    Attributes
    ----------
    layers : per replaced module, ``{"name", "type", "out_before", "out_after", "in_before",
        "in_after", "params_before", "params_after"}``.
    params_before, params_after : parameters of the whole model.
    macs_before, macs_after : dense MACs per sample of its Conv/Linear layers.
    folded_parametrizations : modules whose parametrizations (e.g. pruning masks) were folded
        into their weights before slicing; re-apply masks afterwards if they must stay fixed.
    """

    layers: list[dict] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    folded_parametrizations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "folded_parametrizations": self.folded_parametrizations,
        }


def _take(t: torch.Tensor | None, dim: int, keep: list[int] | None) -> torch.Tensor | None:
    if t is None or keep is None:
        return t
    idx = torch.as_tensor(keep, dtype=torch.long, device=t.device)
    return torch.index_select(t, dim, idx)


def _like(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` in the memory format of ``old`` (channels_last conv weights stay channels_last)."""
    if old.dim() == 4 and old.is_contiguous(memory_format=torch.channels_last):
        return new.contiguous(memory_format=torch.channels_last)
    return new.contiguous()


def _param(new: torch.Tensor | None, old: nn.Parameter | None) -> nn.Parameter | None:
    if new is None or old is None:
        return None
    return nn.Parameter(_like(new.detach().clone(), old), requires_grad=old.requires_grad)


def thin_module(module: nn.Module, cut: LayerCut) -> nn.Module:
    """A new, smaller module holding the kept slices of ``module`` (which is left untouched).

    Conv weights ``(C_out, C_in/groups, kh, kw)`` keep ``cut.keep_out`` on dim 0 and
    ``cut.keep_in`` on dim 1; a depthwise conv keeps the same indices of its channels (and of
    ``groups``); Linear weights ``(out, in)`` likewise; BatchNorm and LayerNorm keep
    ``cut.keep_out`` of their affine parameters and running statistics. Parametrized weights
    (pruning masks, shared weights) are read as their effective values, so the new module is a
    plain one holding the masked weights; ``module`` itself is not modified.
    """
    ko, ki = cut.keep_out, cut.keep_in
    with torch.no_grad():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            w = module.weight  # (C_out, C_in/groups, *k)
            depthwise = cut.kind == "depthwise"
            n_out = len(ko) if ko is not None else module.out_channels
            if depthwise:
                n_in, groups = n_out, n_out
            else:
                n_in = len(ki) if ki is not None else module.in_channels
                groups = module.groups
                if groups != 1 and ki is not None:
                    raise GraphError(
                        f"cannot remove input channels of grouped conv (groups={groups})"
                    )
            if is_conv_subclass(module):
                # keep the subclass (and the padding its forward applies)
                wk = _take(w, 0, ko)  # (C_out', C_in/groups, *k)
                if not depthwise:
                    wk = _take(wk, 1, ki)  # (C_out', C_in', *k)
                new = resized_conv(module, _like(wk, w), _take(module.bias, 0, ko), groups=groups)
                new.train(module.training)
                return new
            new = _plain_type(module)(
                n_in,
                n_out,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                device=w.device,
                dtype=w.dtype,
            )
            wk = _take(w, 0, ko)  # (C_out', C_in/groups, *k)
            if not depthwise:
                wk = _take(wk, 1, ki)  # (C_out', C_in', *k)
            new.weight = _param(wk, module.weight)
            new.bias = _param(_take(module.bias, 0, ko), module.bias)
        elif isinstance(module, nn.Linear):
            w = module.weight  # (out, in)
            new = nn.Linear(
                len(ki) if ki is not None else module.in_features,
                len(ko) if ko is not None else module.out_features,
                bias=module.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
            new.weight = _param(_take(_take(w, 0, ko), 1, ki), w)  # (out', in')
            new.bias = _param(_take(module.bias, 0, ko), module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = len(ko) if ko is not None else module.num_features
            new = _plain_type(module)(
                n,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=module.track_running_stats,
            )
            new.weight = _param(_take(module.weight, 0, ko), module.weight)
            new.bias = _param(_take(module.bias, 0, ko), module.bias)
            if module.running_mean is not None:
                new.running_mean = _take(module.running_mean, 0, ko).clone()  # (C',)
                new.running_var = _take(module.running_var, 0, ko).clone()  # (C',)
                new.num_batches_tracked = module.num_batches_tracked.clone()
        elif isinstance(module, nn.LayerNorm):
            n = len(ko) if ko is not None else module.normalized_shape[0]
            new = nn.LayerNorm(
                n,
                eps=module.eps,
                elementwise_affine=module.elementwise_affine,
                bias=module.bias is not None,
            )
            new.weight = _param(_take(module.weight, 0, ko), module.weight)
            new.bias = _param(_take(module.bias, 0, ko), module.bias)
        else:
            raise GraphError(f"cannot thin a module of type {type(module).__name__}")
    new.train(module.training)
    return new


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def apply_cuts_(
    model: nn.Module, cuts: Mapping[str, LayerCut], graph: DependencyGraph
) -> ThinReport:
    """Replace every module named in ``cuts`` by its thinned version (in place)."""
    report = ThinReport(params_before=_numel(model))
    macs_before = graph.macs()
    report.macs_before = sum(macs_before.values())
    report.macs_after = sum(graph.macs(cuts).values())
    order = [n for n, _ in model.named_modules() if n in cuts]  # report in model order
    for name in order:
        cut = cuts[name]
        old = model.get_submodule(name)
        if parametrize.is_parametrized(old):
            # Slicing arbitrary parametrizations is not possible in general: the new module
            # holds the effective weights (zeros included); the caller re-applies masks.
            report.folded_parametrizations.append(name)
            log.warning("thinning '%s': its parametrizations are folded into the weights", name)
        new = thin_module(old, cut)
        row = {
            "name": name,
            "type": type(new).__name__,
            "out_before": _width(old, "out"),
            "out_after": _width(new, "out"),
            "in_before": _width(old, "in"),
            "in_after": _width(new, "in"),
            "params_before": _numel(old),
            "params_after": _numel(new),
        }
        set_submodule(model, name, new)
        report.layers.append(row)
    report.params_after = _numel(model)
    return report


def _width(m: nn.Module, which: str) -> int:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.out_channels if which == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if which == "out" else m.in_features
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[0])
    return 0


def remove_channels_(
    model: nn.Module,
    plan: Mapping[str, Sequence[int]],
    example_input: torch.Tensor,
    *,
    graph: DependencyGraph | None = None,
) -> ThinReport:
    """Physically remove output channels of Conv/Linear layers and everything coupled to them.

    Parameters
    ----------
    model : changed in place; afterwards an ordinary dense model with smaller layers.
    plan : ``{qualified Conv/Linear name: output channel indices to remove}``. The dependency
        graph expands it to every coupled module: the BatchNorm after it, the input channels of
        the layers that read it (``H*W`` features each for a Linear after a flatten), depthwise
        convs on the way, and the other producers of a residual sum (which must be listed with
        the *same* indices or not at all).
    example_input : one batch of inputs (any batch size) used to trace shapes.
    graph : a graph already built for this model (saves tracing again).

    Returns
    -------
    ThinReport : per-layer channel, parameter and MAC counts before/after.

    Raises
    ------
    GraphError : unsupported op (named, with its module), a fixed channel, two coupled
        producers asked to drop different indices, or a layer that would lose every channel.
        Raised before the model is modified.
    """
    if not isinstance(plan, Mapping):
        raise GraphError(f"plan must be a mapping {{layer: indices}}, got {type(plan).__name__}")
    graph = graph or build_dependency_graph(model, example_input)
    cuts = graph.expand(plan)
    report = apply_cuts_(model, cuts, graph)
    log.info(
        "thinned %d modules: params %d -> %d, MACs %d -> %d",
        len(report.layers),
        report.params_before,
        report.params_after,
        report.macs_before,
        report.macs_after,
    )
    return report
