"""Validation helpers for config ``__post_init__`` methods: one message format everywhere,
``field=value: what is allowed`` (plus `` for layer 'name'`` when a per-layer value is wrong)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

__all__ = [
    "check",
    "check_field_types",
    "config_error",
    "first_non_finite",
    "is_finite_number",
    "is_int",
    "is_number",
]


def config_error(field: str, value: Any, allowed: str, layer: str = "") -> ConfigError:
    """The :class:`ConfigError` for ``field=value`` (optionally of one layer)."""
    loc = f" for layer '{layer}'" if layer else ""
    return ConfigError(f"{field}={value!r}{loc}: {allowed}")


def check(cond: bool, field: str, value: Any, allowed: str, layer: str = "") -> None:
    """Raise :func:`config_error` unless ``cond`` holds."""
    if not cond:
        raise config_error(field, value, allowed, layer)


def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return is_number(v) and math.isfinite(v)


def first_non_finite(obj: Any, path: str = "") -> str | None:
    """The path of the first non-finite float (NaN, inf, YAML's ``.inf`` or ``1e400``) in a
    nested structure of mappings and lists, or ``None``."""
    stack = [(obj, path)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return at or "value"
        if isinstance(v, dict):
            stack.extend((x, f"{at}.{k}" if at else str(k)) for k, x in v.items())
        elif isinstance(v, list | tuple):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))
    return None


# simple annotations a config field may have, and what its value must then be
_SIMPLE = {
    "int": (is_int, "an integer"),
    "float": (is_finite_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


_ELEMENT = {"int": _SIMPLE["int"], "float": _SIMPLE["float"], "str": _SIMPLE["str"]}


def _container_problem(ann: str, v: Any) -> str | None:
    """What is wrong with ``v`` for a ``tuple[T, ...]`` / ``list[T]`` / ``dict[...]``
    annotation (``None`` if nothing); a single string passes for ``tuple[str, ...]``."""
    if ann.startswith("dict["):
        return None if isinstance(v, dict) else "must be a mapping"
    inner = ann[ann.index("[") + 1 : -1].split(",")[0].strip()
    if isinstance(v, str) and inner == "str":
        return None
    if not isinstance(v, list | tuple):
        return "must be a list"
    if inner in _ELEMENT:
        test, what = _ELEMENT[inner]
        bad = [x for x in v if not test(x)]
        if bad:
            return f"must be a list of items that are each {what} (got {bad[0]!r:.40})"
    return None


def check_field_types(obj: Any) -> None:
    """Check every field of the dataclass ``obj`` whose annotation is simple (``int``,
    ``float``, ``bool``, ``str``, ``tuple[T, ...]``, ``list[T]``, ``dict[...]``, each
    optionally ``| None``) against its value: ``epochs: 1.5``, ``epochs: true``, ``lr: .inf`` or
    ``exclude: 5`` fail here with the field's name, before a loop, an optimizer or an
    iteration sees them. Other annotations are left to the config's own checks."""
    for f in dataclasses.fields(obj):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        parts = [p.strip() for p in ann.split("|")]
        optional = "None" in parts
        parts = [p for p in parts if p != "None"]
        v = getattr(obj, f.name)
        if len(parts) != 1 or (v is None and optional):
            continue
        ann = parts[0]
        or_null = " or null" if optional else ""
        if ann in _SIMPLE:
            test, what = _SIMPLE[ann]
            if not test(v):
                raise config_error(f.name, v, f"must be {what}{or_null}")
        elif ann.startswith(("tuple[", "list[", "dict[")) and ann.endswith("]"):
            problem = _container_problem(ann, v)
            if problem:
                raise config_error(f.name, v, problem + or_null)
