"""Finalising a teacher-logit cache: the ranks' progress files merged into ``manifest.json``.

Run once, on rank 0, after every rank closed its ``CacheWriter`` (a barrier under ``torchrun``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .jsonfile import read_json
from .loading import open_recorded_shard
from .manifest import Manifest, ShardRecord, write_manifest
from .progress import (
    SEQUENCES_NAME,
    progress_name,
    progress_spec,
    read_progress,
    sequence_ids_digest,
)
from .spec import CacheError, CacheSpec

__all__ = ["finalize_cache"]


def finalize_cache(directory: str | os.PathLike, world_size: int = 1) -> Manifest:
    """Merge the ranks' progress files into ``manifest.json`` once every sequence is committed.

    Call once, on rank 0, after all ranks closed their writers (a barrier under ``torchrun``).
    Each shard's size, header and sha256 are checked against what its writer recorded when it
    committed it (so a shard altered since is refused, not vouched for by the manifest), and its
    per-sequence token counts read from its ``seq_offsets``; those checksums go into the
    manifest.

    Args:
        directory: the cache directory.
        world_size: number of ranks that wrote it.

    Returns:
        The manifest written.

    Raises:
        CacheError: a rank's progress file is missing or disagrees with the others (spec,
            world size, sequence list), sequences are uncovered or covered twice, or a shard is
            missing, has the wrong size, sha256 or a bad header. Each message names the file.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    directory = Path(directory)
    sequences_path = directory / SEQUENCES_NAME
    if not sequences_path.exists():
        raise CacheError(f"{sequences_path}: not found; no CacheWriter has run in {directory}")
    sequences = read_json(sequences_path)
    sequence_ids = sequences.get("sequence_ids") if isinstance(sequences, dict) else None
    if not isinstance(sequence_ids, list) or sequences.get("sha256") != sequence_ids_digest(
        sequence_ids
    ):
        raise CacheError(f"{sequences_path}: corrupt (its sha256 does not match its ids)")

    spec: CacheSpec | None = None
    records: list[ShardRecord] = []
    for rank in range(world_size):
        path = directory / progress_name(rank)
        if not path.exists():
            raise CacheError(f"{path}: not found; rank {rank} never started writing")
        progress = read_progress(path)
        rank_spec = progress_spec(progress, path)
        if spec is None:
            spec = rank_spec
        elif differences := spec.differences(rank_spec):
            name, first, here = differences[0]
            raise CacheError(
                f"{path}: rank {rank} wrote a different spec than rank 0: {name} is {here!r} "
                f"here and {first!r} in rank 0's progress file"
            )
        if progress["world_size"] != world_size:
            raise CacheError(
                f"{path}: written with world_size {progress['world_size']!r}, "
                f"finalize_cache was given {world_size}"
            )
        if progress["sequence_ids_sha256"] != sequences["sha256"]:
            raise CacheError(f"{path}: written for a different sequence list than {SEQUENCES_NAME}")
        rank_records = [ShardRecord.from_json(s, source=str(path)) for s in progress["shards"]]
        if any(record.rank != rank for record in rank_records):
            raise CacheError(f"{path}: lists a shard of another rank")
        records += rank_records
    assert spec is not None

    records.sort(key=lambda shard: shard.seq_start)
    token_counts: list[int] = []
    for shard in records:
        if shard.seq_start != len(token_counts):
            raise CacheError(
                _coverage_message(
                    directory, len(token_counts), shard.seq_start, len(sequence_ids), world_size
                )
            )
        shard_path = directory / shard.name
        # Re-hash: the manifest vouches for these bytes from now on, so they must still be the
        # bytes the writer hashed when it committed the shard.
        opened = open_recorded_shard(directory, shard, spec, verify_checksum=True)
        counts = [int(c) for c in opened.seq_offsets[1:] - opened.seq_offsets[:-1]]
        opened.close()
        if len(counts) != shard.seq_stop - shard.seq_start or sum(counts) != shard.num_tokens:
            raise CacheError(f"{shard_path}: seq_offsets disagree with the progress file")
        token_counts += counts
    if len(token_counts) != len(sequence_ids):
        raise CacheError(
            _coverage_message(
                directory, len(token_counts), len(sequence_ids), len(sequence_ids), world_size
            )
        )

    manifest = Manifest(
        format_version=spec.format_version,
        spec=spec,
        world_size=world_size,
        sequence_ids=tuple(sequence_ids),
        token_counts=tuple(token_counts),
        shards=tuple(records),
    )
    manifest.check_consistent(str(directory))
    write_manifest(directory, manifest)
    return manifest


def _coverage_message(directory: Path, start: int, stop: int, total: int, world: int) -> str:
    if stop < start:
        return f"{directory}: sequence {stop} is covered by two shards; the progress files clash"
    owners = sorted(
        {
            r
            for r in range(world)
            for i in (start, stop - 1)
            if r * total // world <= i < (r + 1) * total // world
        }
    )
    return (
        f"{directory}: sequences [{start}, {stop}) are not committed (rank(s) "
        f"{', '.join(map(str, owners))} have not finished); run every writer to completion "
        "before finalize_cache"
    )
