"""Small models shipped inside the package, named in configs as ``path = "builtin:<name>"``.

Each lives in ``pangu_fastkd/pretrained/<name>/``: a model directory (``config.json``,
``model.safetensors``) plus ``recipe.json``, which records how to reproduce it (the command,
the training config, seed and data recipe, its eval figures) and the sha256 of every file. A
shipped model is verified against those fingerprints when it is resolved, so a damaged or
swapped file fails by name before it is loaded.

They exist because the demo needs a teacher far stronger than the student it trains in five
minutes, and such a teacher takes an hour to train here (``python -m pangu_fastkd.pretrained
ship`` copies a trained model in; the recipe's command retrains it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..durable import sha256_file

__all__ = [
    "BUILTIN_PREFIX",
    "PRETRAINED_DIR",
    "RECIPE",
    "PretrainedError",
    "builtin_names",
    "is_valid_name",
    "read_recipe",
    "resolve_model_path",
]

BUILTIN_PREFIX = "builtin:"
PRETRAINED_DIR = Path(__file__).resolve().parent
RECIPE = "recipe.json"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_verified: set[Path] = set()


class PretrainedError(ValueError):
    """A shipped model is unknown, incomplete or does not match its recorded fingerprints."""


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can name a shipped model (lower-case letters, digits, ``-_.``)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def builtin_names() -> list[str]:
    """The shipped models' names, sorted."""
    return sorted(p.parent.name for p in PRETRAINED_DIR.glob(f"*/{RECIPE}"))


def read_recipe(name: str) -> dict[str, Any]:
    """``recipe.json`` of the shipped model ``name``."""
    path = _directory(name) / RECIPE
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedError(f"{path}: unreadable recipe ({err})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("files"), dict):
        raise PretrainedError(f"{path}: a recipe needs a 'files' table of sha256 fingerprints")
    return recipe


def resolve_model_path(path: str | Path) -> str | Path:
    """``path`` itself, or for ``"builtin:<name>"`` the shipped model's directory after
    checking every file against ``recipe.json`` (once per process).

    Raises:
        PretrainedError: unknown name, missing file, or a fingerprint that does not match.
    """
    if not isinstance(path, str) or not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    directory = _directory(name)
    if directory not in _verified:
        recipe = read_recipe(name)
        for filename, expected in recipe["files"].items():
            file = directory / filename
            if not file.is_file():
                raise PretrainedError(f"{path}: {file} is missing")
            actual = sha256_file(file)
            if actual != expected:
                raise PretrainedError(
                    f"{path}: {file} has sha256 {actual}, but its recipe records {expected}; "
                    "the shipped file is damaged or was replaced"
                )
        _verified.add(directory)
    return str(directory)


def _directory(name: str) -> Path:
    if not is_valid_name(name):
        raise PretrainedError(f"{BUILTIN_PREFIX}{name}: not a shipped model name")
    directory = PRETRAINED_DIR / name
    if not (directory / RECIPE).is_file():
        known = ", ".join(builtin_names()) or "none"
        raise PretrainedError(f"{BUILTIN_PREFIX}{name}: no such shipped model (shipped: {known})")
    return directory
