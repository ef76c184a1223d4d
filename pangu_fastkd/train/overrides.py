"""``--set dotted.key=value`` overrides of a raw pipeline config, and the error every config
check raises."""

from __future__ import annotations

import re
import tomllib
from typing import Any

__all__ = ["MAX_DEPTH", "ConfigError", "apply_overrides", "check_depth", "parse_toml", "show_value"]

# How deep tables and arrays may nest in a config (the shipped ones nest 4 deep). Deeper
# values are refused up front: the parsers and dataclasses.asdict recurse and would stop with
# a RecursionError, or crash the interpreter, at some unpredictable later point.
MAX_DEPTH = 32
# A list index in an override: ASCII digits only ("²".isdigit() is True), short enough that
# int() cannot hit Python's limit on digits.
_INDEX = re.compile(r"[0-9]{1,9}")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says where and why."""


def show_value(value: Any) -> str:
    """``repr(value)`` for an error message, shortened: an int of thousands of digits would
    make the message unreadable (and beyond 4300 digits ``repr`` itself raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an int of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> None:
    """Raises ``ConfigError`` when tables or arrays in ``value`` nest deeper than ``limit``.

    Walks with an explicit stack, so that the check itself cannot exhaust Python's."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth >= limit:
                raise ConfigError(f"{where}: tables and arrays nest more than {limit} deep")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def parse_toml(text: str, where: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, with every way it can fail as a ``ConfigError`` naming
    ``where``: bad syntax, nesting too deep for its recursive parser, an int of more digits
    than Python converts."""
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where}: tables and arrays nest too deeply") from None
    except ValueError as err:  # int("9" * 5000): Python's limit on integer digits
        raise ConfigError(f"{where}: a number is too long ({err})") from None


def _parse_value(text: str, item: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``), else the raw string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise ConfigError(f"override {show_value(item)}: the value nests too deeply") from None
    except ValueError as err:
        raise ConfigError(f"override {show_value(item)}: the number is too long ({err})") from None
    if set(parsed) != {"v"}:  # "1\nseed = 2" would set a second key unseen
        raise ConfigError(f"override {show_value(item)}: the value must be one TOML value")
    check_depth(parsed["v"], f"override {show_value(item)}")
    return parsed["v"]


def _list_index(node: list, part: str, item: str) -> int:
    if not _INDEX.fullmatch(part) or int(part) >= len(node):
        raise ConfigError(
            f"override {show_value(item)}: no list item {show_value(part)} (the list has "
            f"{len(node)})"
        )
    return int(part)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``dotted.key=value`` overrides to the raw config dict (``stages.2.kd_weight=0.5``
    indexes the stage list; ``student.preset=small`` sets a nested key).

    Raises:
        ConfigError: an override that is not ``key=value``, names a list item that does not
            exist, sets a key inside a value that is not a table, or has a value too deep or
            with too many digits to parse.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {show_value(item)} must look like key.path=value")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {show_value(item)}: empty key in {key!r}")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, item)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                parent = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {show_value(item)}: {parent} is {show_value(node)}, not a "
                    "table, so it has no key to set"
                )
        value = _parse_value(text, item)
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, item)] = value
        else:
            node[last] = value
    return raw
