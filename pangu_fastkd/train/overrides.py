"""``--set dotted.key=value`` overrides of a raw pipeline config, and the error every config
check raises."""

from __future__ import annotations

import tomllib
from typing import Any

__all__ = ["ConfigError", "apply_overrides"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says where and why."""


def _parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``dotted.key=value`` overrides to the raw config dict (``stages.2.kd_weight=0.5``
    indexes the stage list; ``student.preset=small`` sets a nested key)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        node: Any = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: no list item {part!r}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: no list item {last!r}")
            node[int(last)] = _parse_value(text)
        else:
            node[last] = _parse_value(text)
    return raw
