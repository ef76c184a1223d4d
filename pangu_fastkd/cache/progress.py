"""The writers' bookkeeping files: ``sequences.json`` and one ``progress-r{rank}.json`` per rank.

``sequences.json`` holds the ids of all sequences in cache order, the same for every rank; a
rank's progress file lists its committed shards and is the point a killed writer resumes from.
``finalize_cache`` merges the progress files into the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .jsonfile import read_json
from .spec import FORMAT_VERSIONS, CacheError, CacheSpec

__all__ = [
    "SEQUENCES_NAME",
    "progress_name",
    "progress_spec",
    "read_progress",
    "sequence_ids_digest",
]

SEQUENCES_NAME = "sequences.json"
_PROGRESS_KEYS = frozenset(
    {
        "format_version",
        "rank",
        "world_size",
        "num_sequences",
        "sequence_ids_sha256",
        "owned",
        "spec",
        "shards",
    }
)


def progress_name(rank: int) -> str:
    """File name of a rank's progress file."""
    return f"progress-r{rank:03d}.json"


def sequence_ids_digest(sequence_ids: Sequence[str]) -> str:
    """sha256 of the ordered sequence ids: cheap identity check between ranks and runs."""
    return hashlib.sha256(json.dumps(list(sequence_ids)).encode()).hexdigest()


def read_progress(path: Path) -> dict[str, Any]:
    """A rank's progress file with every key present and a format version this code reads.

    Raises:
        CacheError: naming the file if it is missing, malformed or of another format version.
    """
    progress = read_json(path)
    if not isinstance(progress, dict) or not _PROGRESS_KEYS <= set(progress):
        raise CacheError(f"{path}: malformed progress file")
    version = progress["format_version"]
    if type(version) is not int or version not in FORMAT_VERSIONS.values():
        raise CacheError(
            f"{path}: written by cache format version {version!r}, this code reads versions "
            f"{sorted(FORMAT_VERSIONS.values())}"
        )
    return progress


def progress_spec(progress: dict[str, Any], path: Path) -> CacheSpec:
    """The spec of a progress file read by ``read_progress``, whose codec must be the one of
    its format version."""
    spec = CacheSpec.from_json(progress["spec"], source=str(path))
    if spec.format_version != progress["format_version"]:
        raise CacheError(
            f"{path}: format version {progress['format_version']} does not match the spec's "
            f"codec {spec.codec!r} (version {spec.format_version})"
        )
    return spec
