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
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ..durable import atomic_write_bytes
from .format import (
    FORMAT_VERSION,
    SEQUENCES_NAME,
    CacheError,
    CacheSpec,
    Manifest,
    ShardRecord,
    encode_ids,
    encode_shard,
    json_bytes,
    open_shard,
    progress_name,
    read_json,
    sequence_ids_digest,
    shard_name,
    write_manifest,
)

__all__ = ["CacheWriter", "SequenceScores", "finalize_cache"]

# The top-K probabilities exp(t / T_c - Lambda) of a row may exceed 1 by this much (rounding of
# an fp32 Lambda); more means Lambda is not the log-partition of these logits at T_c.
MASS_TOLERANCE = 1e-3


@dataclass
class SequenceScores:
    """What the scorer hands over for one sequence (``n`` = its supervised tokens).

    Attributes:
        seq_index: position of the sequence in the cache order.
        topk_ids: ``[n, K]`` integer token ids, distinct per row, ``-1`` = empty slot.
        topk_logits: ``[n, K]`` float raw teacher logits, finite or ``-inf`` (empty slots are
            ignored and stored as ``-inf``).
        lse: ``[n]`` float, ``Lambda = logsumexp_u(t_u / T_c)`` over the full vocabulary.
        label_logit: ``[n]`` float, the label token's raw teacher logit (finite).
        sampled_ids: ``[n, Ks]`` integer ids drawn from the teacher at T_c, distinct per row,
            ``-1`` = empty slot; required exactly when ``spec.sampled_k > 0``.
        sampled_counts: ``[n, Ks]`` integer draws of each id (>= 1, 0 for empty slots), each row
            summing to ``spec.sampled_draws``.
    """

    seq_index: int
    topk_ids: torch.Tensor
    topk_logits: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor
    sampled_ids: torch.Tensor | None = None
    sampled_counts: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Validation and encoding of one sequence


def _as_tensor(where: str, name: str, value: Any, *, floating: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating tensor, got {value.dtype}")
    if not floating and (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    ):
        raise TypeError(f"{where}: {name} must be an integer tensor, got {value.dtype}")
    return value.detach().cpu()


def _check_shape(where: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        expected = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{where}: {name} must have shape {expected}, got {list(tensor.shape)}")


def _first_row(mask: torch.Tensor) -> int:
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()[0, 0])


def _check_ids(where: str, name: str, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``ids`` as int64 after checking the range and that no row repeats an id."""
    ids = ids.to(torch.int64)
    bad = (ids < -1) | (ids >= vocab_size)
    if bad.any():
        row = _first_row(bad)
        value = int(ids[row][bad[row]][0])
        raise ValueError(
            f"{where}: {name} row {row} holds id {value}, expected -1 (empty) or "
            f"0 <= id < vocab_size ({vocab_size})"
        )
    ordered = ids.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = _first_row(repeated)
        value = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(f"{where}: {name} row {row} holds id {value} more than once")
    return ids


def _log_probs(
    where: str, name: str, logits: torch.Tensor, lse: torch.Tensor, spec: CacheSpec
) -> torch.Tensor:
    """``logits / T_c - lse`` (fp32, ``[n, K]`` or ``[n]``) after checking the logits and that
    the probabilities of a row add up to at most 1."""
    bad = torch.isnan(logits) | (logits == math.inf)
    if bad.any():
        raise ValueError(f"{where}: {name} row {_first_row(bad)} holds NaN or +inf")
    values = logits / spec.temperature - (lse if logits.dim() == 1 else lse[:, None])
    mass = values.exp() if logits.dim() == 1 else values.exp().sum(dim=1)
    too_much = mass > 1 + MASS_TOLERANCE
    if too_much.any():
        row = int(too_much.nonzero()[0, 0])
        raise ValueError(
            f"{where}: probabilities exp({name} / T_c - lse) of row {row} sum to "
            f"{float(mass[row]):.6g} > 1: lse is not the log-partition of these logits at "
            f"T_c = {spec.temperature}"
        )
    return values


def _encode_sequence(scores: SequenceScores, spec: CacheSpec, where: str) -> dict[str, Any]:
    """Check one sequence's scores and return its shard rows (stored dtypes) and row count."""
    ids = _as_tensor(where, "topk_ids", scores.topk_ids, floating=False)
    if ids.dim() != 2:
        raise ValueError(f"{where}: topk_ids must be [n, K], got shape {list(ids.shape)}")
    n = ids.shape[0]
    _check_shape(where, "topk_ids", ids, (n, spec.k))
    logits = _as_tensor(where, "topk_logits", scores.topk_logits, floating=True)
    _check_shape(where, "topk_logits", logits, (n, spec.k))
    lse = _as_tensor(where, "lse", scores.lse, floating=True)
    _check_shape(where, "lse", lse, (n,))
    label_logit = _as_tensor(where, "label_logit", scores.label_logit, floating=True)
    _check_shape(where, "label_logit", label_logit, (n,))

    lse = lse.to(torch.float32)
    for name, tensor in (("lse", lse), ("label_logit", label_logit)):
        if not torch.isfinite(tensor).all():
            row = int((~torch.isfinite(tensor)).nonzero()[0, 0])
            raise ValueError(f"{where}: {name}[{row}] is {float(tensor[row])}, must be finite")
    ids = _check_ids(where, "topk_ids", ids, spec.vocab_size)
    empty = ids < 0
    # Empty slots carry no logit: whatever the scorer put there is replaced by -inf.
    logits = logits.to(torch.float32).masked_fill(empty, -math.inf)
    values = _log_probs(where, "topk_logits", logits, lse, spec)
    label_value = _log_probs(where, "label_logit", label_logit.to(torch.float32), lse, spec)
    # fp16 tops out at -65504: keep the label's log-prob finite (the loss requires it).
    value_min = torch.finfo(spec.value_torch_dtype).min
    label_value = label_value.clamp(min=value_min)

    rows = {
        "ids": encode_ids(ids, spec.id_encoding),
        "values": values.to(spec.value_torch_dtype),
        "lse": lse.contiguous(),
        "label_value": label_value.to(spec.value_torch_dtype),
    }
    rows.update(_encode_sampled(scores, spec, where, n))
    return {"rows": rows, "num_tokens": n}


def _encode_sampled(
    scores: SequenceScores, spec: CacheSpec, where: str, n: int
) -> dict[str, torch.Tensor]:
    given = (scores.sampled_ids is not None, scores.sampled_counts is not None)
    if spec.sampled_k == 0:
        if any(given):
            raise ValueError(f"{where}: sampled targets given, but the spec has sampled_k = 0")
        return {}
    if not all(given):
        raise ValueError(
            f"{where}: sampled_ids and sampled_counts are required (spec.sampled_k = "
            f"{spec.sampled_k})"
        )
    ids = _as_tensor(where, "sampled_ids", scores.sampled_ids, floating=False)
    _check_shape(where, "sampled_ids", ids, (n, spec.sampled_k))
    counts = _as_tensor(where, "sampled_counts", scores.sampled_counts, floating=False)
    _check_shape(where, "sampled_counts", counts, (n, spec.sampled_k))
    ids = _check_ids(where, "sampled_ids", ids, spec.vocab_size)
    counts = counts.to(torch.int64)
    bad = torch.where(ids < 0, counts != 0, counts < 1)
    if bad.any():
        row = _first_row(bad)
        raise ValueError(
            f"{where}: sampled_counts row {row} must be >= 1 for every id and 0 for empty "
            f"slots, got counts {counts[row].tolist()} for ids {ids[row].tolist()}"
        )
    wrong_sum = counts.sum(dim=1) != spec.sampled_draws
    if wrong_sum.any():
        row = int(wrong_sum.nonzero()[0, 0])
        raise ValueError(
            f"{where}: sampled_counts row {row} sums to {int(counts[row].sum())}, expected "
            f"sampled_draws = {spec.sampled_draws}"
        )
    return {
        "sampled_ids": encode_ids(ids, spec.id_encoding),
        "sampled_counts": counts.to(spec.counts_dtype),
    }


# ---------------------------------------------------------------------------------------------
# Writer


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
        encoded = _encode_sequence(scores, self.spec, where)
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
        progress = _read_progress(path)
        source = str(path)
        spec = CacheSpec.from_json(progress["spec"], source=source)
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
            "format_version": FORMAT_VERSION,
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
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "seq_start": seq_start,
            "seq_stop": seq_stop,
            "id_encoding": self.spec.id_encoding,
            "value_dtype": self.spec.value_dtype,
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


def _read_progress(path: Path) -> dict[str, Any]:
    progress = read_json(path)
    keys = {
        "format_version",
        "rank",
        "world_size",
        "num_sequences",
        "sequence_ids_sha256",
        "owned",
        "spec",
        "shards",
    }
    if not isinstance(progress, dict) or not keys <= set(progress):
        raise CacheError(f"{path}: malformed progress file")
    if progress["format_version"] != FORMAT_VERSION:
        raise CacheError(
            f"{path}: written by cache format version {progress['format_version']!r}, "
            f"this code writes version {FORMAT_VERSION}"
        )
    return progress


# ---------------------------------------------------------------------------------------------
# Finalize


def finalize_cache(directory: str | os.PathLike, world_size: int = 1) -> Manifest:
    """Merge the ranks' progress files into ``manifest.json`` once every sequence is committed.

    Call once, on rank 0, after all ranks closed their writers (a barrier under ``torchrun``).
    Each shard's size and header are checked and its per-sequence token counts read from its
    ``seq_offsets``; the checksums recorded at commit time go into the manifest.

    Args:
        directory: the cache directory.
        world_size: number of ranks that wrote it.

    Returns:
        The manifest written.

    Raises:
        CacheError: a rank's progress file is missing or disagrees with the others (spec,
            world size, sequence list), sequences are uncovered or covered twice, or a shard is
            missing, has the wrong size or a bad header. Each message names the file.
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
        progress = _read_progress(path)
        rank_spec = CacheSpec.from_json(progress["spec"], source=str(path))
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
        records += [ShardRecord.from_json(s, source=str(path)) for s in progress["shards"]]
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
        size = shard_path.stat().st_size if shard_path.exists() else None
        if size != shard.num_bytes:
            state = "missing" if size is None else f"{size} bytes"
            raise CacheError(f"{shard_path}: shard is {state}, expected {shard.num_bytes} bytes")
        opened = open_shard(shard_path, spec)
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
        format_version=FORMAT_VERSION,
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
