"""Reading a teacher-logit cache: targets for the sparse-KD loss, aligned with packed batches.

Shards are opened lazily and memory-mapped; the first time a shard is opened its name, type,
size, sha256 (unless disabled), header and sequence offsets are checked against the manifest,
so a truncated, altered, misaligned or misdirected shard is a CacheError naming it, never
silent garbage. Every batch is then value-checked before it is returned (``values.py``): a
shard whose manifest was re-signed, or that changed under its memory map, cannot hand the KD
stage NaN, +inf or ids outside the vocabulary. ``CacheReader.verify`` checks the whole cache
once, before the first training step.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..ops.sparse_kd_targets import SampledTarget, TopKTarget
from .loading import describe_row, load_shard
from .manifest import MANIFEST_NAME, read_manifest
from .shards import ShardFile
from .spec import CacheError
from .values import (
    SAMPLED_NAMES,
    Problem,
    decode_sampled,
    read_topk,
    sampled_problem,
    topk_names,
)
from .verify import verify_manifest

__all__ = ["CacheReader", "load_shard"]

TARGET_KINDS = ("topk", "sampled")
# Each open shard holds a memory map: a cache of thousands of shards read over an epoch would
# pile up mappings (and address space), so only the most recently used shards stay mapped.
MAX_OPEN_SHARDS = 64


class CacheReader:
    """Read access to a finalised cache.

    Args:
        directory: the cache directory.
        verify_checksums: check each shard's sha256 the first time it is opened.
        check_values: check every batch's values before returning it (``values.py``; about
            the cost of copying the rows out, see bench/bench_cache_read.py). Only turn it off
            after ``verify`` passed on a directory nobody else can write.

    Raises:
        CacheError: missing manifest (unfinished or unfinalised cache), unsupported format
            version, edited or inconsistent manifest.

    Attributes:
        manifest: the cache's ``Manifest``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        verify_checksums: bool = True,
        check_values: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.verify_checksums = verify_checksums
        self.check_values = check_values
        self._index = {sid: i for i, sid in enumerate(self.manifest.sequence_ids)}
        self._shard_starts = [shard.seq_start for shard in self.manifest.shards]
        self._open: OrderedDict[int, ShardFile] = OrderedDict()
        self._verified: set[int] = set()  # shards whose sha256 was checked (once is enough)

    # -- compatibility and lookup --------------------------------------------------------------

    def check_compatible(
        self,
        *,
        tokenizer_fingerprint: str,
        vocab_size: int,
        temperature: float | None = None,
        k: int | None = None,
    ) -> None:
        """Refuse a cache made for another tokenizer, vocabulary, temperature or K.

        The trainer calls this before training starts.

        Raises:
            CacheError: naming every differing field with the cache's and the caller's value.
        """
        spec = self.manifest.spec
        differ = []
        if tokenizer_fingerprint != spec.tokenizer_fingerprint:
            differ.append(
                ("tokenizer_fingerprint", spec.tokenizer_fingerprint, tokenizer_fingerprint)
            )
        if vocab_size != spec.vocab_size:
            differ.append(("vocab_size", spec.vocab_size, vocab_size))
        if temperature is not None and not math.isclose(
            temperature, spec.temperature, rel_tol=1e-6
        ):
            differ.append(("temperature", spec.temperature, temperature))
        if k is not None and k != spec.k:
            differ.append(("k", spec.k, k))
        if differ:
            details = "; ".join(
                f"{name}: cache has {there!r}, trainer expects {here!r}"
                for name, there, here in differ
            )
            raise CacheError(
                f"{self.directory / MANIFEST_NAME}: cache is incompatible with this run: {details}"
            )

    def index_of(self, sequence_id: str) -> int:
        """Position of a sequence id in the cache; CacheError if the cache lacks it."""
        try:
            return self._index[sequence_id]
        except KeyError:
            raise CacheError(
                f"{self.directory / MANIFEST_NAME}: sequence {sequence_id!r} is not in the cache"
            ) from None

    def num_tokens(self, seq_index: int) -> int:
        """Supervised tokens (cache rows) of sequence ``seq_index``."""
        self._check_index(seq_index)
        return self.manifest.token_counts[seq_index]

    def bytes_per_token(self) -> float:
        """Shard bytes on disk per supervised token."""
        return self.manifest.bytes_per_token

    # -- targets -------------------------------------------------------------------------------

    def topk_target(self, seq_indices: Sequence[int]) -> TopKTarget:
        """Top-K targets of the given sequences, their rows concatenated in the given order.

        Returns:
            ``TopKTarget`` with ``ids`` ``[N, K]`` int32 (-1 empty), ``logits`` ``[N, K]`` fp32
            raw teacher logits ``T_c * (v + Lambda)`` (-inf for empty slots), ``lse`` ``[N]``
            fp32, ``label_logit`` ``[N]`` fp32, ``temperature`` = T_c; N = the sequences'
            supervised tokens.

        Raises:
            CacheError: a shard fails its checks, or a row its value checks (``values.py``);
                the message names the shard, the row, the sequence and the token.
        """
        spec = self.manifest.spec
        parts, runs = self._gather(seq_indices, topk_names(spec))
        target, problem = read_topk(parts, spec, check=self.check_values)
        self._raise_for(problem, runs)
        return target

    def sampled_target(self, seq_indices: Sequence[int]) -> SampledTarget:
        """Sampled targets of the given sequences, concatenated in the given order.

        Returns:
            ``SampledTarget`` with ``ids`` ``[N, Ks]`` int32 (-1 empty) and ``weights`` ``[N, Ks]``
            fp32 = draws / ``sampled_draws`` (each row sums to 1).

        Raises:
            CacheError: the cache holds no sampled targets, or a shard or a row fails its
                checks (as ``topk_target``).
        """
        spec = self.manifest.spec
        if spec.sampled_k == 0:
            raise CacheError(
                f"{self.directory / MANIFEST_NAME}: this cache holds no sampled targets "
                "(sampled_k = 0)"
            )
        parts, runs = self._gather(seq_indices, SAMPLED_NAMES)
        target = decode_sampled(parts, spec)
        if self.check_values:
            self._raise_for(sampled_problem(target, parts["sampled_counts"], spec), runs)
        return target

    def verify(self) -> dict:
        """Check the whole cache once, before the first training step: ``verify_cache`` on this
        reader's manifest (every shard's size, sha256 and header, every row's values).

        One pass over the cache's bytes; afterwards the reader does not hash the shards again.

        Returns:
            ``verify_cache``'s summary.

        Raises:
            CacheError: naming the manifest, or the shard, row and sequence of the first problem.
        """
        summary = verify_manifest(self.directory, self.manifest)
        self._verified.update(range(len(self.manifest.shards)))
        return summary

    def targets_for_batch(
        self,
        example_ids: Sequence[str],
        supervised_counts: Sequence[int],
        kind: str = "topk",
    ) -> TopKTarget | SampledTarget:
        """Targets aligned with a packed batch: each document's cache rows, in batch order.

        Args:
            example_ids: the batch's documents, in packing order.
            supervised_counts: supervised tokens of each document in the batch.
            kind: ``"topk"`` or ``"sampled"``.

        Returns:
            A target whose rows match the batch's supervised tokens in order.

        Raises:
            CacheError: a document is not in the cache, or its supervised-token count differs
                from the cache's (the batch and the cache came from different data/templates).
        """
        if kind not in TARGET_KINDS:
            raise ValueError(f"kind must be one of {TARGET_KINDS}, got {kind!r}")
        example_ids = list(example_ids)
        supervised_counts = list(supervised_counts)
        if len(example_ids) != len(supervised_counts):
            raise ValueError(
                f"example_ids ({len(example_ids)}) and supervised_counts "
                f"({len(supervised_counts)}) must have the same length"
            )
        indices = []
        for example_id, count in zip(example_ids, supervised_counts, strict=True):
            index = self.index_of(example_id)
            cached = self.manifest.token_counts[index]
            if int(count) != cached:
                raise CacheError(
                    f"{self.directory / MANIFEST_NAME}: document {example_id!r} has {int(count)} "
                    f"supervised tokens in the batch but {cached} in the cache; the batch and the "
                    "cache were built from different data, templates or truncation"
                )
            indices.append(index)
        return self.topk_target(indices) if kind == "topk" else self.sampled_target(indices)

    def close(self) -> None:
        """Release the memory-mapped shards."""
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_index(self, seq_index: int) -> None:
        count = len(self.manifest.sequence_ids)
        if isinstance(seq_index, bool) or not isinstance(seq_index, int | np.integer):
            raise TypeError(f"sequence index must be an int, got {type(seq_index).__name__}")
        if not 0 <= seq_index < count:
            raise IndexError(f"sequence index {seq_index} out of range [0, {count})")

    def _shard(self, index: int) -> ShardFile:
        shard = self._open.get(index)
        if shard is not None:
            self._open.move_to_end(index)
            return shard
        verify = self.verify_checksums and index not in self._verified
        shard = load_shard(self.directory, self.manifest, index, verify_checksum=verify)
        self._verified.add(index)
        self._open[index] = shard
        if len(self._open) > MAX_OPEN_SHARDS:
            _, evicted = self._open.popitem(last=False)
            evicted.close()
        return shard

    def _runs(self, seq_indices: Sequence[int]) -> Iterator[tuple[int, int, int]]:
        """``(shard index, first row, stop row)`` of each run of consecutive sequences that
        live in one shard, in the order given."""
        run: list[int] | None = None  # [shard, first row, stop row, last sequence]
        for seq_index in seq_indices:
            self._check_index(seq_index)
            shard_index = bisect.bisect_right(self._shard_starts, seq_index) - 1
            local = seq_index - self._shard_starts[shard_index]
            offsets = self._shard(shard_index).seq_offsets
            start, stop = int(offsets[local]), int(offsets[local + 1])
            if run is not None and run[0] == shard_index and run[3] + 1 == seq_index:
                run[2], run[3] = stop, seq_index
                continue
            if run is not None:
                yield run[0], run[1], run[2]
            run = [shard_index, start, stop, seq_index]
        if run is not None:
            yield run[0], run[1], run[2]

    def _gather(
        self, seq_indices: Sequence[int], names: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int]]]:
        """The rows of ``names`` for the sequences, and the ``(shard, start, stop)`` runs they
        came from, in order."""
        runs = list(self._runs(seq_indices))
        if not runs:  # no sequences: zero rows, shaped and typed like shard 0's tensors
            runs = [(0, 0, 0)]
        plan = _row_plan(runs)
        return {name: self._take(plan, name) for name in names}, runs

    def _take(
        self, plan: list[tuple[int, np.ndarray, torch.Tensor | None]], name: str
    ) -> torch.Tensor:
        """Tensor ``name``'s rows of the batch, in order: one gather per shard the batch touches."""
        if len(plan) == 1:
            shard, rows, _ = plan[0]
            return self._shard(shard).take(name, rows)
        pieces = [(self._shard(shard).take(name, rows), where) for shard, rows, where in plan]
        total = sum(len(rows) for _, rows, _ in plan)
        out = pieces[0][0].new_empty((total, *pieces[0][0].shape[1:]))
        for piece, where in pieces:
            out[where] = piece
        return out

    def _raise_for(self, problem: Problem | None, runs: list[tuple[int, int, int]]) -> None:
        """CacheError naming the shard, row, sequence and token of batch row ``problem[0]``."""
        if problem is None:
            return
        batch_row, message = problem
        ends = np.cumsum([stop - start for _, start, stop in runs])
        run = int(np.searchsorted(ends, batch_row, side="right"))
        shard_index, start, stop = runs[run]
        row = start + batch_row - (int(ends[run]) - (stop - start))
        shard = self._shard(shard_index)
        where = describe_row(self.manifest, shard_index, shard.seq_offsets, row)
        raise CacheError(f"{self.manifest.shards[shard_index].name}: {where}: {message}")


def _row_plan(
    runs: list[tuple[int, int, int]],
) -> list[tuple[int, np.ndarray, torch.Tensor | None]]:
    """Per shard the runs touch: ``(shard, its rows [m] int64, where they go in the batch)``,
    worked out once per batch for all of its tensors (``where`` is None for a single shard,
    whose rows are the whole batch in order)."""
    shards = np.array([s for s, _, _ in runs])
    starts = np.array([start for _, start, _ in runs], dtype=np.int64)
    lengths = np.array([stop - start for _, start, stop in runs], dtype=np.int64)
    run_of_row = np.repeat(np.arange(len(runs)), lengths)
    # Row r of the batch is row starts[run] + (r - first batch row of the run) of its shard.
    rows = (
        starts[run_of_row]
        + np.arange(int(lengths.sum()))
        - (np.cumsum(lengths) - lengths)[run_of_row]
    )
    distinct = np.unique(shards)
    if len(distinct) == 1:
        return [(int(distinct[0]), rows, None)]
    shard_of_row = shards[run_of_row]
    plan = []
    for shard in distinct:
        mask = shard_of_row == shard
        plan.append((int(shard), rows[mask], torch.from_numpy(mask)))
    return plan
