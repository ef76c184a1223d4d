"""The cache's JSON files (manifest, progress, sequence list): deterministic bytes, checked reads.

Deterministic bytes let a resumed or repeated run write the same files as the first one; a read
that fails names the file, as every cache error does. A hostile file gets no further than a
CacheError: it is opened as a regular file only (``files.open_regular``: no link, no FIFO that
would block), its size is bounded, and its JSON may not nest deeply (a structure nested
100,000 levels deep would otherwise end in a RecursionError anywhere it is walked), repeat a
key or use the non-standard constants ``NaN`` and ``Infinity``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import read_regular
from .spec import CacheError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "check_json_depth",
    "json_bytes",
    "parse_json",
    "read_json",
]

# A manifest lists every sequence id: a million ids of 100 characters is about 100 MB.
MAX_JSON_BYTES = 1 << 30
# Cache files nest a few levels (the spec's provenance a few more); far below Python's recursion
# limit, so walking a parsed file (json.dumps of the checksum, the spec's round trip) cannot fail.
MAX_JSON_DEPTH = 32


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON (fixed key order, no NaN) for files the cache writes."""
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


class _RefusedJSONError(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _RefusedJSONError(f"non-standard constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _RefusedJSONError(f"key {repeated!r} occurs twice in one object")
    return result


def check_json_depth(obj: Any, limit: int, source: str) -> None:
    """CacheError naming ``source`` if ``obj`` nests lists and dicts deeper than ``limit``.

    Iterative, so it cannot itself run out of stack.
    """
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    raise CacheError(f"{source}: JSON nests deeper than {limit} levels")
                stack.append((child, depth + 1))


def parse_json(text: bytes, source: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse cache JSON strictly (see the module docstring); CacheError naming ``source``."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CacheError(f"{source}: JSON nests too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, huge ints, _RefusedJSONError
        raise CacheError(f"{source}: not valid JSON ({exc})") from None
    if isinstance(obj, dict | list):
        check_json_depth(obj, max_depth, source)
    return obj


def read_json(path: Path) -> Any:
    """Parse a JSON file of the cache; a missing, non-regular, oversized or malformed file is a
    CacheError naming it."""
    return parse_json(read_regular(Path(path), max_bytes=MAX_JSON_BYTES), str(path))
