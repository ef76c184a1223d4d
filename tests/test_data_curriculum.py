"""Tests of the curriculum: stage filters and difficulty schedules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_fastkd.data import (
    Example,
    Message,
    example_difficulty,
    order_by_difficulty,
    select_stage,
)

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True)


def make(i: int, *, mode=None, difficulty=None, response: str = "r") -> Example:
    messages = (Message("user", "q" * 50), Message("assistant", response))
    return Example(f"e{i}", messages, mode=mode, difficulty=difficulty)


def ids(examples) -> list[str]:
    return [ex.id for ex in examples]


MIXED = [
    make(0, mode="fast", difficulty=3),
    make(1, mode="reasoning", difficulty=1),
    make(2, mode=None, difficulty=2),
    make(3, mode="fast", difficulty=1),
    make(4, mode="reasoning", difficulty=5),
]


def test_select_stage_by_mode():
    assert ids(select_stage(MIXED, mode="fast")) == ["e0", "e3"]
    assert ids(select_stage(MIXED, mode="reasoning")) == ["e1", "e4"]
    assert ids(select_stage(MIXED)) == ids(MIXED)


def test_select_stage_by_difficulty_bounds_are_inclusive():
    assert ids(select_stage(MIXED, min_difficulty=2)) == ["e0", "e2", "e4"]
    assert ids(select_stage(MIXED, max_difficulty=2)) == ["e1", "e2", "e3"]
    assert ids(select_stage(MIXED, min_difficulty=1, max_difficulty=3)) == ["e0", "e1", "e2", "e3"]
    assert ids(select_stage(MIXED, mode="reasoning", max_difficulty=1)) == ["e1"]
    assert select_stage(MIXED, min_difficulty=6) == []


def test_select_stage_errors():
    no_difficulty = [*MIXED, make(9, mode="fast")]
    # Without a bound, a missing difficulty is fine; with one, it is an error naming it.
    assert ids(select_stage(no_difficulty, mode="fast")) == ["e0", "e3", "e9"]
    with pytest.raises(ValueError, match="example 'e9' has no difficulty"):
        select_stage(no_difficulty, max_difficulty=10)
    with pytest.raises(ValueError, match=r"mode must be one of \('reasoning', 'fast'\)"):
        select_stage(MIXED, mode="thinking")
    with pytest.raises(ValueError, match="min_difficulty 3 is larger than max_difficulty 1"):
        select_stage(MIXED, min_difficulty=3, max_difficulty=1)
    with pytest.raises(ValueError, match="min_difficulty must be a number or None, got '1'"):
        select_stage(MIXED, min_difficulty="1")


def test_sorted_schedule_is_stable():
    ordered = order_by_difficulty(MIXED)
    assert ids(ordered) == ["e1", "e3", "e2", "e0", "e4"]  # e1 before e3: same difficulty


def test_length_difficulty_uses_assistant_characters():
    examples = [make(i, response="x" * n) for i, n in enumerate([30, 5, 12, 5])]
    assert example_difficulty(examples[0], "length") == 30.0
    assert ids(order_by_difficulty(examples, difficulty="length")) == ["e1", "e3", "e2", "e0"]
    multi = Example(
        "m",
        (
            Message("user", "long prompt " * 10),
            Message("assistant", "ab"),
            Message("user", "more"),
            Message("assistant", "cde"),
        ),
    )
    assert example_difficulty(multi, "length") == 5.0


def test_given_difficulty_must_be_present():
    with pytest.raises(ValueError, match=r"example 'e7' has no difficulty.*difficulty='length'"):
        order_by_difficulty([make(1, difficulty=1.0), make(7)])
    # Schedules that do not use the difficulty do not need it.
    unranked = [make(i) for i in range(5)]
    assert ids(order_by_difficulty(unranked, schedule="none")) == ids(unranked)
    assert sorted(ids(order_by_difficulty(unranked, schedule="shuffle"))) == ids(unranked)


@PROPERTY
@given(
    difficulties=st.lists(st.integers(0, 6), min_size=0, max_size=40),
    n_buckets=st.integers(1, 9),
    seed=st.integers(0, 2**31),
)
def test_bucketed_schedule(difficulties, n_buckets, seed):
    examples = [make(i, difficulty=d) for i, d in enumerate(difficulties)]
    ordered = order_by_difficulty(examples, schedule="bucketed", n_buckets=n_buckets, seed=seed)
    assert sorted(ids(ordered)) == sorted(ids(examples))  # a permutation
    assert ordered == order_by_difficulty(
        examples, schedule="bucketed", n_buckets=n_buckets, seed=seed
    )
    # Bucket b holds exactly the b-th slice of the sorted order (as a set), so buckets go from
    # easy to hard and each bucket's size is n // n_buckets or one more.
    ranked = order_by_difficulty(examples)
    n = len(examples)
    for b in range(n_buckets):
        s, e = b * n // n_buckets, (b + 1) * n // n_buckets
        assert sorted(ids(ordered[s:e])) == sorted(ids(ranked[s:e]))
    values = [ex.difficulty for ex in ordered]
    for b in range(n_buckets - 1):
        here = values[b * n // n_buckets : (b + 1) * n // n_buckets]
        later = values[(b + 1) * n // n_buckets :]
        if here and later:
            assert max(here) <= min(later)


def test_bucketed_schedule_shuffles_inside_buckets():
    examples = [make(i, difficulty=i // 10) for i in range(40)]  # 4 levels of 10
    orders = {
        tuple(ids(order_by_difficulty(examples, schedule="bucketed", seed=s))) for s in range(3)
    }
    assert len(orders) == 3  # different seeds, different orders within the levels
    for order in orders:
        for level in range(4):
            assert sorted(order[level * 10 : level * 10 + 10]) == sorted(
                f"e{i}" for i in range(level * 10, level * 10 + 10)
            )


def test_shuffle_schedule_is_a_seeded_permutation():
    examples = [make(i, difficulty=i) for i in range(30)]
    a = order_by_difficulty(examples, schedule="shuffle", seed=1)
    assert a == order_by_difficulty(examples, schedule="shuffle", seed=1)
    assert a != order_by_difficulty(examples, schedule="shuffle", seed=2)
    assert a != examples and sorted(ids(a)) == sorted(ids(examples))


def test_none_schedule_keeps_the_input_order():
    assert order_by_difficulty(MIXED, schedule="none") == MIXED
    assert order_by_difficulty(MIXED, schedule="none") is not MIXED  # a new list


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"schedule": "random"}, ValueError, "schedule must be one of"),
        ({"difficulty": "tokens"}, ValueError, r"difficulty must be one of \('given', 'length'\)"),
        ({"n_buckets": 0}, ValueError, "n_buckets must be a positive int, got 0"),
        ({"n_buckets": 2.0}, ValueError, "n_buckets must be a positive int, got 2.0"),
        ({"seed": None}, TypeError, "seed must be an int, got NoneType"),
    ],
)
def test_order_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        order_by_difficulty(MIXED, **kwargs)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        example_difficulty(MIXED[0], "tokens")
