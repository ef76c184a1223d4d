"""Tests of packing: invariants as properties (hypothesis), the labels rule, overlong policies,
best-fit packing and data-parallel sharding.

``check_invariants`` is the oracle: it re-derives every field of every batch from the input
documents with plain Python loops.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_fastkd.data import (
    ByteTokenizer,
    Example,
    Message,
    PackedBatch,
    TokenizedExample,
    default_template,
    overlong_examples,
    pack_examples,
    read_jsonl,
    shard_batches,
    tokenize_example,
    write_jsonl,
)
from pangu_fastkd.data.boundaries import cu_seqlens_from_position_ids

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def doc(example_id: str, ids: list[int], supervised: list[bool] | None = None):
    supervised = [True] * len(ids) if supervised is None else supervised
    return TokenizedExample(example_id, tuple(ids), tuple(supervised))


@st.composite
def documents(draw, max_len: int = 24, max_docs: int = 14):
    """Documents with unique ids, awkward lengths (1 included) and random masks."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=0, max_size=max_docs))
    docs = []
    for i, n in enumerate(lengths):
        ids = draw(st.lists(st.integers(0, 262), min_size=n, max_size=n))
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        docs.append(doc(f"doc{i}", ids, mask))
    return docs


def expected_labels(d: TokenizedExample) -> list[int]:
    """The labels rule, one document at a time."""
    return [
        d.input_ids[t + 1] if t + 1 < len(d.input_ids) and d.supervised[t + 1] else -100
        for t in range(len(d.input_ids))
    ]


def check_invariants(batches: list[PackedBatch], docs: list[TokenizedExample], budget: int):
    """Every document exactly once, intact, in one batch; every field consistent."""
    by_id = {d.example_id: d for d in docs}
    seen: list[str] = []
    for batch in batches:
        T = batch.input_ids.numel()
        assert 1 <= T <= budget
        assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype
        assert batch.input_ids.dtype == torch.int64 and batch.cu_seqlens.dtype == torch.int32
        cu = batch.cu_seqlens.tolist()
        assert len(cu) == len(batch.example_ids) + 1
        assert cu[0] == 0 and cu[-1] == T
        assert all(a < b for a, b in itertools.pairwise(cu))  # no empty document
        assert torch.equal(cu_seqlens_from_position_ids(batch.position_ids), batch.cu_seqlens)
        for k, example_id in enumerate(batch.example_ids):
            d = by_id[example_id]
            s, e = cu[k], cu[k + 1]
            assert batch.input_ids[s:e].tolist() == list(d.input_ids)
            assert batch.position_ids[s:e].tolist() == list(range(e - s))
            assert batch.labels[s:e].tolist() == expected_labels(d)
        assert batch.num_supervised == sum(
            sum(1 for x in expected_labels(by_id[i]) if x != -100) for i in batch.example_ids
        )
        assert batch.max_seqlen == max(b - a for a, b in itertools.pairwise(cu))
        seen += batch.example_ids
    assert sorted(seen) == sorted(by_id)  # nothing lost, nothing duplicated
    total = sum(len(d.input_ids) for d in docs)
    assert sum(b.num_tokens for b in batches) == total


@PROPERTY
@given(docs=documents(), extra=st.integers(0, 30))
def test_keep_order_invariants(docs, extra):
    budget = max((len(d) for d in docs), default=1) + extra
    batches = pack_examples(docs, budget)
    check_invariants(batches, docs, budget)
    # The curriculum order survives: batches read in order give back the input order.
    assert [i for b in batches for i in b.example_ids] == [d.example_id for d in docs]
    # Next-fit: a batch closes only when the next document does not fit in it.
    for prev, nxt in itertools.pairwise(batches):
        first_next = nxt.cu_seqlens[1].item()
        assert prev.num_tokens + first_next > budget


@PROPERTY
@given(docs=documents(), extra=st.integers(0, 30), seed=st.integers(0, 2**32))
def test_best_fit_invariants(docs, extra, seed):
    budget = max((len(d) for d in docs), default=1) + extra
    batches = pack_examples(docs, budget, order="best_fit", seed=seed)
    check_invariants(batches, docs, budget)
    total = sum(len(d) for d in docs)
    assert len(batches) >= -(-total // budget)
    # Any-fit packing never leaves two batches at most half full: the later one's documents
    # (each at most half the budget) would have fit in the earlier one.
    assert sum(1 for b in batches if 2 * b.num_tokens <= budget) <= 1


@PROPERTY
@given(docs=documents(max_len=40), budget=st.integers(1, 20))
def test_truncate_and_drop_invariants(docs, budget):
    fits = [d for d in docs if len(d) <= budget]
    truncated = [
        doc(d.example_id, list(d.input_ids[:budget]), list(d.supervised[:budget])) for d in docs
    ]
    for order in ("keep", "best_fit"):
        check_invariants(pack_examples(docs, budget, order=order, overlong="drop"), fits, budget)
        batches = pack_examples(docs, budget, order=order, overlong="truncate")
        check_invariants(batches, truncated, budget)
    assert overlong_examples(docs, budget) == [d.example_id for d in docs if len(d) > budget]


@PROPERTY
@given(docs=documents(), seed=st.integers(0, 1000))
def test_deterministic_for_a_seed(docs, seed):
    budget = max((len(d) for d in docs), default=1) + 5
    for order in ("keep", "best_fit"):
        a = pack_examples(docs, budget, order=order, seed=seed)
        b = pack_examples(list(docs), budget, order=order, seed=seed)
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.example_ids == y.example_ids
            for name in ("input_ids", "labels", "cu_seqlens", "position_ids"):
                assert torch.equal(getattr(x, name), getattr(y, name))


def test_labels_rule_by_hand():
    docs = [doc("a", [1, 2, 3], [False, True, True]), doc("b", [4, 5], [True, True])]
    (batch,) = pack_examples(docs, 5)
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5]
    # Token 3 is followed by supervised token 4, but 4 starts another document.
    assert batch.labels.tolist() == [2, 3, -100, 5, -100]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 3, 5]
    assert batch.num_supervised == 3
    assert batch.example_ids == ("a", "b")


def test_best_fit_packs_tighter_than_next_fit():
    docs = [doc(f"n{n}", [n] * n) for n in (6, 5, 4, 3, 2)]
    kept = pack_examples(docs, 10)
    assert [b.example_ids for b in kept] == [("n6",), ("n5", "n4"), ("n3", "n2")]
    best = pack_examples(docs, 10, order="best_fit", seed=3)
    assert sorted(b.example_ids for b in best) == [("n5", "n3", "n2"), ("n6", "n4")]


def test_best_fit_seed_shuffles_the_batch_order():
    docs = [doc(f"d{i}", [i] * 10) for i in range(12)]  # one document per batch
    orders = {
        tuple(b.example_ids for b in pack_examples(docs, 10, order="best_fit", seed=s))
        for s in range(4)
    }
    assert len(orders) > 1
    assert all(sorted(o) == sorted((d.example_id,) for d in docs) for o in orders)


def test_overlong_policies(caplog):
    docs = [doc("short", [1, 2]), doc("long", list(range(7)), [False] * 3 + [True] * 4)]
    with pytest.raises(ValueError, match="example 'long' has 7 tokens, more than the budget of 4"):
        pack_examples(docs, 4)
    with caplog.at_level(logging.WARNING, logger="pangu_fastkd.data.packing"):
        dropped = pack_examples(docs, 4, overlong="drop")
    assert [b.example_ids for b in dropped] == [("short",)]
    assert "dropped 1 example(s) longer than 4 tokens: 'long'" in caplog.text
    truncated = pack_examples(docs, 4, overlong="truncate")
    assert [b.example_ids for b in truncated] == [("short",), ("long",)]
    assert truncated[1].input_ids.tolist() == [0, 1, 2, 3]
    assert truncated[1].labels.tolist() == [-100, -100, 3, -100]  # cut: nothing left to predict


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"budget": 0}, ValueError, "budget must be a positive int, got 0"),
        ({"budget": 8.0}, ValueError, "budget must be a positive int, got 8.0"),
        ({"order": "random"}, ValueError, r"order must be one of \('keep', 'best_fit'\)"),
        ({"overlong": "split"}, ValueError, "overlong must be one of"),
        ({"seed": "1"}, TypeError, "seed must be an int, got str"),
    ],
)
def test_pack_argument_errors(kwargs, error, message):
    kwargs = {"budget": 8, **kwargs}
    with pytest.raises(error, match=message):
        pack_examples([doc("a", [1])], **kwargs)


def test_pack_rejects_untokenized_input():
    with pytest.raises(TypeError, match="expects TokenizedExample, got list"):
        pack_examples([[1, 2]], 8)
    assert pack_examples([], 8) == []


def test_packed_batch_checks_its_tensors():
    (batch,) = pack_examples([doc("a", [1, 2])], 4)
    with pytest.raises(ValueError, match=r"PackedBatch.labels must be a \[2\] torch.int64"):
        PackedBatch(
            batch.input_ids, batch.labels.int(), batch.cu_seqlens, batch.position_ids, ("a",)
        )
    with pytest.raises(ValueError, match=r"PackedBatch.cu_seqlens must be a \[3\]"):
        PackedBatch(batch.input_ids, batch.labels, batch.cu_seqlens, batch.position_ids, ("a", "b"))


@pytest.mark.parametrize("n_batches", [6, 7, 8, 9])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_batches(n_batches, world_size):
    batches = pack_examples([doc(f"d{i}", [i]) for i in range(n_batches)], 1)
    shards = [shard_batches(batches, r, world_size) for r in range(world_size)]
    usable = n_batches - n_batches % world_size
    assert {len(s) for s in shards} == {usable // world_size}
    for r, shard in enumerate(shards):
        assert [b.example_ids for b in shard] == [
            batches[i].example_ids for i in range(r, usable, world_size)
        ]
    taken = sorted(b.example_ids for s in shards for b in s)
    assert taken == sorted(b.example_ids for b in batches[:usable])


@pytest.mark.parametrize(
    ("rank", "world_size", "error", "message"),
    [
        (2, 2, ValueError, r"rank must be in \[0, 2\), got 2"),
        (-1, 2, ValueError, "rank must be in"),
        (0, 0, ValueError, "world_size must be >= 1, got 0"),
        (0, 4, ValueError, "3 batch\\(es\\) cannot be shared by 4 ranks"),
        (0.0, 1, TypeError, "rank must be an int, got float"),
    ],
)
def test_shard_errors(rank, world_size, error, message):
    batches = pack_examples([doc(f"d{i}", [i]) for i in range(3)], 1)
    with pytest.raises(error, match=message):
        shard_batches(batches, rank, world_size)


def test_jsonl_to_batches_keeps_the_file_order(tmp_path):
    tok = ByteTokenizer()
    examples = [
        Example(f"e{i}", (Message("user", "q" * i), Message("assistant", "a" * (7 - i))))
        for i in range(7)
    ]
    write_jsonl(tmp_path / "train.jsonl", examples)
    template = default_template(tok)
    docs = [tokenize_example(ex, tok, template) for ex in read_jsonl(tmp_path / "train.jsonl")]
    batches = pack_examples(docs, 30)
    check_invariants(batches, docs, 30)
    assert [i for b in batches for i in b.example_ids] == [ex.id for ex in examples]
    # Each document supervises its answer bytes and the end token, predicted from one before.
    assert sum(b.num_supervised for b in batches) == sum(7 - i + 1 for i in range(7))
