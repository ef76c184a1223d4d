"""Full integrity check of a teacher-logit cache (``python -m pangu_fastkd.cache verify DIR``).

Beyond what the reader checks when it opens a shard (name, type, size, sha256, header,
alignment with the manifest), this reads every row and runs on it the value checks the reader
runs on every batch it serves (``values.py``): ids in range and distinct within a row, values
finite or ``-inf`` with probabilities summing to at most 1, ``lse``, label values and decoded
logits finite, sampled counts consistent. It catches a cache that is intact on disk but was
written wrong, or whose manifest was re-signed over altered shards.

The KD stage calls it (as ``CacheReader.verify``) once before its first step: one sequential
pass over the cache's bytes, hashing and checking them together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .loading import describe_row, load_shard
from .manifest import Manifest, read_manifest
from .shards import ShardFile
from .spec import CacheError, CacheSpec
from .values import (
    SAMPLED_NAMES,
    Problem,
    decode_sampled,
    read_topk,
    sampled_problem,
    topk_names,
)

__all__ = ["verify_cache", "verify_manifest"]

# Rows checked per step: bounds the memory of a scan over a shard of any size.
CHUNK_ROWS = 1 << 15


def verify_cache(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every shard of a cache against its manifest and every stored value.

    Returns:
        A summary: ``directory``, ``format_version``, ``sequences``, ``tokens``, ``shards``,
        ``bytes``, ``bytes_per_token``, ``vocab_size``, ``k``, ``temperature``, ``id_encoding``,
        ``value_dtype``, ``sampled_k``.

    Raises:
        CacheError: naming the manifest, or the shard, row and sequence of the first problem.
    """
    directory = Path(directory)
    return verify_manifest(directory, read_manifest(directory))


def verify_manifest(directory: str | os.PathLike, manifest: Manifest) -> dict[str, Any]:
    """``verify_cache`` for a manifest already read (by a ``CacheReader``)."""
    directory = Path(directory)
    spec = manifest.spec
    for index, record in enumerate(manifest.shards):
        shard = load_shard(directory, manifest, index, verify_checksum=True)
        try:
            for start in range(0, shard.num_rows, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, shard.num_rows)
                problem = _check_rows(shard, spec, start, stop)
                if problem is not None:
                    row, message = problem
                    where = describe_row(manifest, index, shard.seq_offsets, row)
                    raise CacheError(f"{record.name}: {where}: {message}")
        finally:
            shard.close()
    return {
        "directory": str(directory),
        "format_version": manifest.format_version,
        "sequences": len(manifest.sequence_ids),
        "tokens": manifest.total_tokens,
        "shards": len(manifest.shards),
        "bytes": manifest.total_bytes,
        "bytes_per_token": manifest.bytes_per_token,
        "vocab_size": spec.vocab_size,
        "k": spec.k,
        "temperature": spec.temperature,
        "id_encoding": spec.id_encoding,
        **_codec_summary(spec),
        "sampled_k": spec.sampled_k,
    }


def _codec_summary(spec: CacheSpec) -> dict[str, Any]:
    """How the cache stores its values: v1's value dtype, or v2's codec and value bits."""
    if spec.codec == "v1":
        return {"codec": "v1", "value_dtype": spec.value_dtype}
    return {"codec": spec.codec, "value_bits": spec.value_bits}


def _check_rows(shard: ShardFile, spec: CacheSpec, start: int, stop: int) -> Problem | None:
    """The first problem in rows ``[start, stop)`` as ``(row, message)``, or None."""
    parts = {name: shard.rows(name, start, stop) for name in topk_names(spec)}
    problems = [read_topk(parts, spec)[1]]
    if spec.sampled_k:
        parts = {name: shard.rows(name, start, stop) for name in SAMPLED_NAMES}
        target = decode_sampled(parts, spec)
        problems.append(sampled_problem(target, parts["sampled_counts"], spec))
    found = [p for p in problems if p is not None]
    if not found:
        return None
    row, message = min(found, key=lambda problem: problem[0])
    return start + row, message
