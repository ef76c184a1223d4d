"""Opening one recorded shard of a cache, checked against its record, and naming its rows.

Shared by the reader (first use of a shard), ``verify_cache`` (every shard) and
``finalize_cache`` (every committed shard, before the manifest is written).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .manifest import Manifest, ShardRecord
from .shards import ShardFile, check_shard_name, open_shard
from .spec import CacheError, CacheSpec

__all__ = ["describe_row", "load_shard", "open_recorded_shard"]


def open_recorded_shard(
    directory: str | os.PathLike, record: ShardRecord, spec: CacheSpec, *, verify_checksum: bool
) -> ShardFile:
    """Open the shard ``record`` names after checking it is the file the record describes.

    Checks the name (before touching any file: only the writer's own names, so the file is a
    direct entry of ``directory``), then, through ``open_shard``: a regular file, not a link,
    of the recorded byte size, hashing to the recorded sha256 (when ``verify_checksum``), with a
    sound header; and that its metadata describes the recorded rank and sequence range.

    Raises:
        CacheError: naming the shard and what is wrong with it.
    """
    check_shard_name(record.name, record.rank, record.name)
    path = Path(directory) / record.name
    shard = open_shard(
        path,
        spec,
        num_bytes=record.num_bytes,
        sha256=record.sha256 if verify_checksum else None,
    )
    meta = shard.metadata
    described = (meta.get("rank"), meta.get("seq_start"), meta.get("seq_stop"))
    if described != (record.rank, record.seq_start, record.seq_stop) or not all(
        type(value) is int for value in described
    ):
        shard.close()
        raise CacheError(
            f"{record.name}: holds rank and sequences {described}, the manifest expects "
            f"({record.rank}, {record.seq_start}, {record.seq_stop})"
        )
    return shard


def load_shard(
    directory: str | os.PathLike, manifest: Manifest, index: int, *, verify_checksum: bool = True
) -> ShardFile:
    """Open shard ``index`` of ``manifest`` after checking it against the manifest.

    ``open_recorded_shard``'s checks, and that the shard's ``seq_offsets`` give the manifest's
    per-sequence token counts.

    Raises:
        CacheError: naming the shard and what is wrong with it.
    """
    record = manifest.shards[index]
    shard = open_recorded_shard(directory, record, manifest.spec, verify_checksum=verify_checksum)
    counts = np.diff(shard.seq_offsets)
    expected = manifest.token_counts[record.seq_start : record.seq_stop]
    if len(counts) != len(expected) or counts.tolist() != list(expected):
        shard.close()
        raise CacheError(
            f"{record.name}: per-sequence token counts {counts.tolist()[:8]} do not match the "
            f"manifest's {list(expected)[:8]}; the shard is misaligned"
        )
    return shard


def describe_row(manifest: Manifest, index: int, seq_offsets: np.ndarray, row: int) -> str:
    """``"row R (sequence S 'id', token T)"`` for row ``row`` of shard ``index``."""
    record = manifest.shards[index]
    local = int(np.searchsorted(seq_offsets, row, side="right")) - 1
    sequence = record.seq_start + local
    token = row - int(seq_offsets[local])
    return f"row {row} (sequence {sequence} {manifest.sequence_ids[sequence]!r}, token {token})"
