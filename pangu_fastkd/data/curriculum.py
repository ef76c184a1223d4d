"""Curriculum: which examples a training stage sees, and in which order.

A stage is a filter (``select_stage``: by mode and a difficulty range) followed by an ordering
(``order_by_difficulty``: easy to hard, exactly or in shuffled buckets). Pack the result with
``pack_examples(..., order="keep")`` to keep the order through packing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .records import MODES, Example

__all__ = [
    "DIFFICULTY_SOURCES",
    "SCHEDULES",
    "example_difficulty",
    "order_by_difficulty",
    "select_stage",
]

SCHEDULES = ("sorted", "bucketed", "shuffle", "none")
DIFFICULTY_SOURCES = ("given", "length")


def example_difficulty(example: Example, source: str = "given") -> float:
    """The difficulty an ordering uses.

    Args:
        example: the example.
        source: ``"given"`` (``example.difficulty``, which must be set) or ``"length"`` (the
            characters of the assistant's content, all turns: longer answers are harder).
    """
    if source == "given":
        if example.difficulty is None:
            raise ValueError(
                f"example {example.id!r} has no difficulty; give every example one or order by "
                "difficulty='length'"
            )
        return example.difficulty
    if source == "length":
        return float(sum(len(m.content) for m in example.messages if m.role == "assistant"))
    raise ValueError(f"difficulty must be one of {DIFFICULTY_SOURCES}, got {source!r}")


def select_stage(
    examples: Sequence[Example],
    *,
    mode: str | None = None,
    min_difficulty: float | None = None,
    max_difficulty: float | None = None,
) -> list[Example]:
    """The examples of one stage, in input order.

    Args:
        examples: all examples.
        mode: keep only this mode (``"reasoning"`` or ``"fast"``); None keeps every mode.
        min_difficulty, max_difficulty: inclusive bounds on the given difficulty; None is
            unbounded. With a bound set, every example must have a difficulty.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    for name, bound in (("min_difficulty", min_difficulty), ("max_difficulty", max_difficulty)):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound)
        ):
            raise ValueError(f"{name} must be a number or None, got {bound!r}")
    if (
        min_difficulty is not None
        and max_difficulty is not None
        and min_difficulty > max_difficulty
    ):
        raise ValueError(
            f"min_difficulty {min_difficulty} is larger than max_difficulty {max_difficulty}"
        )
    filter_difficulty = min_difficulty is not None or max_difficulty is not None
    low = -math.inf if min_difficulty is None else min_difficulty
    high = math.inf if max_difficulty is None else max_difficulty

    selected = []
    for ex in examples:
        if mode is not None and ex.mode != mode:
            continue
        # An example without a difficulty is neither in nor out of a range: say so.
        if filter_difficulty and not low <= example_difficulty(ex, "given") <= high:
            continue
        selected.append(ex)
    return selected


def order_by_difficulty(
    examples: Sequence[Example],
    *,
    schedule: str = "sorted",
    difficulty: str = "given",
    n_buckets: int = 4,
    seed: int = 0,
) -> list[Example]:
    """Order examples for a stage.

    Args:
        examples: the stage's examples.
        schedule: ``"sorted"`` (increasing difficulty, ties in input order), ``"bucketed"``
            (sorted, cut into ``n_buckets`` buckets of equal size, each shuffled: easy to hard
            without a fixed order inside a level), ``"shuffle"`` (random order) or ``"none"``
            (input order).
        difficulty: ``"given"`` (``Example.difficulty``) or ``"length"`` (assistant characters).
        n_buckets: number of buckets of ``"bucketed"``.
        seed: seeds the shuffles; the same inputs and seed give the same order.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if difficulty not in DIFFICULTY_SOURCES:
        raise ValueError(f"difficulty must be one of {DIFFICULTY_SOURCES}, got {difficulty!r}")
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ValueError(f"n_buckets must be a positive int, got {n_buckets!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    ordered = list(examples)
    rng = random.Random(seed)
    if schedule == "none":
        return ordered
    if schedule == "shuffle":
        rng.shuffle(ordered)
        return ordered
    keys = [example_difficulty(ex, difficulty) for ex in ordered]
    # sorted() is stable: equal difficulties keep their input order.
    ordered = [ordered[i] for i in sorted(range(len(ordered)), key=keys.__getitem__)]
    if schedule == "sorted":
        return ordered
    # Buckets by rank, sizes differing by at most one: bucket i never holds an example harder
    # than one in bucket i + 1, however skewed the difficulty values are.
    out: list[Example] = []
    n = len(ordered)
    for b in range(n_buckets):
        bucket = ordered[b * n // n_buckets : (b + 1) * n // n_buckets]
        rng.shuffle(bucket)
        out += bucket
    return out
