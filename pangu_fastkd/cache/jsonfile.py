"""The cache's JSON files (manifest, progress, sequence list): deterministic bytes, checked reads.

Deterministic bytes let a resumed or repeated run write the same files as the first one; a read
that fails names the file, as every cache error does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .spec import CacheError

__all__ = ["json_bytes", "read_json"]


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON (fixed key order, no NaN) for files the cache writes."""
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a CacheError naming it."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheError(f"{path}: file not found") from None
    except OSError as exc:
        raise CacheError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None
