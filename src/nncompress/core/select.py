"""The one layer selector: which layers a transform, a stage or a CLI flag touches.

Like NNCF's ignored scope and torchao's ``filter_fn``: a :class:`LayerSelector` keeps a layer
when its qualified name matches one of ``names`` (exact names or fnmatch globs; ``None``: any
name), its type is one of ``types`` (``torch.nn`` class names such as ``"Linear"``, or
classes; ``None``: any type), it matches none of the ``exclude`` names/globs, and the optional
predicate ``fn(name, module)`` is true. The type is the class before parametrizations, so a
pruned (parametrized) ``Linear`` is still a ``Linear``.

Every transform takes ``filter=`` as anything :meth:`LayerSelector.coerce` understands: a
selector, a predicate ``(name, module) -> bool``, one name/glob, or a list of them. Configs
keep their JSON-able fields (``include``/``exclude``/``layers``) and build a selector from them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from .errors import ConfigError
from .modules import plain_type

__all__ = ["LayerSelector", "Selectable", "matches_any", "name_matches", "unmatched"]

Predicate = Callable[[str, nn.Module], bool]
#: what a ``filter=`` argument may be
Selectable = Union["LayerSelector", Predicate, str, Iterable[str], None]


def name_matches(name: str, pattern: str) -> bool:
    """``name`` equals ``pattern`` or matches it as an fnmatch glob (case-sensitive)."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """``name`` matches at least one of ``patterns`` (see :func:`name_matches`)."""
    return any(name_matches(name, p) for p in patterns)


def unmatched(patterns: Iterable[str], model: nn.Module, *, types: bool = False) -> list[str]:
    """The patterns (names or globs; with ``types``, also module class names) that select no
    module of ``model``: a selection that matches nothing is almost always a typo."""
    names = [n for n, _ in model.named_modules() if n]
    kinds = {plain_type(m).__name__ for _, m in model.named_modules()} if types else set()
    return [p for p in patterns if p not in kinds and not any(name_matches(n, p) for n in names)]


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ConfigError(f"{what}={value!r}: must be a name/pattern or a list of them") from None
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"{what}={value!r}: must be names or fnmatch patterns (strings)")
    return items


def _resolve(t: str | type) -> type[nn.Module]:
    if isinstance(t, type) and issubclass(t, nn.Module):
        return t
    cls = getattr(nn, t, None) if isinstance(t, str) else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"types: unknown module type {t!r}; allowed: torch.nn module class names "
            "('Linear', 'Conv2d', ...) or nn.Module subclasses"
        )
    return cls


@dataclass(frozen=True)
class LayerSelector:
    """Layers chosen by name, glob, type and exclusion (see the module docstring)."""

    names: tuple[str, ...] | None = None
    types: tuple[str | type, ...] | None = None
    exclude: tuple[str, ...] = ()
    fn: Predicate | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.names is not None:
            object.__setattr__(self, "names", _patterns(self.names, "names"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if self.types is not None:
            types = (self.types,) if isinstance(self.types, str | type) else tuple(self.types)
            # torch.nn classes are kept by name (JSON-able); other classes as they are
            types = tuple(
                t.__name__ if isinstance(t, type) and getattr(nn, t.__name__, None) is t else t
                for t in types
            )
            object.__setattr__(self, "types", types)
            self.classes  # noqa: B018 - validates the names now
        if self.fn is not None and not callable(self.fn):
            raise ConfigError(f"fn={self.fn!r}: must be a callable (name, module) -> bool")

    @property
    def classes(self) -> tuple[type[nn.Module], ...] | None:
        """The selected module classes (``None``: any)."""
        return None if self.types is None else tuple(_resolve(t) for t in self.types)

    def matches_name(self, name: str) -> bool:
        """Whether ``name`` passes the name and exclusion rules (types and ``fn`` aside)."""
        if self.names is not None and not matches_any(name, self.names):
            return False
        return not matches_any(name, self.exclude)

    def __call__(self, name: str, module: nn.Module) -> bool:
        if not self.matches_name(name):
            return False
        classes = self.classes
        if classes is not None and not issubclass(plain_type(module), classes):
            return False
        return self.fn is None or bool(self.fn(name, module))

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{name: module}`` of the selected submodules, in ``named_modules`` order."""
        return {name: m for name, m in model.named_modules() if self(name, m)}

    def __and__(self, other: Selectable) -> LayerSelector:
        """A selector keeping what both keep."""
        other = LayerSelector.coerce(other)
        if other.fn is None and other == LayerSelector():
            return self
        if self.fn is None and self == LayerSelector():
            return other
        return LayerSelector(fn=lambda name, m: self(name, m) and other(name, m))

    @classmethod
    def coerce(cls, value: Selectable) -> LayerSelector:
        """A selector from ``None`` (everything), a selector, a predicate, a name/glob, a list
        of names/globs, or a mapping of the fields (``{"names": [...], "exclude": [...]}``)."""
        if value is None:
            return cls()
        if isinstance(value, LayerSelector):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        if callable(value) and not isinstance(value, str):
            return cls(fn=value)
        return cls(names=_patterns(value, "filter"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (a predicate ``fn`` cannot be serialised and is left out)."""
        return {
            "names": None if self.names is None else list(self.names),
            "types": None
            if self.types is None
            else [t if isinstance(t, str) else t.__name__ for t in self.types],
            "exclude": list(self.exclude),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerSelector:
        unknown = sorted(set(data) - {"names", "types", "exclude"})
        if unknown:
            raise ConfigError(
                f"selector: unknown field(s) {unknown}; allowed: ['exclude', 'names', 'types']"
            )
        return cls(
            names=data.get("names"), types=data.get("types"), exclude=data.get("exclude", ())
        )
