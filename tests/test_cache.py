"""Tests of the offline teacher-logit cache: format, writer, reader, verify and its CLI.

The oracle is what the scorer handed over: every test writes synthetic ``SequenceScores`` and
checks what comes back against them (v1: bf16/fp16 values within the value dtype's rounding of
the log-prob ``t / T_c - Lambda``; v2: within half a step of the documented quantiser, the top-K
mass exact; everything else exactly). Tests of what both codecs do run on both; v1's layout is
pinned here, v2's in tests/test_cache_v2.py. Corruption tests damage a pristine cache
one way at a time and expect a CacheError naming the damaged file, from the reader and the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pangu_fastkd.cache import (
    CacheError,
    CacheReader,
    CacheSpec,
    CacheWriter,
    SequenceScores,
    finalize_cache,
    verify_cache,
)
from pangu_fastkd.cache import reader as reader_module
from pangu_fastkd.cache.__main__ import main as cli_main
from pangu_fastkd.cache.manifest import read_manifest, write_manifest
from pangu_fastkd.cache.shards import encode_shard, open_shard, shard_name
from pangu_fastkd.cache.spec import decode_ids, encode_ids, id_encoding_for_vocab
from pangu_fastkd.ops import SampledTarget, TopKTarget, fused_linear_sparse_kd

# Supervised tokens per sequence: awkward sizes, one sequence without supervised tokens.
LENGTHS = (5, 0, 3, 11, 1, 7, 4)


# ---------------------------------------------------------------------------------------------
# Sample inputs


def make_spec(**overrides) -> CacheSpec:
    fields = dict(
        vocab_size=1000,
        k=4,
        temperature=1.5,
        teacher_fingerprint="teacher-sha:abc",
        tokenizer_fingerprint="tokenizer-sha:def",
        data_fingerprint="data-sha:123",
        provenance={"template": "chatml", "teacher_path": "/models/teacher"},
        # This file's tests pin v1's layout (tensor names, whole-byte ids, float values);
        # tests/test_cache_v2.py runs the same checks on v2.
        codec="v1",
    )
    fields.update(overrides)
    return CacheSpec(**fields)


def sample_scores(seq_index: int, n: int, spec: CacheSpec) -> SequenceScores:
    """Scores of one sequence, deterministic in ``seq_index``, valid for ``spec``.

    Ids are distinct per row without materialising a vocabulary row (V may exceed 2^24); row 0
    holds the extreme ids ``V - 1`` and 0. Every third row has an empty last slot (with a junk
    logit the writer must drop), every fourth row an impossible (-inf) token; Lambda includes
    mass outside the top-K. Sampled targets (when the spec has them) use both dtypes' extremes.
    """
    g = torch.Generator().manual_seed(7919 * seq_index + 1)
    V, K, T = spec.vocab_size, spec.k, spec.temperature
    base = torch.randint(0, V, (n, 1), generator=g)
    stride = torch.randint(1, V // K + 1, (n, 1), generator=g)
    ids = (base + torch.arange(K) * stride) % V  # distinct: j * stride < V for j < K
    if n:
        ids[0] = torch.arange(-1, K - 1) % V  # V - 1, 0, 1, ...
    logits = (12 + 3 * torch.randn(n, K, generator=g)).sort(dim=1, descending=True).values
    ids[::3, -1] = -1
    logits[::3, -1] = 123.0  # junk in an empty slot
    logits[1::4, -2] = -math.inf  # a token the teacher rules out
    real = (logits / T).masked_fill(ids < 0, -math.inf)
    outside = torch.nn.functional.softplus(torch.randn(n, generator=g))
    lse = torch.logsumexp(real, dim=1) + outside
    label_logit = logits[:, 0] - 6 * torch.rand(n, generator=g)
    scores = SequenceScores(seq_index, ids, logits, lse, label_logit)
    if spec.sampled_k:
        Ks, draws = spec.sampled_k, spec.sampled_draws
        s_base = torch.randint(0, V, (n, 1), generator=g)
        s_ids = (s_base + torch.arange(Ks) * (V // Ks)) % V
        counts = torch.zeros(n, Ks, dtype=torch.int64)
        for row in range(n):
            active = Ks - (row % 2)  # odd rows leave the last slot empty
            counts[row, :active] = 1
            extra = torch.randint(0, active, (draws - active,), generator=g)
            counts[row].index_add_(0, extra, torch.ones_like(extra))
        s_ids[counts == 0] = -1
        scores = dataclasses.replace(scores, sampled_ids=s_ids, sampled_counts=counts)
    return scores


def write_cache(
    directory: Path,
    spec: CacheSpec,
    lengths: Sequence[int] = LENGTHS,
    *,
    shard_tokens: int = 9,
    world_size: int = 1,
) -> list[SequenceScores]:
    """Write and finalise a cache of ``sample_scores``; returns what was handed over."""
    sequence_ids = [f"doc-{i}" for i in range(len(lengths))]
    written = []
    for rank in range(world_size):
        with CacheWriter(
            directory,
            spec,
            sequence_ids,
            rank=rank,
            world_size=world_size,
            shard_tokens=shard_tokens,
        ) as writer:
            while (i := writer.next_sequence) is not None:
                written.append(sample_scores(i, lengths[i], spec))
                writer.add(written[-1])
    finalize_cache(directory, world_size=world_size)
    return sorted(written, key=lambda s: s.seq_index)


def concat(scores: Sequence[SequenceScores], name: str) -> torch.Tensor:
    return torch.cat([getattr(s, name) for s in scores])


def log_prob_tolerance(spec: CacheSpec, v: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Rounding of ``v`` in the value dtype (at most one ulp: to nearest, or toward -inf in a
    row that nearest would lift above probability 1) plus fp32 slack of encoding and
    decoding."""
    ulp = torch.finfo(spec.value_torch_dtype).eps
    slack = 8 * torch.finfo(torch.float32).eps * (1 + lse.abs() + (v + lse).abs())
    return ulp * v.abs() + slack


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Round trip


CODECS = pytest.mark.parametrize("codec", ["v1", "v2"])

# The v2 quantiser as docs/cache-format.md defines it: u(d) = (1 - e^(-d/A)) / (1 - e^(-R/A)).
V2_SCALE, V2_RANGE = 4.0, 30.0


def v2_compand(distance: torch.Tensor) -> torch.Tensor:
    """The documented compander of codec v2, in float64."""
    d = distance.to(torch.float64).clamp(max=V2_RANGE)
    return -torch.expm1(-d / V2_SCALE) / -math.expm1(-V2_RANGE / V2_SCALE)


def topk_tail_kl(exact: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """``[n]`` KL(exact || decoded) over the K stored tokens and the tail bucket, in float64,
    from ``[n, K]`` log-probs (``-inf`` where absent)."""
    p, q = exact.to(torch.float64), decoded.to(torch.float64)
    terms = torch.where(torch.isfinite(p), p.exp() * (p - q), 0.0).sum(dim=1)
    p_tail = (1 - p.exp().sum(dim=1)).clamp(min=0)
    q_tail = (1 - q.exp().sum(dim=1)).clamp(min=0)
    ratio = torch.where(p_tail > 0, torch.log(p_tail / q_tail), 0.0)
    return terms + p_tail * ratio


def _check_topk_v2(target: TopKTarget, expected: Sequence[SequenceScores], spec: CacheSpec) -> None:
    """v2: the same ids (sorted by id with empties last under elias_fano), lse exact, each
    distance to the row max within half a code step, the top-K mass to fp32, the label within
    fp16 rounding."""
    V, T = spec.vocab_size, spec.temperature
    ids = concat(expected, "topk_ids")
    lse = concat(expected, "lse")
    v = concat(expected, "topk_logits").masked_fill(ids < 0, -math.inf) / T - lse[:, None]
    if spec.id_coding == "elias_fano":
        order = torch.argsort(torch.where(ids < 0, V, ids), dim=1, stable=True)
        ids, v = ids.gather(1, order), v.gather(1, order)
    assert target.ids.dtype == torch.int32 and torch.equal(target.ids, ids.to(torch.int32))
    assert target.lse.dtype == torch.float32 and torch.equal(target.lse, lse)
    assert target.temperature == T

    got = target.logits / T - target.lse[:, None]
    finite = torch.isfinite(v)
    assert torch.equal(torch.isfinite(got), finite) and (got[~finite] == -math.inf).all()
    rows = finite.any(dim=1)
    mass, got_mass = v.exp().sum(dim=1), got.exp().sum(dim=1)
    assert torch.allclose(got_mass[rows], mass[rows], rtol=2e-5, atol=1e-7)

    def distance(x: torch.Tensor) -> torch.Tensor:
        top = x.masked_fill(~finite, -math.inf).amax(dim=1, keepdim=True)
        return (top - x).masked_fill(~finite, 0.0)

    half_step = 0.5 / ((1 << spec.value_bits) - 3)
    u_err = (v2_compand(distance(got)) - v2_compand(distance(v))).abs()
    assert u_err.max() <= half_step + 1e-5
    kl = topk_tail_kl(v[rows], got[rows])
    assert kl.min() >= -1e-6 and kl.mean() <= 1e-3

    label = concat(expected, "label_logit")
    v_label = label / T - lse
    got_label = target.label_logit / T - target.lse
    fp16_floor = torch.finfo(torch.float16).min
    tolerance = 2**-11 * v_label.abs() + 8 * torch.finfo(torch.float32).eps * (1 + lse.abs())
    assert ((got_label - v_label.clamp(min=fp16_floor)).abs() <= tolerance).all()


def _check_topk(target: TopKTarget, expected: Sequence[SequenceScores], spec: CacheSpec) -> None:
    if spec.codec == "v2":
        _check_topk_v2(target, expected, spec)
        return
    ids = concat(expected, "topk_ids")
    lse = concat(expected, "lse")
    assert target.ids.dtype == torch.int32 and torch.equal(target.ids, ids.to(torch.int32))
    assert target.lse.dtype == torch.float32 and torch.equal(target.lse, lse)
    assert target.temperature == spec.temperature

    logits = concat(expected, "topk_logits").masked_fill(ids < 0, -math.inf)
    finite = torch.isfinite(logits)
    assert target.logits.dtype == torch.float32
    assert torch.equal(torch.isfinite(target.logits), finite)
    assert (target.logits[~finite] == -math.inf).all()
    v = logits / spec.temperature - lse[:, None]
    got = target.logits / spec.temperature - target.lse[:, None]
    err = (got - v).abs()[finite]
    assert (err <= log_prob_tolerance(spec, v, lse[:, None].expand_as(v))[finite]).all()
    # The tokens that carry the mass keep their probability: relative error of exp(v) for
    # p >= 0.05 is at most 3 ulps of the value dtype (|v| <= 3).
    top = finite & (v > -3)
    rel = got[top].exp() / v[top].exp() - 1
    assert rel.abs().max() <= math.expm1(3 * torch.finfo(spec.value_torch_dtype).eps) + 5e-5
    # No row the scorer kept at most 1 is stored above 1 (the loss would refuse it).
    got_mass = torch.where(finite, got.exp(), 0.0).sum(dim=1)
    exact_mass = torch.where(finite, v.exp(), 0.0).sum(dim=1)
    assert not ((got_mass > 1) & (exact_mass <= 1)).any()

    label = concat(expected, "label_logit")
    v_label = label / spec.temperature - lse
    got_label = target.label_logit / spec.temperature - target.lse
    assert target.label_logit.dtype == torch.float32
    assert ((got_label - v_label).abs() <= log_prob_tolerance(spec, v_label, lse)).all()


def _check_sampled(target: SampledTarget, expected: Sequence[SequenceScores], spec) -> None:
    counts = concat(expected, "sampled_counts")
    assert torch.equal(target.ids, concat(expected, "sampled_ids").to(torch.int32))
    assert target.weights.dtype == torch.float32
    assert torch.equal(target.weights, counts.to(torch.float32) / spec.sampled_draws)
    if len(counts):
        assert torch.allclose(target.weights.sum(dim=1), torch.ones(len(counts)), atol=1e-6)


@pytest.mark.parametrize("value_dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    ("vocab_size", "encoding", "stored"),
    [(1000, "int16", "I16"), (50_000, "uint24", "U8"), ((1 << 24) + 5, "int32", "I32")],
)
def test_round_trip(tmp_path, vocab_size, encoding, stored, value_dtype):
    draws = 300 if vocab_size == 50_000 else 40  # int16 and uint8 counts
    spec = make_spec(
        vocab_size=vocab_size, k=5, value_dtype=value_dtype, sampled_k=6, sampled_draws=draws
    )
    written = write_cache(tmp_path, spec)

    reader = CacheReader(tmp_path)
    assert reader.manifest.spec == spec and reader.manifest.id_encoding == encoding
    assert list(reader.manifest.token_counts) == list(LENGTHS)
    assert len(reader.manifest.shards) > 1
    _check_topk(reader.topk_target(range(len(LENGTHS))), written, spec)
    order = [5, 1, 0, 3]  # any order, including a sequence without tokens
    _check_topk(reader.topk_target(order), [written[i] for i in order], spec)
    _check_sampled(reader.sampled_target(order), [written[i] for i in order], spec)
    empty = reader.topk_target([])
    assert empty.ids.shape == (0, 5) and empty.logits.shape == (0, 5)
    assert [reader.num_tokens(i) for i in range(len(LENGTHS))] == list(LENGTHS)

    # Shards are plain safetensors files holding the chosen encodings.
    with safe_open(str(shard_files(tmp_path)[0]), framework="pt") as shard:
        ids = shard.get_slice("ids")
        assert ids.get_dtype() == stored
        assert ids.get_shape()[1:] == ([5, 3] if encoding == "uint24" else [5])
        assert shard.get_slice("values").get_dtype() == {"bf16": "BF16", "fp16": "F16"}.get(
            value_dtype, "F32"
        )
        assert shard.get_slice("lse").get_dtype() == "F32"
        raw_ids = shard.get_tensor("ids")
    if encoding == "uint24":  # row 0's empty last slot is 0xFFFFFF, little-endian
        assert raw_ids[0, -1].tolist() == [0xFF, 0xFF, 0xFF]
        assert raw_ids[0, 0].tolist() == [(vocab_size - 1) >> s & 0xFF for s in (0, 8, 16)]
    assert verify_cache(tmp_path)["tokens"] == sum(LENGTHS)


@CODECS
def test_reader_keeps_few_shards_mapped(tmp_path, monkeypatch, codec):
    spec = make_spec(codec=codec)
    written = write_cache(tmp_path, spec, shard_tokens=2)
    monkeypatch.setattr(reader_module, "MAX_OPEN_SHARDS", 2)
    reader = CacheReader(tmp_path)
    assert len(reader.manifest.shards) > 3
    order = [6, 0, 3, 5, 2, 4, 1, 0, 6]  # every shard, some twice
    _check_topk(reader.topk_target(order), [written[i] for i in order], spec)
    assert len(reader._open) == 2
    reader.close()
    assert not reader._open


@pytest.mark.parametrize(
    ("vocab_size", "encoding"),
    [
        (2, "int16"),
        (1 << 15, "int16"),
        ((1 << 15) + 1, "uint24"),
        ((1 << 24) - 1, "uint24"),
        (1 << 24, "int32"),
        (1 << 31, "int32"),
    ],
)
def test_id_encoding_boundaries(vocab_size, encoding):
    assert id_encoding_for_vocab(vocab_size) == encoding
    ids = torch.tensor([[vocab_size - 1, -1, 0], [-1, -1, vocab_size // 2]])
    assert torch.equal(decode_ids(encode_ids(ids, encoding), encoding), ids.to(torch.int32))


def test_fused_loss_on_reader_target(tmp_path):
    """The loss on cached targets equals the loss on the scorer's own arrays (within bf16)."""
    V, K, T, d = 97, 6, 1.7, 12
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(n, V, generator=g) * 4 for n in (9, 4, 13)]
    labels = [torch.randint(0, V, (len(t),), generator=g) for t in teacher]
    losses = {}
    for value_dtype in ("fp32", "bf16"):
        spec = make_spec(vocab_size=V, k=K, temperature=T, value_dtype=value_dtype)
        directory = tmp_path / value_dtype
        with CacheWriter(directory, spec, ["a", "b", "c"], shard_tokens=10) as writer:
            for i, (t, y) in enumerate(zip(teacher, labels, strict=True)):
                top = t.topk(K, dim=1)
                lse = torch.logsumexp(t / T, dim=1)
                label_logit = t.gather(1, y[:, None])[:, 0]
                writer.add(SequenceScores(i, top.indices, top.values, lse, label_logit))
        finalize_cache(directory)
        reader = CacheReader(directory)
        reader.check_compatible(
            tokenizer_fingerprint=spec.tokenizer_fingerprint, vocab_size=V, temperature=T, k=K
        )
        target = reader.targets_for_batch(["c", "a"], [13, 9])
        hidden = torch.randn(22, d, generator=torch.Generator().manual_seed(5))
        weight = torch.randn(V, d, generator=torch.Generator().manual_seed(6)).requires_grad_()
        y = torch.cat([labels[2], labels[0]])
        loss = fused_linear_sparse_kd(hidden, weight, y, target, temperature=T)
        loss.backward()
        assert torch.isfinite(weight.grad).all()
        losses[value_dtype] = float(loss.detach())

    full = torch.cat([teacher[2], teacher[0]])
    top = full.topk(K, dim=1)
    exact = TopKTarget(
        ids=top.indices.to(torch.int32),
        logits=top.values,
        lse=torch.logsumexp(full / T, dim=1),
        label_logit=full.gather(1, y[:, None])[:, 0],
        temperature=T,
    )
    hidden = torch.randn(22, d, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(V, d, generator=torch.Generator().manual_seed(6))
    reference = float(fused_linear_sparse_kd(hidden, weight, y, exact, temperature=T))
    assert losses["fp32"] == pytest.approx(reference, rel=1e-5)
    assert losses["bf16"] == pytest.approx(reference, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Ranks, batches, resume


@pytest.mark.parametrize(("lengths", "world_size"), [(LENGTHS, 2), ((3, 2), 3)])
@CODECS
def test_multi_rank_then_finalize(tmp_path, lengths, world_size, codec):
    spec = make_spec(sampled_k=3, sampled_draws=9, codec=codec)
    sequence_ids = [f"doc-{i}" for i in range(len(lengths))]
    writers = [
        CacheWriter(tmp_path, spec, sequence_ids, rank=r, world_size=world_size, shard_tokens=6)
        for r in range(world_size)
    ]
    S = len(lengths)
    assert [w.owned for w in writers] == [
        range(r * S // world_size, (r + 1) * S // world_size) for r in range(world_size)
    ]
    written = {}
    # Ranks interleave, as they would running side by side.
    while any(w.next_sequence is not None for w in writers):
        for writer in writers:
            if (i := writer.next_sequence) is not None:
                written[i] = sample_scores(i, lengths[i], spec)
                writer.add(written[i])
                if writer is writers[-1] and world_size == 2 and writer.next_sequence:
                    with pytest.raises(CacheError, match=r"sequences \[\d+, \d+\)"):
                        finalize_cache(tmp_path, world_size=world_size)
    for writer in writers:
        writer.close()

    with pytest.raises(CacheError, match="world_size"):
        finalize_cache(tmp_path, world_size=world_size + 1 if world_size == 2 else 1)
    manifest = finalize_cache(tmp_path, world_size=world_size)
    assert manifest.world_size == world_size
    assert {s.rank for s in manifest.shards} <= set(range(world_size))
    reader = CacheReader(tmp_path)
    ordered = [written[i] for i in range(S)]
    _check_topk(reader.topk_target(range(S)), ordered, spec)
    _check_sampled(reader.sampled_target(range(S)), ordered, spec)
    assert verify_cache(tmp_path)["sequences"] == S


@CODECS
def test_finalize_refuses_missing_rank(tmp_path, codec):
    spec = make_spec(codec=codec)
    with CacheWriter(tmp_path, spec, ["a", "b", "c"], rank=0, world_size=2) as writer:
        writer.add(sample_scores(0, 2, spec))
    with pytest.raises(CacheError, match=r"progress-r001\.json.*rank 1 never started"):
        finalize_cache(tmp_path, world_size=2)
    with pytest.raises(CacheError, match=r"incomplete or not finalised"):
        CacheReader(tmp_path)


@CODECS
def test_targets_for_batch_alignment_and_mismatch(tmp_path, codec):
    spec = make_spec(sampled_k=2, sampled_draws=5, codec=codec)
    written = write_cache(tmp_path, spec)
    reader = CacheReader(tmp_path)
    docs = ["doc-3", "doc-1", "doc-0", "doc-6"]
    counts = [LENGTHS[3], LENGTHS[1], LENGTHS[0], LENGTHS[6]]
    expected = [written[3], written[1], written[0], written[6]]
    _check_topk(reader.targets_for_batch(docs, counts), expected, spec)
    _check_sampled(reader.targets_for_batch(docs, counts, kind="sampled"), expected, spec)
    assert reader.index_of("doc-6") == 6

    with pytest.raises(CacheError, match=r"'doc-0' has 6 supervised tokens in the batch but 5"):
        reader.targets_for_batch(docs, [LENGTHS[3], LENGTHS[1], 6, LENGTHS[6]])
    with pytest.raises(CacheError, match=r"'doc-99' is not in the cache"):
        reader.targets_for_batch(["doc-99"], [1])
    with pytest.raises(ValueError, match="same length"):
        reader.targets_for_batch(docs, counts[:2])
    with pytest.raises(ValueError, match="kind"):
        reader.targets_for_batch(docs, counts, kind="full")


@CODECS
def test_exception_inside_writer_commits_nothing(tmp_path, codec):
    spec = make_spec(codec=codec)
    sequence_ids = ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="scorer died"):
        with CacheWriter(tmp_path, spec, sequence_ids, shard_tokens=1000) as writer:
            writer.add(sample_scores(0, 4, spec))
            raise RuntimeError("scorer died")
    assert shard_files(tmp_path) == []
    writer = CacheWriter(tmp_path, spec, sequence_ids)
    assert writer.next_sequence == 0


RESUME_JOB = """
import sys, time
if {tests_dir!r} not in sys.path:
    sys.path.insert(0, {tests_dir!r})
from test_cache import LENGTHS, make_spec, sample_scores
from pangu_fastkd.cache import CacheWriter

def main(directory, delay, codec):
    spec = make_spec(sampled_k=3, sampled_draws=12, codec=codec)
    ids = [f"doc-{{i}}" for i in range(len(LENGTHS) * 2)]
    with CacheWriter(directory, spec, ids, shard_tokens=8) as writer:
        while (i := writer.next_sequence) is not None:
            writer.add(sample_scores(i, LENGTHS[i % len(LENGTHS)], spec))
            time.sleep(delay)

if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
"""


def _load_job(path: Path) -> Callable[[Path, float, str], None]:
    spec = importlib.util.spec_from_file_location("resume_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_files(directory)}


@pytest.mark.slow
@CODECS
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, codec):
    job = tmp_path / "resume_job.py"
    job.write_text(RESUME_JOB.format(tests_dir=str(Path(__file__).parent)))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run = _load_job(job)
    run(reference, 0.0, codec)
    finalize_cache(reference)
    total_shards = len(json.loads((reference / "progress-r000.json").read_text())["shards"])

    process = subprocess.Popen(
        [sys.executable, str(job), str(resumed), "0.5", codec],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    progress = resumed / "progress-r000.json"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"writer exited before the kill: {process.stderr.read().decode()}")
            if progress.exists() and json.loads(progress.read_text())["shards"]:
                break
            if time.monotonic() > deadline:
                pytest.fail("the writer committed no shard within 120 s")
            time.sleep(0.02)
        time.sleep(0.75)  # let it buffer a sequence or two of the next shard
        if process.poll() is not None:
            pytest.fail("writer finished before it could be killed; the machine is too slow")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    committed = json.loads(progress.read_text())["shards"]
    assert 1 <= len(committed) < total_shards
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(resumed)

    # What a kill between "shard renamed" and "progress updated" (or mid-write) leaves behind.
    orphan = resumed / f"shard-r000-{len(committed):05d}.safetensors"
    orphan.write_bytes(b"half a shard")
    (resumed / f".shard-r000-{len(committed):05d}.safetensors.x1y2.tmp").write_bytes(b"junk")
    run(resumed, 0.0, codec)
    finalize_cache(resumed)

    assert _digests(resumed) == _digests(reference)
    assert (resumed / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in reference.iterdir())
    verify_cache(resumed)


def test_resume_refuses_other_spec_or_sequences(tmp_path):
    spec = make_spec()
    sequence_ids = ["a", "b", "c", "d"]
    with CacheWriter(tmp_path, spec, sequence_ids, shard_tokens=2) as writer:
        writer.add(sample_scores(0, 3, spec))
        writer.add(sample_scores(1, 2, spec))
    assert CacheWriter(tmp_path, spec, sequence_ids).next_sequence == 2

    with pytest.raises(CacheError, match=r"different spec: k is 4 there and 8 here"):
        CacheWriter(tmp_path, make_spec(k=8), sequence_ids)
    with pytest.raises(CacheError, match=r"tokenizer_fingerprint is 'tokenizer-sha:def' there"):
        CacheWriter(tmp_path, make_spec(tokenizer_fingerprint="other"), sequence_ids)
    with pytest.raises(CacheError, match=r"value_dtype is 'bf16' there and 'fp32' here"):
        CacheWriter(tmp_path, make_spec(value_dtype="fp32"), sequence_ids)
    with pytest.raises(CacheError, match=r"sequences\.json.*different sequence ids"):
        CacheWriter(tmp_path, spec, ["a", "b", "c", "e"])
    with pytest.raises(CacheError, match=r"world_size = 1, this writer has 2"):
        CacheWriter(tmp_path, spec, sequence_ids, rank=0, world_size=2)

    (tmp_path / "shard-r000-00000.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard-r000-00000\.safetensors: committed shard is miss"):
        CacheWriter(tmp_path, spec, sequence_ids)


# ---------------------------------------------------------------------------------------------
# Input validation


def _bad(field: str, change: Callable[[torch.Tensor], torch.Tensor]):
    def mutate(scores: SequenceScores) -> SequenceScores:
        return dataclasses.replace(scores, **{field: change(getattr(scores, field).clone())})

    return mutate


def _set(index, value):
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor[index] = value
        return tensor

    return change


INVALID_SCORES = {
    "wrong K": (_bad("topk_ids", lambda t: t[:, :3]), ValueError, r"topk_ids must have shape"),
    "logits rows": (_bad("topk_logits", lambda t: t[:4]), ValueError, r"topk_logits must have"),
    "lse shape": (_bad("lse", lambda t: t[:, None]), ValueError, r"lse must have shape \[6\]"),
    "float ids": (_bad("topk_ids", lambda t: t.float()), TypeError, r"integer tensor"),
    "int logits": (_bad("topk_logits", lambda t: t.long()), TypeError, r"floating tensor"),
    "id = V": (_bad("topk_ids", _set((2, 1), 1000)), ValueError, r"row 2 holds id 1000"),
    "id = -2": (_bad("topk_ids", _set((4, 0), -2)), ValueError, r"row 4 holds id -2"),
    "duplicate": (
        _bad("topk_ids", lambda t: _set((5, 2), int(t[5, 0]))(t)),
        ValueError,
        r"topk_ids row 5 holds id \d+ more than once",
    ),
    "NaN logit": (_bad("topk_logits", _set((3, 1), math.nan)), ValueError, r"row 3 holds NaN"),
    "+inf logit": (_bad("topk_logits", _set((1, 0), math.inf)), ValueError, r"row 1 holds NaN"),
    "NaN lse": (_bad("lse", _set(2, math.nan)), ValueError, r"lse\[2\] is nan, must be finite"),
    "inf label": (_bad("label_logit", _set(0, -math.inf)), ValueError, r"label_logit\[0\]"),
    "mass > 1": (_bad("lse", _set(1, 0.0)), ValueError, r"row 1 sum to .* > 1"),
    "counts sum": (
        _bad("sampled_counts", lambda t: _set((2, 0), int(t[2, 0]) + 1)(t)),
        ValueError,
        r"sampled_counts row 2 sums to 13, expected sampled_draws = 12",
    ),
    "count on empty": (
        _bad("sampled_counts", lambda t: _set((1, 2), 1)(_set((1, 0), int(t[1, 0]) - 1)(t))),
        ValueError,
        r"sampled_counts row 1 must be >= 1 for every id and 0 for empty slots",
    ),
    "sampled dup": (
        _bad("sampled_ids", lambda t: _set((0, 1), int(t[0, 0]))(t)),
        ValueError,
        r"sampled_ids row 0 holds id",
    ),
    "no sampled": (
        lambda s: dataclasses.replace(s, sampled_ids=None, sampled_counts=None),
        ValueError,
        r"sampled_ids and sampled_counts are required",
    ),
    "out of order": (
        lambda s: dataclasses.replace(s, seq_index=1),
        ValueError,
        r"expected sequence 0 \('a'\), got 1",
    ),
    "not scores": (lambda s: s.topk_ids, TypeError, r"takes a SequenceScores"),
}


@pytest.mark.parametrize("case", list(INVALID_SCORES))
def test_add_rejects_invalid_input(tmp_path, case):
    mutate, error, message = INVALID_SCORES[case]
    spec = make_spec(sampled_k=3, sampled_draws=12)
    good = sample_scores(0, 6, spec)
    writer = CacheWriter(tmp_path, spec, ["a", "b"])
    with pytest.raises(error, match=message):
        writer.add(mutate(good))
    writer.add(good)  # a rejected add leaves nothing behind
    assert writer.next_sequence == 1


def test_writer_and_spec_argument_errors(tmp_path):
    spec = make_spec()
    with pytest.raises(ValueError, match="'a' occurs twice"):
        CacheWriter(tmp_path, spec, ["a", "b", "a"])
    with pytest.raises(ValueError, match="rank must be < world_size"):
        CacheWriter(tmp_path, spec, ["a"], rank=2, world_size=2)
    with pytest.raises(ValueError, match="sequence_ids is empty"):
        CacheWriter(tmp_path, spec, [])
    with pytest.raises(ValueError, match="value_dtype must be one of"):
        make_spec(value_dtype="int8")
    with pytest.raises(ValueError, match="both be 0"):
        make_spec(sampled_k=4)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        make_spec(temperature=0.0)
    with pytest.raises(ValueError, match="k must be <= vocab_size"):
        make_spec(vocab_size=3)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        make_spec(provenance={"path": Path("/x")})
    writer = CacheWriter(tmp_path, spec, ["a"])
    writer.add(sample_scores(0, 2, spec))
    with pytest.raises(ValueError, match="already added all its sequences"):
        writer.add(sample_scores(1, 2, spec))


def test_check_compatible(tmp_path):
    spec = make_spec()
    write_cache(tmp_path, spec, (2, 3))
    reader = CacheReader(tmp_path)
    reader.check_compatible(
        tokenizer_fingerprint="tokenizer-sha:def", vocab_size=1000, temperature=1.5, k=4
    )
    with pytest.raises(
        CacheError,
        match=r"manifest\.json: .*tokenizer_fingerprint: cache has 'tokenizer-sha:def', "
        r"trainer expects 'qwen-tok'; vocab_size: cache has 1000, trainer expects 1024",
    ):
        reader.check_compatible(tokenizer_fingerprint="qwen-tok", vocab_size=1024)
    with pytest.raises(CacheError, match=r"temperature: cache has 1\.5, trainer expects 2\.0"):
        reader.check_compatible(
            tokenizer_fingerprint="tokenizer-sha:def", vocab_size=1000, temperature=2.0
        )
    with pytest.raises(CacheError, match=r"k: cache has 4, trainer expects 16"):
        reader.check_compatible(tokenizer_fingerprint="tokenizer-sha:def", vocab_size=1000, k=16)


# ---------------------------------------------------------------------------------------------
# Corruption


def write_pristine(tmp_path_factory, codec: str, **spec_fields) -> Path:
    """An intact cache of both target kinds, for the damage tests to copy."""
    directory = tmp_path_factory.mktemp(f"pristine-{codec}")
    write_cache(directory, make_spec(sampled_k=3, sampled_draws=12, codec=codec, **spec_fields))
    return directory


@pytest.fixture(scope="module", params=["v1", "v2"])
def pristine(tmp_path_factory, request) -> Path:
    return write_pristine(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def pristine_v1(tmp_path_factory) -> Path:
    return write_pristine(tmp_path_factory, "v1")


def _flip_byte(directory: Path) -> tuple[str, int]:
    path = shard_files(directory)[1]
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name, 1


def _truncate(directory: Path) -> tuple[str, int]:
    path = shard_files(directory)[1]
    path.write_bytes(path.read_bytes()[:-10])
    return path.name, 1


def _delete(directory: Path) -> tuple[str, int]:
    path = shard_files(directory)[1]
    path.unlink()
    return path.name, 1


def _edit_manifest(directory: Path) -> tuple[str, int]:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["token_counts"][0] += 1
    path.write_text(json.dumps(data))
    return "manifest.json", -1


def _future_version(directory: Path) -> tuple[str, int]:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 3
    path.write_text(json.dumps(data))
    return "manifest.json", -1


CORRUPTIONS = {
    "flipped byte": (_flip_byte, "sha256 does not match"),
    "truncated shard": (_truncate, r"truncated or was altered"),
    "missing shard": (_delete, r"shard file is missing"),
    "edited manifest": (_edit_manifest, r"checksum mismatch"),
    "wrong format version": (_future_version, r"format version 3 is not supported"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_detected(tmp_path, pristine, case, capsys):
    damage, message = CORRUPTIONS[case]
    directory = tmp_path / "cache"
    shutil.copytree(pristine, directory)
    assert cli_main(["verify", str(directory)]) == 0
    capsys.readouterr()
    name, shard_index = damage(directory)

    with pytest.raises(CacheError, match=rf"{name}.*{message}|{message}.*{name}") as caught:
        reader = CacheReader(directory)
        reader.topk_target(range(len(LENGTHS)))
    if shard_index >= 0:  # the damage surfaces when the damaged shard is first read
        reader = CacheReader(directory)
        first = reader.manifest.shards[0]
        reader.topk_target(range(first.seq_start, first.seq_stop))  # an intact shard still reads
        damaged = reader.manifest.shards[shard_index]
        with pytest.raises(CacheError, match=name):
            reader.sampled_target([damaged.seq_start])
    assert name in str(caught.value)

    with pytest.raises(CacheError, match=name):
        verify_cache(directory)
    assert cli_main(["verify", str(directory)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("cache error: ") and name in err and "Traceback" not in err


def test_truncated_shard_detected_without_checksums(tmp_path, pristine):
    directory = tmp_path / "cache"
    shutil.copytree(pristine, directory)
    name, _ = _truncate(directory)
    reader = CacheReader(directory, verify_checksums=False)
    with pytest.raises(CacheError, match=rf"{name}: shard is \d+ bytes, the manifest says"):
        reader.topk_target(range(len(LENGTHS)))


def _bad_header_length(data: bytearray) -> None:
    data[:8] = len(data).to_bytes(8, "little")  # the header would run past the end of the file


def _bad_header_json(data: bytearray) -> None:
    data[8:9] = b"x"  # the header's opening brace


@pytest.mark.parametrize("damage", [_bad_header_length, _bad_header_json])
def test_garbled_shard_of_recorded_size_detected_without_checksums(tmp_path, pristine, damage):
    """safetensors' own header checks surface as a CacheError naming the shard."""
    directory = tmp_path / "cache"
    shutil.copytree(pristine, directory)
    path = shard_files(directory)[1]
    data = bytearray(path.read_bytes())
    damage(data)
    path.write_bytes(bytes(data))
    reader = CacheReader(directory, verify_checksums=False)
    reader.topk_target([0])  # shard 0 is intact
    with pytest.raises(
        CacheError, match=rf"^{path.name}: not a valid safetensors file .*truncated or corrupt"
    ):
        reader.topk_target(range(len(LENGTHS)))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_open_shard_refuses_a_fifo_instead_of_blocking(tmp_path):
    fifo = tmp_path / shard_name(0, 0)
    os.mkfifo(fifo)
    with pytest.raises(CacheError, match=rf"^{fifo.name}: not a regular file"):
        open_shard(fifo, make_spec())


def test_shard_bytes_are_those_written_before():
    """A shard's bytes are pinned: caches written by earlier versions keep verifying against
    the sha256s in their manifests, and earlier readers read what this code writes."""
    tensors = {
        "ids": torch.tensor([[3, 1], [0, -1]], dtype=torch.int16),
        "values": torch.tensor([[-0.5, -1.0], [-0.25, -math.inf]]).to(torch.bfloat16),
        "lse": torch.tensor([2.0, 3.5]),
        "label_value": torch.tensor([-0.5, -0.25]).to(torch.bfloat16),
        "seq_offsets": torch.tensor([0, 1, 2]),
    }
    metadata = {
        "format_version": 1,
        "rank": 0,
        "seq_start": 0,
        "seq_stop": 2,
        "id_encoding": "int16",
        "value_dtype": "bf16",
    }
    data = encode_shard(tensors, metadata)
    assert len(data) == 540
    digest = "e6d3c20bab406e896c8b049152e39215d682591affea64f98e51af5edde79189"
    assert hashlib.sha256(data).hexdigest() == digest


def _rewrite_shard(directory: Path, index: int, edit: Callable[[dict], None]) -> str:
    """Change a shard's tensors and re-record it in the manifest, as a buggy writer would."""
    manifest = read_manifest(directory)
    record = manifest.shards[index]
    path = directory / record.name
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as shard:
        metadata = json.loads(shard.metadata()["pangu_fastkd.cache"])
    edit(tensors)
    data = encode_shard(tensors, metadata)
    path.write_bytes(data)
    record = dataclasses.replace(
        record, num_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    shards = tuple(record if i == index else s for i, s in enumerate(manifest.shards))
    write_manifest(directory, dataclasses.replace(manifest, shards=shards))
    return record.name


def _tensor_edit(name: str, index, value):
    def edit(tensors: dict) -> None:
        tensors[name][index] = value

    return edit


BAD_CONTENT = {
    "duplicate id": (
        lambda t: _tensor_edit("ids", (1, 1), int(t["ids"][1, 0]))(t),
        r"row 1 \(sequence 5 'doc-5', token 0\): ids holds id \d+ twice",
    ),
    "id out of range": (_tensor_edit("ids", (2, 0), 1000), r"row 2 .*outside \[0, 1000\)"),
    "NaN value": (_tensor_edit("values", (0, 0), math.nan), r"row 0 .*NaN or \+inf"),
    "+inf value": (_tensor_edit("values", (3, 1), math.inf), r"row 3 .*NaN or \+inf"),
    "lse": (_tensor_edit("lse", 2, -math.inf), r"row 2 .*lse is not finite"),
    "label": (_tensor_edit("label_value", 1, math.nan), r"row 1 .*label value is not finite"),
    "mass": (_tensor_edit("values", (2, slice(None)), -0.01), r"row 2 .*probabilities sum"),
    "counts": (_tensor_edit("sampled_counts", (3, 0), 0), r"row 3 .*sampled_counts"),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_verify_checks_every_row(tmp_path, pristine_v1, case):
    edit, message = BAD_CONTENT[case]
    directory = tmp_path / "cache"
    shutil.copytree(pristine_v1, directory)
    name = _rewrite_shard(directory, 1, edit)
    assert read_manifest(directory).shards[1].seq_start == 4  # rows 0 | 1 2 3 ...: doc-4 | doc-5
    with pytest.raises(CacheError, match=rf"^{name}: {message}"):
        verify_cache(directory)


def test_cli_in_subprocess(tmp_path, pristine):
    directory = tmp_path / "cache"
    shutil.copytree(pristine, directory)
    command = [sys.executable, "-m", "pangu_fastkd.cache"]
    info = subprocess.run([*command, "info", str(directory)], capture_output=True, text=True)
    assert (
        info.returncode == 0 and "k: 4" in info.stdout and f"tokens: {sum(LENGTHS)}" in info.stdout
    )
    name, _ = _truncate(directory)
    verify = subprocess.run([*command, "verify", str(directory)], capture_output=True, text=True)
    assert verify.returncode == 1 and verify.stdout == ""
    assert verify.stderr.startswith("cache error: ") and name in verify.stderr
    assert verify.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Size


@pytest.mark.parametrize("k", [16, 64])
def test_bytes_per_token_within_budget(tmp_path, k):
    """bf16 values with 3-byte ids (V = 151 936): at most 5K + 8 bytes per supervised token,
    shard headers and offsets included."""
    spec = make_spec(vocab_size=151_936, k=k, value_dtype="bf16")
    write_cache(tmp_path, spec, (300, 17, 410, 250), shard_tokens=1 << 18)
    reader = CacheReader(tmp_path)
    assert reader.manifest.id_encoding == "uint24"
    measured = reader.bytes_per_token()
    print(f"K={k}: {measured:.3f} bytes per supervised token (budget {5 * k + 8})")
    assert 5 * k + 6 <= measured <= 5 * k + 8
    assert verify_cache(tmp_path)["bytes_per_token"] == measured


@pytest.mark.parametrize("value_dtype", ["bf16", "fp16"])
def test_rounding_never_lifts_a_row_above_probability_one(tmp_path, value_dtype):
    """Two tokens of probability 1/2 each: to nearest, bf16 stores log(1/2) as -0.6914 and the
    row's mass as 1.0034, which the loss refuses ("hold probability > 1"); the writer rounds
    toward -inf, so the stored mass stays at most the scorer's and the KD step runs."""
    V = 50
    spec = make_spec(vocab_size=V, k=2, temperature=1.0, value_dtype=value_dtype)
    ids = torch.tensor([[3, 7]] * 4)
    logits = torch.zeros(4, 2)
    lse = torch.full((4,), math.log(2.0))
    label_logit = torch.zeros(4)
    with CacheWriter(tmp_path, spec, ["a"], shard_tokens=10) as writer:
        writer.add(SequenceScores(0, ids, logits, lse, label_logit))
    finalize_cache(tmp_path)
    target = CacheReader(tmp_path).topk_target([0])
    mass = (target.logits / target.temperature - target.lse[:, None]).exp().sum(dim=1)
    assert (mass <= 1.0).all() and (mass >= 0.99).all()
    hidden = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    weight = torch.randn(V, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7, 3, 7])
    assert torch.isfinite(fused_linear_sparse_kd(hidden, weight, labels, target))
