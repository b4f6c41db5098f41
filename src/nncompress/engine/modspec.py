"""Describe modules as JSON so changed architectures reload without pickle or user code.

A checkpoint records its model as a registry name plus constructor arguments, and a list of
*replacements*: submodules whose type or shape differ from a freshly built model (thinned
convolutions, low-rank factors, added exit heads, removed neurons). Each replacement is a spec
``{"type": "Conv2d", "kwargs": {...}, "children": {...}}`` over a closed set of module types, so
loading never imports arbitrary names. A family makes its own module classes describable with
one call, :func:`register_module` (a class decorator; the class provides ``spec_kwargs()``, its
children are rebuilt from specs and assigned after construction). A spec naming a class not yet
registered imports the family packages (:data:`nncompress.FAMILIES`) once, so a checkpoint with
low-rank factors loads without importing :mod:`nncompress.lowrank` first.

:func:`describe_architecture` and :func:`build_architecture` are the one describer and the one
rebuilder of a model's architecture, used by checkpoints and ``.ncz`` metadata alike.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import SpecError
from ..core.modules import (
    folded_copy,
    own_parametrized_class_,
    set_submodule,
    strip_parametrizations,
)

__all__ = [
    "SpecError",
    "apply_replacements",
    "build_architecture",
    "describe_architecture",
    "diff_modules",
    "folded_copy",
    "module_from_spec",
    "module_to_spec",
    "own_parametrized_class_",
    "register_module",
    "registered_modules",
    "strip_parametrizations",
]


def _conv_kwargs(m: nn.Module) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _bn_kwargs(m: nn.Module) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def _pool_kwargs(m: nn.Module) -> dict[str, Any]:
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding}


_LEAVES: dict[str, tuple[type[nn.Module], Any]] = {
    "Linear": (
        nn.Linear,
        lambda m: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        },
    ),
    "Conv1d": (nn.Conv1d, _conv_kwargs),
    "Conv2d": (nn.Conv2d, _conv_kwargs),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_kwargs),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_kwargs),
    "LayerNorm": (
        nn.LayerNorm,
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
        },
    ),
    "ReLU": (nn.ReLU, lambda m: {}),
    "ReLU6": (nn.ReLU6, lambda m: {}),
    "GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
    "Sigmoid": (nn.Sigmoid, lambda m: {}),
    "Tanh": (nn.Tanh, lambda m: {}),
    "Identity": (nn.Identity, lambda m: {}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "MaxPool2d": (nn.MaxPool2d, _pool_kwargs),
    "AvgPool2d": (nn.AvgPool2d, _pool_kwargs),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: {"output_size": m.output_size}),
}
_CONTAINERS = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList}

# nncompress's own module types, registered by their families (register_module)
_REGISTERED: dict[str, type[nn.Module]] = {}


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make an nncompress module type describable in checkpoints and ``.ncz``
    files. The class provides ``spec_kwargs()`` (its constructor arguments, JSON-able); its
    children are described and rebuilt as specs of their own."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module: {cls!r} is not an nn.Module class")
    if not callable(getattr(cls, "spec_kwargs", None)):
        raise TypeError(f"register_module: {cls.__name__} must define spec_kwargs()")
    name = cls.__name__
    if name in _LEAVES or name in _CONTAINERS:
        raise SpecError(f"register_module: {name} would shadow a torch.nn type")
    old = _REGISTERED.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise SpecError(f"register_module: {name} is already registered by {old.__module__}")
    _REGISTERED[name] = cls
    return cls


def _discover() -> None:
    """Import the family packages so that they register their module types."""
    from .. import FAMILIES

    for family in FAMILIES:
        try:
            importlib.import_module(f"nncompress.{family}")
        except ImportError:  # a family not written yet, or a missing optional dependency
            continue


def registered_modules() -> dict[str, type[nn.Module]]:
    """Every registered module type, by name (the families are imported first)."""
    _discover()
    return dict(_REGISTERED)


def _registered(name: str) -> type[nn.Module] | None:
    if name not in _REGISTERED:
        _discover()
    return _REGISTERED.get(name)


def _type_name(m: nn.Module) -> str:
    return (
        parametrize.type_before_parametrizations(m).__name__
        if parametrize.is_parametrized(m)
        else type(m).__name__
    )


def module_to_spec(m: nn.Module, where: str = "") -> dict[str, Any]:
    """JSON-able spec of ``m`` (raises :class:`SpecError` naming the module if impossible)."""
    name = _type_name(m)
    if name in _LEAVES and type(m).__mro__[0].__name__ in (name, f"Parametrized{name}"):
        return {"type": name, "kwargs": _LEAVES[name][1](m)}
    if name in _CONTAINERS:
        return {
            "type": name,
            "children": {k: module_to_spec(c, f"{where}.{k}") for k, c in m.named_children()},
        }
    cls = _REGISTERED.get(name)
    if cls is not None and isinstance(m, cls):
        return {
            "type": name,
            "kwargs": m.spec_kwargs(),
            "children": {k: module_to_spec(c, f"{where}.{k}") for k, c in m.named_children()},
        }
    allowed = sorted([*_LEAVES, *_CONTAINERS, *registered_modules()])
    raise SpecError(
        f"module '{where or '<root>'}' of type {name} cannot be saved as a structure "
        f"spec; supported types: {allowed}"
    )


def module_from_spec(spec: dict[str, Any], where: str = "") -> nn.Module:
    """Build a module from :func:`module_to_spec` output (only the closed set of types)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise SpecError(f"spec for '{where}' must be a mapping with a 'type' string")
    kind, kwargs = spec["type"], spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise SpecError(f"spec for '{where}': 'kwargs' must be a mapping")
    children = spec.get("children", {})
    try:
        if kind in _LEAVES:
            kw = {
                k: tuple(v) if isinstance(v, list) and k != "normalized_shape" else v
                for k, v in kwargs.items()
            }
            return _LEAVES[kind][0](**kw)
        if kind in _CONTAINERS:
            built = [module_from_spec(c, f"{where}.{k}") for k, c in children.items()]
            container = _CONTAINERS[kind]()
            for k, child in zip(children, built, strict=True):
                container.add_module(k, child)
            return container
        cls = _registered(kind) if kind not in _LEAVES and kind not in _CONTAINERS else None
        if cls is not None:
            m = cls(**kwargs)
            for k, c in children.items():
                setattr(m, k, module_from_spec(c, f"{where}.{k}"))
            return m
    except (TypeError, ValueError) as exc:
        raise SpecError(f"spec for '{where}' ({kind}): bad arguments {kwargs}: {exc}") from exc
    raise SpecError(f"spec for '{where}': unknown module type {kind!r}")


def _same(a: nn.Module, b: nn.Module) -> bool:
    if _type_name(a) != _type_name(b):
        return False
    name = _type_name(a)
    if name in _LEAVES:
        return _LEAVES[name][1](a) == _LEAVES[name][1](b)
    return True


def diff_modules(model: nn.Module, reference: nn.Module, prefix: str = "") -> dict[str, Any]:
    """Replacements turning ``reference`` into ``model``: ``{qualified_name: spec or None}``.

    ``None`` means the submodule was deleted.
    """
    out: dict[str, Any] = {}
    ref_children = dict(reference.named_children())
    for name, child in model.named_children():
        qual = f"{prefix}{name}"
        ref = ref_children.pop(name, None)
        if ref is None or not _same(child, ref):
            out[qual] = module_to_spec(child, qual)
        elif _type_name(child) not in _LEAVES:
            out.update(diff_modules(child, ref, qual + "."))
    for name in ref_children:
        out[f"{prefix}{name}"] = None
    return out


def apply_replacements(model: nn.Module, replacements: dict[str, Any]) -> nn.Module:
    """Apply :func:`diff_modules` output to a freshly built model, in place."""
    for qual, spec in replacements.items():
        parent_name, _, attr = qual.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError as exc:
            raise SpecError(f"replacement '{qual}': parent module not found") from exc
        if spec is None:
            delattr(parent, attr)
        else:
            set_submodule(model, qual, module_from_spec(spec, qual))
    return model


def describe_architecture(
    model: nn.Module,
    *,
    model_name: str | None = None,
    model_kwargs: dict | None = None,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """The JSON description of ``model``'s architecture (the one describer).

    With ``model_name`` (a :mod:`nncompress.models` registry name): the name, ``model_kwargs``
    and the ``replacements`` turning a fresh registry model into ``model``. With ``reference``
    (a fresh instance of a custom architecture): only the replacements. Otherwise the whole
    model as a ``spec``. Raises :class:`SpecError` naming a module that cannot be described.
    """
    from ..models import create

    if model_name is not None:
        kwargs = dict(model_kwargs or {})
        return {
            "model": model_name,
            "kwargs": kwargs,
            "replacements": diff_modules(model, create(model_name, **kwargs)),
        }
    if reference is not None:
        return {"model": None, "replacements": diff_modules(model, reference)}
    return {"model": None, "spec": module_to_spec(model)}


def build_architecture(arch: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """The (untrained) model an :func:`describe_architecture` description stands for (the one
    rebuilder): a fresh registry model or spec, or ``model`` (a fresh instance of a custom
    architecture), with the recorded replacements applied.

    Raises :class:`SpecError` (or ``ValueError`` for bad registry arguments).
    """
    from ..models import create

    if not isinstance(arch, dict):
        raise SpecError(f"architecture={arch!r}: must be a mapping")
    if model is None:
        if arch.get("model") is not None:
            model = create(arch["model"], **(arch.get("kwargs") or {}))
        elif "spec" in arch:
            model = module_from_spec(arch["spec"])
        else:
            raise SpecError(
                "the architecture records changes to a custom model: pass a freshly built "
                "instance of the original architecture as model= (load_checkpoint), or fill "
                "one with load_compressed(model, path)"
            )
    if arch.get("replacements"):
        apply_replacements(model, arch["replacements"])
    return model
