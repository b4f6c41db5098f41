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

A registered type may also *wrap* a whole model (an early-exit network holds the original model
and adds exit heads): such a class names the child holding the wrapped model in its class
attribute ``spec_wraps``. :func:`unwrap` peels wrappers off the root, so the wrapped model is
described as usual (registry name + replacements, or a spec), and the wrappers are recorded under
``"wrappers"`` as specs without that child; :func:`rewrap` rebuilds them around the rebuilt model
by calling the class with the wrapped model, the recorded kwargs and the rebuilt children as
keyword arguments. A wrapper can only sit at the root of a model.
"""

from __future__ import annotations

import importlib
import math
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
    "describe_model",
    "diff_modules",
    "folded_copy",
    "module_from_spec",
    "module_to_spec",
    "own_parametrized_class_",
    "register_module",
    "registered_modules",
    "rewrap",
    "strip_parametrizations",
    "unwrap",
    "validate_architecture",
    "validate_spec",
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
    "ZeroPad2d": (nn.ZeroPad2d, lambda m: {"padding": list(m.padding)}),
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
        if getattr(cls, "spec_wraps", None):
            raise SpecError(
                f"module '{where or '<root>'}' of type {name} wraps a whole model and can only "
                "be described at the root of a model"
            )
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
            if getattr(cls, "spec_wraps", None):
                raise SpecError(f"spec for '{where}': {kind} can only wrap the root model")
            m = cls(**kwargs)
            for k, c in children.items():
                setattr(m, k, module_from_spec(c, f"{where}.{k}"))
            return m
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise SpecError(f"spec for '{where}' ({kind}): bad arguments {kwargs}: {exc}") from exc
    raise SpecError(f"spec for '{where}': unknown module type {kind!r}")


def unwrap(model: nn.Module) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Peel registered wrappers off the root: ``(wrapped model, [wrapper spec, outermost first])``.

    A wrapper spec is ``{"type", "kwargs", "children"}`` without the wrapped child (named by the
    class attribute ``spec_wraps``).
    """
    wrappers: list[dict[str, Any]] = []
    while True:
        cls = _REGISTERED.get(_type_name(model))
        inner = getattr(cls, "spec_wraps", None) if cls is not None else None
        if not inner or not isinstance(model, cls):
            return model, wrappers
        wrappers.append(
            {
                "type": cls.__name__,
                "kwargs": model.spec_kwargs(),
                "children": {
                    k: module_to_spec(c, k) for k, c in model.named_children() if k != inner
                },
            }
        )
        model = getattr(model, inner)


def rewrap(model: nn.Module, wrappers: Any) -> nn.Module:
    """Rebuild the wrappers recorded by :func:`unwrap` around ``model`` (innermost first)."""
    if not isinstance(wrappers, list):
        raise SpecError(f"wrappers={wrappers!r}: must be a list of module specs")
    for i, spec in reversed(list(enumerate(wrappers))):
        where = f"wrappers[{i}]"
        kind = spec.get("type") if isinstance(spec, dict) else None
        cls = _registered(kind) if isinstance(kind, str) else None
        if cls is None or not getattr(cls, "spec_wraps", None):
            allowed = sorted(
                k for k, c in registered_modules().items() if getattr(c, "spec_wraps", None)
            )
            raise SpecError(f"{where}: type {kind!r} is not a model wrapper; allowed: {allowed}")
        kwargs, children = spec.get("kwargs", {}), spec.get("children", {})
        if not isinstance(kwargs, dict) or not isinstance(children, dict):
            raise SpecError(f"{where}: 'kwargs' and 'children' must be mappings")
        built = {k: module_from_spec(c, f"{where}.{k}") for k, c in children.items()}
        try:
            model = cls(**{cls.spec_wraps: model}, **kwargs, **built)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(f"{where} ({kind}): cannot rebuild with {kwargs}: {exc}") from exc
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    if _type_name(a) != _type_name(b):
        return False
    name = _type_name(a)
    if name in _LEAVES:
        return _LEAVES[name][1](a) == _LEAVES[name][1](b)
    if name in _REGISTERED:  # a registered type (a zoo conv subclass...) thinned in place
        return a.spec_kwargs() == b.spec_kwargs()
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
            if attr not in dict(parent.named_children()):
                raise SpecError(f"replacement '{qual}': no such module to delete")
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
    model as a ``spec``. A registered wrapper at the root (an early-exit network) is recorded
    under ``"wrappers"`` and the model it wraps is described as above (``reference`` is then a
    fresh instance of the wrapped model). Raises :class:`SpecError` naming a module that cannot
    be described.
    """
    from ..models import create

    inner, wrappers = unwrap(model)
    if model_name is not None:
        kwargs = dict(model_kwargs or {})
        arch = {
            "model": model_name,
            "kwargs": kwargs,
            "replacements": diff_modules(inner, create(model_name, **kwargs)),
        }
    elif reference is not None:
        arch = {"model": None, "replacements": diff_modules(inner, reference)}
    else:
        arch = {"model": None, "spec": module_to_spec(inner)}
    if wrappers:
        arch["wrappers"] = wrappers
    return arch


# what a description read from a file may hold (checked before anything is built)
MAX_SPEC_DEPTH = 64  # nesting of module specs
MAX_SPEC_MODULES = 100_000  # module specs in one architecture
MAX_LIST = 64  # items of a list-valued constructor argument
MAX_INT = 1 << 31  # |integer| constructor arguments
_ARCH_KEYS = ("model", "kwargs", "replacements", "spec", "wrappers", "class")
MAX_WRAPPERS = 8
_SPEC_KEYS = ("type", "kwargs", "children")


def _check_value(v: Any, where: str) -> None:
    """A constructor argument from a file: a bool, bounded int, finite float, short string,
    null, or a short flat list of those."""
    items = v if isinstance(v, list) else [v]
    if isinstance(v, list) and len(v) > MAX_LIST:
        raise SpecError(f"{where}: a list of {len(v)} items (at most {MAX_LIST})")
    for x in items:
        ok = (
            x is None
            or isinstance(x, bool)
            or (isinstance(x, int) and -MAX_INT <= x <= MAX_INT)
            or (isinstance(x, float) and math.isfinite(x))
            or (isinstance(x, str) and len(x) <= 64)
        )
        if not ok:
            raise SpecError(
                f"{where}={x!r:.80}: must be a bool, an integer in [-2**31, 2**31], a finite "
                "number, a string of <= 64 characters, null, or a flat list of those"
            )


def _check_kwargs(kwargs: Any, where: str) -> None:
    if not isinstance(kwargs, dict):
        raise SpecError(f"{where}: 'kwargs' must be a mapping, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise SpecError(f"{where}: argument name {k!r} is not an identifier")
        _check_value(v, f"{where}.kwargs.{k}")


def validate_spec(spec: Any, where: str = "<root>", budget: list[int] | None = None) -> None:
    """Check a module spec read from a file before anything is built: known type names,
    mappings where mappings belong, constructor arguments of plain bounded values, nesting at
    most ``MAX_SPEC_DEPTH`` deep and ``MAX_SPEC_MODULES`` modules. Raises :class:`SpecError`."""
    budget = budget if budget is not None else [MAX_SPEC_MODULES]
    stack = [(spec, where, 0)]  # iterative: a hostile nesting cannot exhaust the stack
    while stack:
        sp, at, depth = stack.pop()
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"spec for '{at}': nested more than {MAX_SPEC_DEPTH} levels deep")
        budget[0] -= 1
        if budget[0] < 0:
            raise SpecError(f"architecture: more than {MAX_SPEC_MODULES} module specs")
        if not isinstance(sp, dict) or not isinstance(sp.get("type"), str):
            raise SpecError(f"spec for '{at}' must be a mapping with a 'type' string")
        unknown = sorted(set(sp) - set(_SPEC_KEYS))
        if unknown:
            raise SpecError(
                f"spec for '{at}': unknown key(s) {unknown}; allowed {list(_SPEC_KEYS)}"
            )
        kind = sp["type"]
        if kind not in _LEAVES and kind not in _CONTAINERS and _registered(kind) is None:
            raise SpecError(f"spec for '{at}': unknown module type {kind!r:.80}")
        _check_kwargs(sp.get("kwargs", {}), f"spec for '{at}'")
        children = sp.get("children", {})
        if not isinstance(children, dict):
            raise SpecError(f"spec for '{at}': 'children' must be a mapping")
        for name, child in children.items():
            if not isinstance(name, str) or not name or "." in name:
                raise SpecError(f"spec for '{at}': child name {name!r:.80} is not a module name")
            stack.append((child, f"{at}.{name}", depth + 1))


def validate_architecture(arch: Any) -> None:
    """Check an architecture description read from a file (a checkpoint sidecar or a ``.ncz``'s
    metadata) field by field before anything is built: the registry name, its constructor
    arguments (names, types and ranges, :func:`nncompress.models.check_kwargs`), every
    replacement's qualified name and spec (:func:`validate_spec`). Raises :class:`SpecError`
    naming the field."""
    from ..models import MODELS, check_kwargs

    if not isinstance(arch, dict):
        raise SpecError(f"architecture={arch!r:.80}: must be a mapping")
    unknown = sorted(set(arch) - set(_ARCH_KEYS))
    if unknown:
        raise SpecError(f"architecture: unknown key(s) {unknown}; allowed {list(_ARCH_KEYS)}")
    name = arch.get("model")
    if name is not None:
        if not isinstance(name, str) or name not in MODELS:
            raise SpecError(f"architecture.model={name!r:.80}: must be one of {sorted(MODELS)}")
        kwargs = arch.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise SpecError("architecture.kwargs: must be a mapping")
        try:
            check_kwargs(name, kwargs)
        except ValueError as exc:
            raise SpecError(f"architecture.kwargs: {exc}") from exc
    cls = arch.get("class")  # a custom model's class name: shown in messages, never imported
    if cls is not None and (not isinstance(cls, str) or len(cls) > 200):
        raise SpecError(f"architecture.class={cls!r:.80}: must be a class name (a string)")
    budget = [MAX_SPEC_MODULES]
    if "spec" in arch:
        validate_spec(arch["spec"], "<root>", budget)
    reps = arch.get("replacements") or {}
    if not isinstance(reps, dict):
        raise SpecError("architecture.replacements: must be a mapping of module name -> spec")
    for qual, spec in reps.items():
        if not isinstance(qual, str) or not qual or not all(qual.split(".")):
            raise SpecError(f"architecture.replacements: {qual!r:.80} is not a module name")
        if spec is not None:
            validate_spec(spec, qual, budget)
    wrappers = arch.get("wrappers") or []
    if not isinstance(wrappers, list) or len(wrappers) > MAX_WRAPPERS:
        raise SpecError(f"architecture.wrappers: must be a list of at most {MAX_WRAPPERS} specs")
    for i, spec in enumerate(wrappers):
        validate_spec(spec, f"wrappers[{i}]", budget)


def _shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare_shapes(built: dict, present: dict, where: str) -> None:
    """Refuse when the tensors an architecture needs are not exactly those present."""
    missing = sorted(set(built) - set(present))
    extra = sorted(set(present) - set(built))
    wrong = sorted(k for k in set(built) & set(present) if tuple(built[k]) != tuple(present[k]))
    if missing or extra or wrong:
        need = sum(math.prod(s) for s in built.values())
        have = sum(math.prod(s) for s in present.values())
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"'{k}' is {tuple(present[k])}, the architecture needs {built[k]}")
        raise SpecError(
            f"{where}: the architecture needs {need:,} values in {len(built)} tensors, the "
            f"weights present hold {have:,} in {len(present)} ({'; '.join(parts)})"
        )


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The architecture of ``model`` as far as it describes itself, for files saved from
    Python without a sidecar (``save_compressed(model, path)``).

    A model built by :func:`nncompress.create_model` (or loaded from one of its checkpoints)
    gives its registry name, arguments and replacements; a model made only of describable
    modules (an ``nn.Sequential`` of standard layers) its whole ``spec``; any other model
    ``{"model": None, "replacements": {}, "class": "package.Class"}``: rebuilding it needs a
    fresh instance (``--model-factory`` on the command line, ``model=`` in Python).
    """
    from ..models import registry_entry

    entry = registry_entry(model)
    if entry is not None:
        try:
            return describe_architecture(
                model, model_name=entry["model"], model_kwargs=entry["kwargs"]
            )
        except SpecError:
            pass
    try:
        return describe_architecture(model)
    except SpecError:
        cls = type(model)
        return {"model": None, "replacements": {}, "class": f"{cls.__module__}.{cls.__qualname__}"}


def build_architecture(
    arch: dict[str, Any],
    model: nn.Module | None = None,
    *,
    expect: dict[str, tuple[int, ...]] | None = None,
) -> nn.Module:
    """The (untrained) model an :func:`describe_architecture` description stands for (the one
    rebuilder): a fresh registry model or spec, or ``model`` (a fresh instance of a custom
    architecture; of the wrapped model for a wrapper such as an early-exit network), with the
    recorded replacements applied and the recorded wrappers rebuilt around it.

    The description is validated first (:func:`validate_architecture`). With ``expect`` (name
    -> shape of the weights actually present), the architecture is first built on the
    ``meta`` device (no memory) and refused unless its tensors are exactly those: a hostile
    description cannot make this allocate more than the weights it comes with.

    Raises :class:`SpecError` (or ``ValueError`` for bad registry arguments).
    """
    validate_architecture(arch)
    if expect is not None and model is None:
        import torch

        try:
            with torch.device("meta"):
                ghost = _build(arch, None)
        except (TypeError, ValueError, RuntimeError, OverflowError, AttributeError) as exc:
            raise SpecError(f"architecture cannot be built: {exc}") from exc
        _compare_shapes(_shapes_of(ghost), expect, "architecture")
    try:
        return _build(arch, model)
    except (RuntimeError, OverflowError) as exc:
        raise SpecError(f"architecture cannot be built: {exc}") from exc


def _build(arch: dict[str, Any], model: nn.Module | None) -> nn.Module:
    from ..models import create

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
    if arch.get("wrappers"):
        model = rewrap(model, arch["wrappers"])
    return model
