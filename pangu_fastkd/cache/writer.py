"""Writing a teacher-logit cache: validated, encoded shards, resumable, one writer per rank.

The scorer hands over one ``SequenceScores`` per sequence, in order. Sequences are buffered and
written as a shard once the buffer holds ``shard_tokens`` supervised tokens (a sequence is never
split), so shard boundaries depend only on the data and a resumed run rewrites exactly the
shards an uninterrupted run would have written.

Commit protocol (per rank): the shard is written atomically, then the rank's progress file is
atomically replaced with one more shard record. A kill between the two leaves an orphan shard,
which the next writer on that directory deletes along with temp files, before continuing at the
first sequence not in the progress file.

With ``torchrun``, rank r of W owns the contiguous block ``[r * S // W, (r + 1) * S // W)`` of
the S sequences and writes its own shards and progress file; after a barrier, rank 0 calls
``finalize_cache`` to merge the progress files into ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from ..durable import atomic_write_bytes
from .jsonfile import json_bytes, read_json
from .manifest import ShardRecord
from .progress import (
    SEQUENCES_NAME,
    progress_name,
    progress_spec,
    read_progress,
    sequence_ids_digest,
)
from .rows import SequenceScores, encode_sequence
from .shards import encode_shard, shard_codec_metadata, shard_name
from .spec import CacheError, CacheSpec

__all__ = ["CacheWriter"]


class CacheWriter:
    """Writes this rank's share of a cache, resuming after the last committed shard.

    Usage (every rank, same ``sequence_ids``)::

        with CacheWriter(out_dir, spec, sequence_ids, rank=r, world_size=w) as writer:
            while (i := writer.next_sequence) is not None:
                writer.add(score(i))
        # barrier; then on rank 0: finalize_cache(out_dir, world_size=w)

    Args:
        directory: the cache directory (created if missing).
        spec: what the cache holds; must equal the spec of shards already in the directory.
        sequence_ids: ids of ALL sequences in cache order (distinct strings), same on all ranks.
        rank, world_size: this rank owns sequences ``[rank * S // world_size,
            (rank + 1) * S // world_size)``.
        shard_tokens: a shard is written once it holds at least this many supervised tokens.

    Raises:
        CacheError: the directory holds a cache of another spec, world size or sequence list,
            or a committed shard is missing or has the wrong size.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        spec: CacheSpec,
        sequence_ids: Sequence[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        shard_tokens: int = 1 << 18,
    ) -> None:
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a CacheSpec, got {type(spec).__name__}")
        for name, value, minimum in (
            ("world_size", world_size, 1),
            ("rank", rank, 0),
            ("shard_tokens", shard_tokens, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
        if isinstance(sequence_ids, str):
            raise TypeError("sequence_ids must be a sequence of strings, not one string")
        ids = list(sequence_ids)
        if not ids:
            raise ValueError("sequence_ids is empty: there is nothing to cache")
        for position, sequence_id in enumerate(ids):
            if not isinstance(sequence_id, str):
                raise TypeError(
                    f"sequence_ids[{position}] must be a str, got {type(sequence_id).__name__}"
                )
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            duplicate = next(s for s in ids if s in seen or seen.add(s))
            raise ValueError(f"sequence_ids must be distinct, {duplicate!r} occurs twice")

        self.directory = Path(directory)
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.shard_tokens = shard_tokens
        self._sequence_ids = ids
        self._digest = sequence_ids_digest(ids)
        count = len(ids)
        self._owned = range(rank * count // world_size, (rank + 1) * count // world_size)
        self._progress_path = self.directory / progress_name(rank)

        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_or_write_sequence_ids()
        had_progress = self._progress_path.exists()
        self._shards = self._load_progress() if had_progress else []
        self._remove_uncommitted()
        self._next = self._shards[-1].seq_stop if self._shards else self._owned.start
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_tokens = 0
        self._pending_start = self._next
        self._closed = False
        if not had_progress:
            self._write_progress()

    # -- public ---------------------------------------------------------------------------------

    @property
    def owned(self) -> range:
        """Indices of the sequences this rank writes."""
        return self._owned

    @property
    def next_sequence(self) -> int | None:
        """The sequence ``add`` expects next (after opening: the first one not committed), or
        None when all of this rank's sequences have been added."""
        return self._next if self._next < self._owned.stop else None

    @property
    def committed_shards(self) -> tuple[ShardRecord, ...]:
        """Shards of this rank written and recorded in its progress file."""
        return tuple(self._shards)

    def add(self, scores: SequenceScores) -> None:
        """Validate and buffer one sequence; writes a shard once ``shard_tokens`` are buffered
        or the rank's last sequence is added.

        Raises:
            ValueError/TypeError: out-of-order sequence, wrong shapes or dtypes, ids out of
                range or repeated in a row, NaN/+inf logits, non-finite lse or label logit,
                probabilities above 1, inconsistent sampled counts. Nothing is buffered then.
        """
        if self._closed:
            raise ValueError("add() on a closed CacheWriter")
        if not isinstance(scores, SequenceScores):
            raise TypeError(f"add() takes a SequenceScores, got {type(scores).__name__}")
        if self.next_sequence is None:
            raise ValueError(
                f"rank {self.rank} has already added all its sequences "
                f"[{self._owned.start}, {self._owned.stop}); got sequence {scores.seq_index}"
            )
        if scores.seq_index != self._next:
            raise ValueError(
                f"sequences must be added in order: expected sequence {self._next} "
                f"({self._sequence_ids[self._next]!r}), got {scores.seq_index!r}"
            )
        where = f"sequence {self._next} ({self._sequence_ids[self._next]!r})"
        encoded = encode_sequence(scores, self.spec, where)
        self._pending.append(encoded["rows"])
        self._pending_tokens += encoded["num_tokens"]
        self._next += 1
        if self._pending_tokens >= self.shard_tokens or self._next == self._owned.stop:
            self._commit()

    def close(self) -> None:
        """Write the buffered sequences as a (possibly short) last shard. Idempotent."""
        if self._closed:
            return
        self._commit()
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            # A failed run must not commit a shard built from a half-finished loop: drop the
            # buffer, the next writer redoes these sequences.
            self._pending.clear()
            self._closed = True

    # -- internals ----------------------------------------------------------------------------

    def _check_or_write_sequence_ids(self) -> None:
        path = self.directory / SEQUENCES_NAME
        if path.exists():
            stored = read_json(path)
            if not isinstance(stored, dict) or stored.get("sha256") != self._digest:
                count = stored.get("num_sequences") if isinstance(stored, dict) else None
                raise CacheError(
                    f"{path}: the directory's cache lists different sequence ids ({count} "
                    f"sequences) than this writer ({len(self._sequence_ids)}); use a new "
                    "directory for new data"
                )
            return
        body = {
            "num_sequences": len(self._sequence_ids),
            "sha256": self._digest,
            "sequence_ids": self._sequence_ids,
        }
        # Every rank may write this file at once: the bytes are identical and the rename atomic.
        atomic_write_bytes(path, json_bytes(body), tag=f"r{self.rank:03d}.")

    def _load_progress(self) -> list[ShardRecord]:
        path = self._progress_path
        progress = read_progress(path)
        source = str(path)
        spec = progress_spec(progress, path)
        differences = spec.differences(self.spec)
        if differences:
            name, there, here = differences[0]
            raise CacheError(
                f"{path}: the cache in this directory was written with a different spec: "
                f"{name} is {there!r} there and {here!r} here"
            )
        for key, mine in (
            ("rank", self.rank),
            ("world_size", self.world_size),
            ("num_sequences", len(self._sequence_ids)),
            ("sequence_ids_sha256", self._digest),
        ):
            if progress[key] != mine:
                raise CacheError(
                    f"{path}: written with {key} = {progress[key]!r}, this writer has {mine!r}"
                )
        shards = [ShardRecord.from_json(s, source=source) for s in progress["shards"]]
        position = self._owned.start
        for index, shard in enumerate(shards):
            if shard.name != shard_name(self.rank, index) or shard.seq_start != position:
                raise CacheError(f"{path}: shard records out of order at {shard.name}")
            position = shard.seq_stop
            shard_path = self.directory / shard.name
            size = shard_path.stat().st_size if shard_path.exists() else None
            if size != shard.num_bytes:
                state = "missing" if size is None else f"{size} bytes"
                raise CacheError(
                    f"{shard_path}: committed shard is {state}, expected {shard.num_bytes} "
                    f"bytes; delete {path.name} and the rank's shards to rescore rank {self.rank}"
                )
        if position > self._owned.stop:
            raise CacheError(f"{path}: shards run past this rank's sequences")
        return shards

    def _remove_uncommitted(self) -> None:
        committed = {shard.name for shard in self._shards}
        prefix = f"r{self.rank:03d}"
        patterns = (
            f"shard-{prefix}-*.safetensors",
            f".shard-{prefix}-*.tmp",
            f".{progress_name(self.rank)}.*.tmp",
            f".{SEQUENCES_NAME}.{prefix}.*.tmp",
        )
        for pattern in patterns:
            for path in self.directory.glob(pattern):
                if path.name not in committed:
                    path.unlink(missing_ok=True)

    def _write_progress(self) -> None:
        body = {
            "format_version": self.spec.format_version,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_sequences": len(self._sequence_ids),
            "sequence_ids_sha256": self._digest,
            "owned": [self._owned.start, self._owned.stop],
            "spec": self.spec.to_json(),
            "shards": [shard.to_json() for shard in self._shards],
        }
        atomic_write_bytes(self._progress_path, json_bytes(body))

    def _commit(self) -> None:
        if not self._pending:
            return
        seq_start, seq_stop = self._pending_start, self._next
        tensors = {
            name: torch.cat([rows[name] for rows in self._pending]) for name in self._pending[0]
        }
        counts = torch.tensor([0] + [len(rows["lse"]) for rows in self._pending])
        tensors["seq_offsets"] = counts.cumsum(0).to(torch.int64)
        metadata = {
            "format_version": self.spec.format_version,
            "rank": self.rank,
            "seq_start": seq_start,
            "seq_stop": seq_stop,
            **shard_codec_metadata(self.spec),
        }
        data = encode_shard(tensors, metadata)
        name = shard_name(self.rank, len(self._shards))
        atomic_write_bytes(self.directory / name, data)
        record = ShardRecord(
            name=name,
            rank=self.rank,
            seq_start=seq_start,
            seq_stop=seq_stop,
            num_tokens=self._pending_tokens,
            num_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self._shards.append(record)
        self._write_progress()
        self._pending = []
        self._pending_tokens = 0
        self._pending_start = seq_stop
