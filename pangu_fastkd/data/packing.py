"""Packing tokenized examples end to end into batches of at most ``budget`` tokens.

A packed batch is one flat row of documents delimited by ``cu_seqlens`` (flash-attn varlen
layout, what ``pangu_fastkd.ops.packed_attention`` takes), with no padding. Labels are shifted
inside each document only, so no token is ever trained to predict the next document.

Two orders:
- ``"keep"``: next-fit in the given order, so a curriculum's order survives packing exactly
  (concatenating the batches' ``example_ids`` gives back the input order).
- ``"best_fit"``: best-fit decreasing (each example, longest first, goes to the open batch it
  fills the most), which needs fewer batches; the batch order is then shuffled with ``seed`` so
  training does not see every long document first.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from .boundaries import cu_seqlens_from_lengths, positions_from_cu_seqlens
from .chat import TokenizedExample

__all__ = [
    "IGNORE_INDEX",
    "ORDERS",
    "OVERLONG_POLICIES",
    "PackedBatch",
    "overlong_examples",
    "pack_examples",
    "shard_batches",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of unsupervised positions, as in the loss ops
ORDERS = ("keep", "best_fit")
OVERLONG_POLICIES = ("error", "truncate", "drop")


@dataclass(frozen=True)
class PackedBatch:
    """Documents laid end to end in one row.

    Attributes:
        input_ids: ``[T]`` int64, ``T = sum of document lengths <= budget`` (no padding).
        labels: ``[T]`` int64; ``labels[t] = input_ids[t + 1]`` when token ``t + 1`` is
            supervised and in the same document, else ``-100`` (so every document's last
            token is ``-100``).
        cu_seqlens: ``[B + 1]`` int32 document boundaries, from 0 to ``T``.
        position_ids: ``[T]`` int64, restarting at 0 for each document.
        example_ids: the ``B`` documents' ids, in order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    example_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        T = self.input_ids.numel()
        for name, tensor, dtype, size in (
            ("input_ids", self.input_ids, torch.int64, T),
            ("labels", self.labels, torch.int64, T),
            ("position_ids", self.position_ids, torch.int64, T),
            ("cu_seqlens", self.cu_seqlens, torch.int32, len(self.example_ids) + 1),
        ):
            if tensor.dtype != dtype or tensor.shape != (size,):
                raise ValueError(
                    f"PackedBatch.{name} must be a [{size}] {dtype} tensor, got "
                    f"{tuple(tensor.shape)} {tensor.dtype}"
                )

    @property
    def num_tokens(self) -> int:
        """Total tokens ``T``."""
        return self.input_ids.numel()

    @property
    def num_supervised(self) -> int:
        """Number of positions with a label (``labels != -100``)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def supervised_counts(self) -> list[int]:
        """Supervised positions of each document, in order (how a logit cache aligns rows)."""
        supervised = (self.labels != IGNORE_INDEX).long()
        bounds = self.cu_seqlens.tolist()
        return [int(supervised[a:b].sum()) for a, b in itertools.pairwise(bounds)]

    @property
    def max_seqlen(self) -> int:
        """Length of the longest document (the ``max_seqlen`` of packed attention)."""
        if not self.example_ids:
            return 0
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())


def overlong_examples(examples: Sequence[TokenizedExample], budget: int) -> list[str]:
    """Ids of the examples longer than ``budget`` (what ``overlong="drop"`` skips)."""
    _check_budget(budget)
    return [ex.example_id for ex in examples if len(ex.input_ids) > budget]


def pack_examples(
    examples: Sequence[TokenizedExample],
    budget: int,
    *,
    order: str = "keep",
    seed: int = 0,
    overlong: str = "error",
) -> list[PackedBatch]:
    """Pack examples into batches of at most ``budget`` tokens; no example is split.

    Args:
        examples: tokenized documents.
        budget: maximum tokens per batch.
        order: ``"keep"`` (next-fit, input order preserved) or ``"best_fit"`` (best-fit
            decreasing, fewer batches, batch order shuffled with ``seed``).
        seed: seeds the batch shuffle of ``"best_fit"``; ``"keep"`` uses no randomness.
        overlong: what to do with an example longer than ``budget``: ``"error"`` (raise,
            naming it), ``"truncate"`` (keep its first ``budget`` tokens) or ``"drop"`` (skip
            it with a logged warning; ``overlong_examples`` lists them beforehand).

    Returns:
        The batches; the same inputs and seed always give the same batches.
    """
    _check_budget(budget)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    docs = _fit_to_budget(examples, budget, overlong)
    if order == "keep":
        groups = _next_fit([len(d.input_ids) for d in docs], budget)
    else:
        groups = _best_fit_decreasing([len(d.input_ids) for d in docs], budget)
        random.Random(seed).shuffle(groups)
    return [_build_batch([docs[i] for i in group]) for group in groups]


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")


def _fit_to_budget(
    examples: Sequence[TokenizedExample], budget: int, overlong: str
) -> list[TokenizedExample]:
    """The examples, with overlong ones raised on, truncated or dropped per ``overlong``."""
    docs = []
    dropped = []
    for ex in examples:
        if not isinstance(ex, TokenizedExample):
            raise TypeError(f"pack_examples expects TokenizedExample, got {type(ex).__name__}")
        if len(ex.input_ids) <= budget:
            docs.append(ex)
        elif overlong == "error":
            raise ValueError(
                f"example {ex.example_id!r} has {len(ex.input_ids)} tokens, more than the budget "
                f"of {budget}; raise the budget or pass overlong='truncate' or 'drop'"
            )
        elif overlong == "truncate":
            docs.append(
                TokenizedExample(ex.example_id, ex.input_ids[:budget], ex.supervised[:budget])
            )
        else:
            dropped.append(ex.example_id)
    if dropped:
        shown = ", ".join(map(repr, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        logger.warning(
            "pack_examples dropped %d example(s) longer than %d tokens: %s",
            len(dropped),
            budget,
            shown,
        )
    return docs


def _next_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped in order: a batch closes when the next document does not fit."""
    groups: list[list[int]] = []
    used = budget  # forces a new batch for the first document
    for i, n in enumerate(lengths):
        if used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += n
    return groups


def _best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped by best-fit decreasing; deterministic (ties by input index)."""
    groups: list[list[int]] = []
    # Open batches as (room left, batch index), sorted: bisect finds the tightest fit.
    room: list[tuple[int, int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            groups.append([i])
            left, b = budget - n, len(groups) - 1
        else:
            left, b = room.pop(k)
            groups[b].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, b))
    return groups


def _build_batch(docs: Sequence[TokenizedExample]) -> PackedBatch:
    lengths = torch.tensor([len(d.input_ids) for d in docs], dtype=torch.int64)
    input_ids = torch.tensor(
        list(chain.from_iterable(d.input_ids for d in docs)), dtype=torch.int64
    )
    supervised = torch.tensor(
        list(chain.from_iterable(d.supervised for d in docs)), dtype=torch.bool
    )
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    T = input_ids.numel()
    position_ids = positions_from_cu_seqlens(cu_seqlens, T)

    # Token t predicts token t + 1 only when t + 1 is supervised and still in t's document
    # (position 0 marks the start of the next document).
    labels = torch.full((T,), IGNORE_INDEX, dtype=torch.int64)
    predicts_next = supervised[1:] & (position_ids[1:] != 0)
    labels[:-1] = torch.where(predicts_next, input_ids[1:], IGNORE_INDEX)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        cu_seqlens=cu_seqlens,
        position_ids=position_ids,
        example_ids=tuple(d.example_id for d in docs),
    )


def shard_batches(batches: Sequence[PackedBatch], rank: int, world_size: int) -> list[PackedBatch]:
    """This rank's batches for data parallelism: ``rank, rank + W, ...``.

    The tail that does not divide evenly is dropped so every rank runs the same number of steps
    (a rank with one batch more would hang in the others' collective).

    Raises:
        ValueError: bad rank/world size, or fewer batches than ranks.
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(batches) < world_size:
        raise ValueError(
            f"{len(batches)} batch(es) cannot be shared by {world_size} ranks; every rank needs "
            "at least one (lower the budget or add data)"
        )
    usable = len(batches) - len(batches) % world_size
    if usable < len(batches):
        logger.info("shard_batches drops the last %d batch(es)", len(batches) - usable)
    return list(batches[rank:usable:world_size])
