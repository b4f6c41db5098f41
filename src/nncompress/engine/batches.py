"""Batches as users hold them: a tensor, an ``(inputs, targets)`` tuple, or a dict of keyword
arguments (Hugging Face: ``model(**batch)``).

Every loop that runs a model on data (calibration, refit, sensitivity scans, distillation,
fine-tuning) goes through :func:`split_batch` / :func:`run_model`, so none assumes one
positional image tensor. The rules:

* a tensor ``x``: ``model(x)``, no targets;
* a mapping: ``model(**inputs)`` with every key except the label keys (``labels``, ``label``),
  whose value is the target;
* a tuple or list ``(inputs, targets, ...)``: ``inputs`` is a tensor (``model(x)``), a mapping
  (``model(**inputs)``) or a tuple/list of tensors (``model(*inputs)``); the second element,
  if any, is the target.

:func:`main_output` picks the tensor a metric compares from a model's output: the output
itself, the first element of a tuple, or of a Hugging Face ``ModelOutput`` ``logits``, then
``last_hidden_state``, then ``pooler_output``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "LABEL_KEYS",
    "batch_size",
    "call_inputs",
    "main_output",
    "run_model",
    "split_batch",
    "take_batches",
    "to_device",
]

LABEL_KEYS = ("labels", "label")
_OUTPUT_KEYS = ("logits", "last_hidden_state", "pooler_output")


def split_batch(batch: Any) -> tuple[tuple, dict[str, Any], Any]:
    """``(args, kwargs, targets)`` of one batch (see the module docstring for the rules)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        target = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return (), kwargs, target
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("batch: an empty tuple/list holds no model inputs")
        first, target = batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(first, Mapping):
            return (), dict(first), target
        if isinstance(first, (tuple, list)):
            return tuple(first), {}, target
        return (first,), {}, target
    raise TypeError(
        f"batch of type {type(batch).__name__}: expected a tensor, a mapping of model keyword "
        "arguments, or an (inputs, targets) tuple"
    )


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def run_model(model: nn.Module, batch: Any, device: torch.device | str | None = None) -> Any:
    """Call ``model`` on one batch's inputs (moved to ``device`` when given)."""
    args, kwargs, _ = split_batch(batch)
    if device is not None:
        args, kwargs = to_device(args, device), to_device(kwargs, device)
    return model(*args, **kwargs)


def main_output(out: Any) -> torch.Tensor:
    """The tensor of a model output that metrics compare (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict
        for key in _OUTPUT_KEYS:
            v = out.get(key)
            if isinstance(v, torch.Tensor):
                return v
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model output of type {type(out).__name__}: no tensor to compare")


def batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor of the batch's inputs."""
    args, kwargs, _ = split_batch(batch)
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("batch: no tensor input with a batch dimension")


def take_batches(loader: Iterable, n: int | None, what: str = "loader") -> list[Any]:
    """The first ``n`` batches of ``loader`` (all when ``n`` is None); error if there are none."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"batches={n!r}: must be an integer >= 1 or None")
    out: list[Any] = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) >= n:
            break
    if not out:
        raise ValueError(f"{what}: no calibration batches (it yielded none)")
    return out


def call_inputs(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on model inputs as :func:`nncompress.engine.fit` passes them to a loss:
    a tensor (``model(x)``), a mapping (``model(**inputs)``) or a tuple/list
    (``model(*inputs)``)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
