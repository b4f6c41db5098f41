"""Validation helpers for config ``__post_init__`` methods: one message format everywhere,
``field=value: what is allowed`` (plus `` for layer 'name'`` when a per-layer value is wrong)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["check", "config_error", "is_int", "is_number"]


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
