"""Full integrity check of a teacher-logit cache (``python -m pangu_fastkd.cache verify DIR``).

Beyond what the reader checks when it opens a shard (size, sha256, header, alignment with the
manifest), this reads every row: ids in range and distinct within a row, values finite or
``-inf`` with probabilities summing to at most 1, ``lse`` and label values finite, sampled counts
consistent. It catches a cache that is intact on disk but was written wrong.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .manifest import read_manifest
from .reader import load_shard
from .rows import find_bad_id, first_row
from .shards import ShardFile
from .spec import CacheError, CacheSpec, decode_ids

__all__ = ["verify_cache"]

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
    manifest = read_manifest(directory)
    spec = manifest.spec
    for index, record in enumerate(manifest.shards):
        shard = load_shard(directory, manifest, index, verify_checksum=True)
        try:
            for start in range(0, shard.num_rows, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, shard.num_rows)
                problem = _check_rows(shard, spec, start, stop)
                if problem is not None:
                    row, message = problem
                    local = int(np.searchsorted(shard.seq_offsets, row, side="right")) - 1
                    sequence = record.seq_start + local
                    token = row - int(shard.seq_offsets[local])
                    raise CacheError(
                        f"{record.name}: row {row} (sequence {sequence} "
                        f"{manifest.sequence_ids[sequence]!r}, token {token}): {message}"
                    )
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
        "value_dtype": spec.value_dtype,
        "sampled_k": spec.sampled_k,
    }


def _mass_tolerance(spec: CacheSpec) -> float:
    # Rounding each stored log-prob v by a relative eps moves sum_j exp(v_j) by at most
    # eps * sum_j p_j |v_j| <= eps * log(K) (the entropy bound); 1e-3 covers an fp32 Lambda.
    eps = torch.finfo(spec.value_torch_dtype).eps
    return 1e-3 + eps * max(1.0, math.log(spec.k))


def _check_id_rows(ids: torch.Tensor, vocab_size: int, name: str) -> tuple[int, str] | None:
    problem = find_bad_id(ids, vocab_size)
    if problem is None:
        return None
    row, value, out_of_range = problem
    if out_of_range:
        return row, f"{name} holds id {value} outside [0, {vocab_size})"
    return row, f"{name} holds id {value} twice"


def _check_rows(shard: ShardFile, spec: CacheSpec, start: int, stop: int) -> tuple[int, str] | None:
    """The first problem in rows ``[start, stop)`` as ``(row, message)``, or None."""
    problems = []

    ids = decode_ids(shard.rows("ids", start, stop), spec.id_encoding)
    problems.append(_check_id_rows(ids, spec.vocab_size, "ids"))

    values = shard.rows("values", start, stop).to(torch.float32)
    bad = torch.isnan(values) | (values == math.inf)
    if bad.any():
        problems.append((first_row(bad), "values hold NaN or +inf"))
    empty_with_value = (ids < 0) & (values != -math.inf)
    if empty_with_value.any():
        problems.append((first_row(empty_with_value), "an empty id slot has a finite value"))
    mass = values.exp().sum(dim=1)
    too_much = mass > 1 + _mass_tolerance(spec)
    if too_much.any():
        row = int(too_much.nonzero()[0, 0])
        problems.append((row, f"top-K probabilities sum to {float(mass[row]):.6g} > 1"))

    lse = shard.rows("lse", start, stop)
    if not torch.isfinite(lse).all():
        problems.append((first_row(~torch.isfinite(lse)), "lse is not finite"))
    label = shard.rows("label_value", start, stop).to(torch.float32)
    if not torch.isfinite(label).all():
        problems.append((first_row(~torch.isfinite(label)), "label value is not finite"))
    elif (label > _mass_tolerance(spec)).any():
        problems.append((first_row(label > _mass_tolerance(spec)), "label probability above 1"))

    if spec.sampled_k:
        sampled_ids = decode_ids(shard.rows("sampled_ids", start, stop), spec.id_encoding)
        problems.append(_check_id_rows(sampled_ids, spec.vocab_size, "sampled_ids"))
        counts = shard.rows("sampled_counts", start, stop).to(torch.int64)
        bad = torch.where(sampled_ids < 0, counts != 0, counts < 1)
        if bad.any():
            problems.append((first_row(bad), "sampled_counts are not >= 1 for ids, 0 for empty"))
        wrong = counts.sum(dim=1) != spec.sampled_draws
        if wrong.any():
            problems.append(
                (int(wrong.nonzero()[0, 0]), f"sampled_counts do not sum to {spec.sampled_draws}")
            )

    found = [p for p in problems if p is not None]
    if not found:
        return None
    row, message = min(found, key=lambda problem: problem[0])
    return start + row, message
