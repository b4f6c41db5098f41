"""Module surgery shared by every family: replace a submodule by name, read a module's class
without torch's parametrization wrapper, fold parametrizations into plain weights."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "folded_copy",
    "model_device",
    "own_parametrized_class_",
    "plain_type",
    "set_submodule",
    "strip_parametrizations",
    "strip_parametrizations_",
]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``"layer1.0.conv1"``) by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def plain_type(module: nn.Module) -> type[nn.Module]:
    """The module's class without torch's injected ``Parametrized<Cls>`` wrapper."""
    if parametrize.is_parametrized(module):
        return parametrize.type_before_parametrizations(module)
    return type(module)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def own_parametrized_class_(m: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    ``torch.nn.utils.parametrize`` injects a ``Parametrized<Cls>`` class that ``copy.deepcopy``
    shares between the original and its copies, and ``remove_parametrizations`` deletes the
    weight property from that class, which breaks every other instance sharing it (the
    original model stops working after a copy is folded). Cloning the class first makes the
    removal local to this instance.
    """
    if not parametrize.is_parametrized(m):
        return
    cls = type(m)
    dct = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, (cls.__bases__[0],), dct)


def strip_parametrizations_(model: nn.Module) -> nn.Module:
    """Remove every parametrization in place, keeping the parametrized (effective) values.

    Safe on deep copies: other models sharing the parametrized class keep working.
    """
    for m in model.modules():
        if parametrize.is_parametrized(m):
            own_parametrized_class_(m)
            for pname in list(m.parametrizations.keys()):
                with torch.no_grad():
                    parametrize.remove_parametrizations(m, pname, leave_parametrized=True)
    return model


#: the name before the in-place naming rule (kept: ``nncompress.engine`` exported it)
strip_parametrizations = strip_parametrizations_


def folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every parametrization folded into plain tensors (pruned
    weights are zeros, shared weights their centroids), leaving ``model`` untouched."""
    return strip_parametrizations_(copy.deepcopy(model))
