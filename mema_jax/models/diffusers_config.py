"""A diffusers ``config.json`` dict inside a frozen (hashable) config dataclass: the checks every
``from_dict`` starts with, and the original items kept for writing the config back.

The config dataclasses are static arguments of jitted functions, so they must hash: lists become
tuples in ``frozen_items`` and lists again in ``thawed``.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping


def check_class_and_options(config: Mapping[str, Any], *, what: str, class_name: str, known: Iterable[str]) -> None:
    """ValueError unless ``_class_name`` (when given) is ``class_name`` and every option not
    starting with "_" is in ``known``; ``what`` ("UNet config") starts the message."""
    given = config.get("_class_name", class_name)
    if given != class_name:
        raise ValueError(f"{what}: _class_name is {given!r}, expected {class_name!r}")
    known = set(known)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{what}: unknown options {unknown}")


def frozen_items(config: Mapping[str, Any]) -> tuple:
    """The config's (key, value) items sorted by key, lists turned into tuples (hashable)."""
    return tuple(sorted((k, _freeze(v)) for k, v in config.items()))


def thawed(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """The inverse of ``frozen_items``: a JSON-ready dict."""
    return {k: _thaw(v) for k, v in items}


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v
