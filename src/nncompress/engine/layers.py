"""Matrix layers of any model (``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding``) seen
the same way: a weight matrix ``W`` (out x in) applied to inputs of width ``in``.

Hugging Face GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D`` with the
weight transposed (in x out, ``y = x W + b``); an embedding's rows are its outputs (num x dim).
Data-aware transforms (GPTQ, activation-weighted k-means, Wanda, whitened SVD) need the
(out x in) view and the layer inputs; these helpers give both without importing
``transformers`` (a Conv1D is recognised by its class name and ``nf`` attribute).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.select import matches_any
from .batches import run_model

__all__ = [
    "KINDS",
    "block_of",
    "layer_kind",
    "matrix_layers",
    "matrix_to_weight",
    "record_inputs",
    "tied_groups",
    "weight_matrix",
]

KINDS = ("linear", "conv1d", "embedding")


def layer_kind(m: nn.Module) -> str | None:
    """'linear' (nn.Linear), 'conv1d' (HF Conv1D, transposed weight), 'embedding' or None."""
    base = parametrize.type_before_parametrizations(m)
    if issubclass(base, nn.Linear):
        return "linear"
    if issubclass(base, nn.Embedding):
        return "embedding"
    if base.__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None:
        return "conv1d"
    return None


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The layer's current (effective) weight as an (out x in) matrix (a view, detached)."""
    w = m.weight.detach()
    return w.T if layer_kind(m) == "conv1d" else w


def matrix_to_weight(m: nn.Module, mat: torch.Tensor) -> torch.Tensor:
    """An (out x in) matrix in the layout of ``m.weight`` (contiguous)."""
    return (mat.T if layer_kind(m) == "conv1d" else mat).contiguous()


def _weight_identity(m: nn.Module) -> int:
    if parametrize.is_parametrized(m, "weight"):
        return id(m.parametrizations["weight"].original)
    return id(m.weight)


def matches(name: str, patterns: Sequence[str]) -> bool:
    return matches_any(name, patterns)


def matrix_layers(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    kinds: Sequence[str] = KINDS,
    filter: Callable[[str, nn.Module], bool] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Matrix layers of ``model`` in module order whose name matches an ``include`` pattern
    (fnmatch) and no ``exclude`` pattern, of one of ``kinds``, accepted by ``filter``."""
    out = []
    for name, m in model.named_modules():
        kind = layer_kind(m)
        if kind is None or kind not in kinds or not name:
            continue
        if not matches(name, include) or matches(name, exclude):
            continue
        if filter is not None and not filter(name, m):
            continue
        out.append((name, m))
    return out


def tied_groups(layers: Sequence[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """Layers grouped by shared weight tensor (tied embedding / LM head), in first-seen order."""
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in layers:
        groups.setdefault(_weight_identity(m), []).append((name, m))
    return list(groups.values())


def block_of(model: nn.Module, name: str) -> str:
    """The outermost ``ModuleList`` element containing module ``name`` (a transformer block,
    e.g. ``encoder.layer.3``), or ``name`` itself when it is in none."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        container = model.get_submodule(".".join(parts[:i]))
        if isinstance(container, nn.ModuleList) and parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return name


def record_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Any],
    on_input: Callable[[str, torch.Tensor], None],
    device: torch.device | str | None = None,
) -> None:
    """Run ``model`` on ``batches`` (eval mode, no grad) and call ``on_input(name, x)`` with the
    input ``x`` (..., in) of every call of each module in ``modules`` (an embedding's input is
    its index tensor). The model's ``training`` flag is restored."""

    def hook_for(name: str):
        def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
            on_input(name, inputs[0])

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                run_model(model, b, device)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
