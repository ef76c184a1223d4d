"""Sealed records: what the trainer checks before it trusts a file of the run directory.

A record (a checkpoint's ``state.json``, a stage's ``done.json``) is a JSON object sealed with
the sha256 of its own canonical form, so an edited field (``next_step``, a file's digest, a
dropped entry) is found on reading. The record vouches for files by their sha256; which files
must be there is fixed by the code (``verify_files``), never by the record, so a record
that leaves a file out cannot make it load unverified.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..durable import sha256_file

__all__ = [
    "CHECKSUM_KEY",
    "IntegrityError",
    "canonical_digest",
    "digest_files",
    "files_under",
    "read_sealed",
    "seal",
    "unseal",
    "verify_files",
]

CHECKSUM_KEY = "checksum"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class IntegrityError(ValueError):
    """A record or a file it vouches for is unreadable, edited, missing or damaged; the message
    names the file."""


def canonical_digest(body: Any) -> str:
    """sha256 (hex) of ``body``'s canonical JSON (sorted keys, no spaces; NaN as ``NaN``, which
    an eval row of an empty set may hold)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with its self-checksum under ``CHECKSUM_KEY`` (which ``body`` must not hold)."""
    if CHECKSUM_KEY in body:
        raise ValueError(f"a record to seal must not hold {CHECKSUM_KEY!r}")
    return {**body, CHECKSUM_KEY: canonical_digest(body)}


def unseal(data: Any, source: Path) -> dict[str, Any]:
    """The body of a sealed record read from ``source``, its checksum checked.

    Raises:
        IntegrityError: not a JSON object, no checksum, or a checksum that does not match.
    """
    if not isinstance(data, dict):
        raise IntegrityError(f"{source}: expected a JSON object, got {type(data).__name__}")
    body = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    if CHECKSUM_KEY not in data:
        raise IntegrityError(
            f"{source} has no {CHECKSUM_KEY!r} (written by an older version, or edited)"
        )
    if data[CHECKSUM_KEY] != canonical_digest(body):
        raise IntegrityError(f"{source} was edited or damaged: its checksum does not match")
    return body


def read_sealed(path: Path) -> dict[str, Any]:
    """The body of the sealed record at ``path``.

    Raises:
        IntegrityError: the file is missing, unreadable, not JSON, or fails its checksum.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path} cannot be read: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path} is not valid JSON: {err}") from None
    return unseal(data, path)


def files_under(root: Path, directory: str = "") -> list[str]:
    """Every file under ``root / directory``, as sorted paths relative to ``root``."""
    top = root / directory
    return sorted(str(p.relative_to(root)) for p in top.rglob("*") if p.is_file())


def digest_files(root: Path, relatives: Iterable[str]) -> dict[str, str]:
    """``{relative path: sha256}`` of files under ``root``."""
    return {relative: sha256_file(root / relative) for relative in sorted(relatives)}


def _model_files(recorded: dict[str, str], model_dir: str) -> list[str]:
    """The files a model directory ``model_dir`` (relative) must hold: ``config.json`` and the
    safetensors weights, as one file or as an index (whose shards ``_index_shards`` adds)."""
    prefix = f"{model_dir}/" if model_dir else ""
    weights = f"{prefix}{WEIGHTS_NAME}"
    index = f"{prefix}{WEIGHTS_INDEX_NAME}"
    sharded = index in recorded and weights not in recorded
    return [f"{prefix}config.json", index if sharded else weights]


def _index_shards(root: Path, model_dir: str) -> list[str]:
    """The shard files a (verified) model index lists; empty without an index."""
    prefix = f"{model_dir}/" if model_dir else ""
    index = root / f"{prefix}{WEIGHTS_INDEX_NAME}"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({f"{prefix}{name}" for name in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise IntegrityError(f"{index} cannot be read: {err}") from None


def verify_files(
    root: Path,
    recorded: Any,
    source: Path,
    *,
    required: Iterable[str] = (),
    model_dirs: Iterable[str] = (),
) -> None:
    """Checks the files a record vouches for, against what the code requires.

    Args:
        root: the directory the record's paths are relative to.
        recorded: the record's ``{relative path: sha256}``.
        source: the record's file, named in errors.
        required: paths (relative to ``root``) that must be recorded.
        model_dirs: model directories (relative to ``root``) the record covers: each must hold a
            config and its weights, and its files on disk must be exactly the recorded ones, so a
            file the record leaves out is refused rather than loaded unverified.

    Raises:
        IntegrityError: naming the first file that is unrecorded, missing or damaged.
    """
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise IntegrityError(f"{source}: 'files' is not a mapping of paths to sha256 digests")
    model_dirs = list(model_dirs)
    needed = list(required)
    for directory in model_dirs:
        needed += _model_files(recorded, directory)
    for relative in needed:
        if relative not in recorded:
            raise IntegrityError(f"{source} does not record the required file {root / relative}")
    for directory in model_dirs:
        for relative in files_under(root, directory):
            if relative not in recorded:
                raise IntegrityError(
                    f"{root / relative} is not among the files {source} records (an extra or "
                    "renamed file)"
                )
    for relative, digest in sorted(recorded.items()):
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise IntegrityError(f"{source} records a path outside its directory: {relative!r}")
        path = root / relative
        if not path.is_file():
            raise IntegrityError(f"{path} is missing")
        if sha256_file(path) != digest:
            raise IntegrityError(f"{path} is damaged (its sha256 does not match {source})")
    for directory in model_dirs:
        for shard in _index_shards(root, directory):
            if shard not in recorded:
                raise IntegrityError(f"{source} does not record the weights shard {root / shard}")
