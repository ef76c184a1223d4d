"""Teacher scoring into the logit cache: targets, label conditioning, resume and torchrun.

The oracle is the teacher's own full forward (``DecoderLM.forward``, all [T, V] logits) on the
same sequence: what the cache returns for each supervised token must be what that forward says
about it (top-K, log-partition at T_c, label logit), in the student's row order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pangu_fastkd.cache import CacheError, CacheReader
from pangu_fastkd.data import (
    ByteTokenizer,
    Example,
    Message,
    default_template,
    pack_examples,
    tokenize_example,
    write_jsonl,
)
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights, save_pretrained
from pangu_fastkd.ops import fused_linear_sparse_kd, sparse_kd_reference
from pangu_fastkd.scoring import (
    Agreement,
    ScoringConfig,
    condition_on_answer,
    reference_agreement,
    rows_to_targets,
    sample_counts,
    score_to_cache,
    teacher_sequence,
)

TOKENIZER = ByteTokenizer()
TEMPLATE = default_template(TOKENIZER)
REPO = Path(__file__).resolve().parents[1]


def make_examples(n: int = 7) -> list[Example]:
    """Conversations of awkward lengths; one multi-turn with a system prompt."""
    examples = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        messages = (
            Message("user", f"What is {a} + {b}?"),
            Message("assistant", f"{a} + {b} = {a + b}." + " Checked." * (i % 3)),
        )
        examples.append(Example(id=f"ex{i}", messages=messages, answer=str(a + b)))
    multi = (
        Message("system", "Be brief."),
        Message("user", "2*3?"),
        Message("assistant", "6"),
        Message("user", "and 2*4?"),
        Message("assistant", "8"),
    )
    examples.append(Example(id="multi", messages=multi, answer="8"))
    return examples


def make_teacher(seed: int = 0) -> DecoderLM:
    teacher = DecoderLM(ModelConfig.preset("tiny", TOKENIZER.vocab_size))
    init_weights(teacher, seed=seed)
    return teacher.eval()


def teacher_logits(teacher: DecoderLM, ids: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return teacher(torch.tensor(ids)).float()  # [T, V]


# ---------------------------------------------------------------------------------------------
# From logits to targets


def test_rows_to_targets_matches_definitions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=gen) * 3
    logits[2, 7] = float("-inf")  # an impossible token
    labels = torch.randint(50, (9,), generator=gen)
    out = rows_to_targets(logits, labels, k=5, temperature=2.0)
    top = logits.topk(5, dim=1)
    assert torch.equal(out.topk_ids, top.indices.int())
    assert torch.equal(out.topk_logits, top.values)
    torch.testing.assert_close(out.lse, torch.logsumexp(logits / 2.0, dim=1))
    torch.testing.assert_close(out.label_logit, logits[torch.arange(9), labels])
    assert out.sampled_ids is None and out.sampled_counts is None


def test_rows_to_targets_lse_over_a_wide_logit_range_and_in_place():
    """Logits spread over hundreds of nats (most exps below fp32's normal range) still give the
    float64 logsumexp; ``overwrite`` changes nothing but the input."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3000, generator=gen) * 60
    labels = torch.randint(3000, (6,), generator=gen)
    kept = rows_to_targets(logits, labels, k=3, temperature=0.7)
    exact = torch.logsumexp(logits.double() / 0.7, dim=1).float()
    torch.testing.assert_close(kept.lse, exact, rtol=1e-6, atol=1e-5)
    scratch = logits.clone()
    reused = rows_to_targets(scratch, labels, k=3, temperature=0.7, overwrite=True)
    assert not torch.equal(scratch, logits)
    for a, b in zip(vars(kept).values(), vars(reused).values(), strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    sampled = rows_to_targets(
        logits, labels, k=3, temperature=0.7, draws=4, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(sampled.sampled_counts.sum(1), torch.full((6,), 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="generator"):
        rows_to_targets(logits, labels, k=3, temperature=1.0, draws=2)


@pytest.mark.parametrize(
    ("k", "labels", "message"),
    [
        (0, [1], "k must be"),
        (51, [1], "k must be"),
        (3, [50], "labels must be"),
        (3, [1, 2], "labels must be"),
    ],
)
def test_rows_to_targets_rejects_bad_input(k, labels, message):
    with pytest.raises(ValueError, match=message):
        rows_to_targets(torch.zeros(1, 50), torch.tensor(labels), k=k, temperature=1.0)


def test_sample_counts_distinct_ids_counts_and_frequencies():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]])
    probs = probs.repeat(2000, 1)  # 4000 rows, draws per row 8
    ids, counts = sample_counts(probs, 8, torch.Generator().manual_seed(3))
    assert ids.shape == counts.shape == (4000, 8)
    assert torch.equal(counts.sum(1), torch.full((4000,), 8, dtype=torch.int32))
    real = ids >= 0
    assert torch.equal(real, counts > 0)
    for row_ids, row_real in zip(ids[:50], real[:50], strict=True):  # distinct, increasing
        kept = row_ids[row_real]
        assert torch.all(kept[1:] > kept[:-1])
    assert torch.all(ids[1::2, 0] == 3) and torch.all(counts[1::2, 0] == 8)
    frequency = torch.zeros(4)
    frequency.index_add_(0, ids[0::2][real[0::2]].long(), counts[0::2][real[0::2]].float())
    torch.testing.assert_close(frequency / frequency.sum(), probs[0], atol=0.01, rtol=0)
    again = sample_counts(probs, 8, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], ids) and torch.equal(again[1], counts)


# ---------------------------------------------------------------------------------------------
# Which teacher positions answer for which student rows


def test_teacher_sequence_without_conditioning_is_the_student_sequence():
    ex = make_examples()[3]
    seq = teacher_sequence(ex, TOKENIZER, TEMPLATE)
    student = tokenize_example(ex, TOKENIZER, TEMPLATE)
    assert seq.teacher_ids == student.input_ids
    assert list(seq.rows) == [
        t for t in range(len(student.input_ids) - 1) if student.supervised[t + 1]
    ]
    assert all(seq.teacher_ids[r + 1] == y for r, y in zip(seq.rows, seq.labels, strict=True))


@pytest.mark.parametrize("index", [0, 5, 7])
def test_label_conditioned_sequence_holds_the_answer_and_keeps_the_targets(index):
    ex = make_examples()[index]
    plain = teacher_sequence(ex, TOKENIZER, TEMPLATE)
    conditioned = teacher_sequence(
        ex, TOKENIZER, TEMPLATE, condition_template=" [answer: {answer}]"
    )
    assert f"[answer: {ex.answer}]" in TOKENIZER.decode(conditioned.teacher_ids)
    assert len(conditioned.teacher_ids) == len(plain.teacher_ids) + len(f" [answer: {ex.answer}]")
    assert conditioned.labels == plain.labels
    ids = conditioned.teacher_ids
    assert all(ids[r + 1] == y for r, y in zip(conditioned.rows, conditioned.labels, strict=True))


def test_condition_on_answer_errors():
    no_answer = Example(id="x", messages=make_examples()[0].messages)
    with pytest.raises(ValueError, match="no 'answer'"):
        condition_on_answer(no_answer, "{answer}")
    no_user = Example(
        id="y", messages=(Message("system", "s"), Message("assistant", "a")), answer="1"
    )
    with pytest.raises(ValueError, match="no user message"):
        condition_on_answer(no_user, "{answer}")


def test_scoring_config_validation():
    for bad in ({"k": 0}, {"temperature": 0.0}, {"sampled_draws": -1}, {"batch_tokens": 0}):
        with pytest.raises(ValueError):
            ScoringConfig(**bad)
    with pytest.raises(ValueError, match="answer"):
        ScoringConfig(label_conditioned=True, condition_template="no placeholder")
    with pytest.raises(ValueError, match="value_dtype applies to codec v1 only"):
        ScoringConfig(value_dtype="fp32")
    with pytest.raises(ValueError, match="value_bits and id_coding apply to codec v2 only"):
        ScoringConfig(codec="v1", value_bits=8)
    with pytest.raises(ValueError, match="codec must be one of"):
        ScoringConfig(codec="zstd")


def test_default_scoring_writes_v2_close_to_the_teacher(tmp_path):
    """The default codec (v2, 6-bit values): the teacher's top-K ids as a set, the log-partition
    exact, each top-K probability within 6% of the teacher's (most within 1%), the top-K mass
    to fp32."""
    teacher, examples = make_teacher(), make_examples()
    config = ScoringConfig(k=6, temperature=1.5, batch_tokens=100, shard_tokens=20)
    score_to_cache(teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "c", config)
    reader = CacheReader(tmp_path / "c")
    assert reader.manifest.spec.codec == "v2" and reader.manifest.spec.value_bits == 6
    for index, ex in enumerate(examples):
        seq = teacher_sequence(ex, TOKENIZER, TEMPLATE)
        logits = teacher_logits(teacher, seq.teacher_ids)[list(seq.rows)]
        target = reader.topk_target([index])
        top = logits.topk(6, dim=1)
        ids, order = top.indices.sort(dim=1)
        assert torch.equal(target.ids, ids.int())
        lse = torch.logsumexp(logits / 1.5, 1)
        torch.testing.assert_close(target.lse, lse)
        p = (top.values.gather(1, order) / 1.5 - lse[:, None]).exp()
        q = (target.logits / 1.5 - target.lse[:, None]).exp()
        torch.testing.assert_close(q.sum(1), p.sum(1), rtol=1e-5, atol=1e-6)
        assert ((q / p - 1).abs() <= 0.06).all()


# ---------------------------------------------------------------------------------------------
# End to end: teacher -> cache -> reader -> loss


@pytest.mark.parametrize("label_conditioned", [False, True])
def test_cache_holds_what_the_teacher_forward_says(tmp_path, label_conditioned):
    teacher, examples = make_teacher(), make_examples()
    config = ScoringConfig(
        k=6,
        temperature=1.5,
        codec="v1",  # exact fp32 values; v2 below
        value_dtype="fp32",
        label_conditioned=label_conditioned,
        batch_tokens=100,  # several packed passes, one sequence longer than a pass
        shard_tokens=20,
    )
    report = score_to_cache(teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "c", config)
    assert report.sequences == len(examples) and report.manifest is not None
    reader = CacheReader(tmp_path / "c")
    condition = config.condition_template if label_conditioned else None
    for index, ex in enumerate(examples):
        seq = teacher_sequence(ex, TOKENIZER, TEMPLATE, condition_template=condition)
        logits = teacher_logits(teacher, seq.teacher_ids)[list(seq.rows)]
        target = reader.topk_target([index])
        top = logits.topk(6, dim=1)
        assert torch.equal(target.ids, top.indices.int())
        torch.testing.assert_close(target.logits, top.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target.lse, torch.logsumexp(logits / 1.5, 1))
        label = logits[torch.arange(len(seq.rows)), torch.tensor(seq.labels)]
        torch.testing.assert_close(target.label_logit, label, rtol=1e-5, atol=1e-5)
        assert target.temperature == 1.5
    assert reader.manifest.spec.label_conditioned == label_conditioned
    assert reader.manifest.spec.teacher_fingerprint == teacher.weights_fingerprint()


def test_packed_batch_trains_from_the_cache(tmp_path):
    """The student's packed batch and the cache line up row for row, and the loss equals the
    reference loss on the same rows."""
    teacher, examples = make_teacher(0), make_examples()
    score_to_cache(
        teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "c", ScoringConfig(k=8, sampled_draws=5)
    )
    reader = CacheReader(tmp_path / "c")
    reader.check_compatible(
        tokenizer_fingerprint=TOKENIZER.fingerprint(), vocab_size=TOKENIZER.vocab_size
    )
    student = DecoderLM(ModelConfig.preset("tiny", TOKENIZER.vocab_size))
    init_weights(student, seed=1)
    tokenized = [tokenize_example(ex, TOKENIZER, TEMPLATE) for ex in examples]
    batches = pack_examples(tokenized, 128, order="best_fit", seed=0)
    assert len(batches) > 1
    for batch in batches:
        hidden = student.hidden_states(batch.input_ids, batch.cu_seqlens)
        rows = batch.labels != -100
        for kind in ("topk", "sampled"):
            target = reader.targets_for_batch(batch.example_ids, batch.supervised_counts, kind)
            assert target.ids.shape[0] == int(rows.sum())
            args = (hidden[rows], student.output_weight, batch.labels[rows], target)
            loss = fused_linear_sparse_kd(*args, kd_weight=0.5)
            expected, _ = sparse_kd_reference(*args, kd_weight=0.5)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_other_tokenizer_is_refused(tmp_path):
    score_to_cache(
        make_teacher(), TOKENIZER, TEMPLATE, make_examples(2), tmp_path / "c", ScoringConfig(k=4)
    )
    reader = CacheReader(tmp_path / "c")
    with pytest.raises(CacheError, match="tokenizer"):
        reader.check_compatible(tokenizer_fingerprint="0" * 64, vocab_size=TOKENIZER.vocab_size)
    with pytest.raises(CacheError, match="vocab"):
        reader.check_compatible(tokenizer_fingerprint=TOKENIZER.fingerprint(), vocab_size=999)


def test_rescoring_a_finished_cache_does_nothing(tmp_path):
    teacher, examples = make_teacher(), make_examples(3)
    score_to_cache(teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "c", ScoringConfig(k=4))
    manifest = (tmp_path / "c" / "manifest.json").read_bytes()
    again = score_to_cache(
        teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "c", ScoringConfig(k=4)
    )
    assert again.sequences == 0
    assert (tmp_path / "c" / "manifest.json").read_bytes() == manifest
    with pytest.raises(CacheError):  # same directory, different cache spec
        score_to_cache(teacher, TOKENIZER, TEMPLATE, examples, tmp_path / "c", ScoringConfig(k=5))


# ---------------------------------------------------------------------------------------------
# Killed and resumed; torchrun


def _cache_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _write_inputs(tmp_path: Path, n: int = 24) -> tuple[Path, Path]:
    teacher_dir, data = tmp_path / "teacher", tmp_path / "data.jsonl"
    save_pretrained(make_teacher(), teacher_dir)
    examples = [
        Example(
            id=f"s{i}",
            messages=(
                Message("user", f"q{i} " * (1 + i % 4)),
                Message("assistant", f"a{i} " * (2 + i % 5)),
            ),
            answer=str(i),
        )
        for i in range(n)
    ]
    write_jsonl(data, examples)
    return teacher_dir, data


def _cli(teacher_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        "--teacher", str(teacher_dir), "--data", str(data), "--out", str(out),
        "--k", "5", "--sampled-draws", "3", "--label-conditioned",
        "--batch-tokens", "64", "--shard-tokens", "16",
    ]  # fmt: skip


def test_scoring_killed_mid_run_resumes_to_the_same_cache(tmp_path):
    teacher_dir, data = _write_inputs(tmp_path)
    from pangu_fastkd.scoring.__main__ import main

    assert main(_cli(teacher_dir, data, tmp_path / "whole")) == 0
    # The same command in a subprocess whose writer is slowed down, killed by SIGKILL once it
    # has committed a shard, then run again to completion.
    slow = textwrap.dedent(
        """
        import sys, time
        from pangu_fastkd.cache import CacheWriter
        from pangu_fastkd.scoring.__main__ import main
        add = CacheWriter.add
        def slow_add(self, scores):
            time.sleep(0.05)
            return add(self, scores)
        CacheWriter.add = slow_add
        sys.exit(main(sys.argv[1:]))
        """
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", slow, *_cli(teacher_dir, data, out)])
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.safetensors")):
            assert proc.poll() is None, "the scoring run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    assert main(_cli(teacher_dir, data, out)) == 0
    assert _cache_files(out) == _cache_files(tmp_path / "whole")


def test_torchrun_two_ranks_match_one_process(tmp_path):
    teacher_dir, data = _write_inputs(tmp_path, n=10)
    from pangu_fastkd.scoring.__main__ import main

    assert main(_cli(teacher_dir, data, tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pangu_fastkd.scoring",
        *_cli(teacher_dir, data, tmp_path / "two"),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 1: scored" in done.stdout and "rank 0: scored" in done.stdout
    one, two = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "two")
    assert two.manifest.world_size == 2
    assert {s.rank for s in two.manifest.shards} == {0, 1}
    every = list(range(10))
    for kind in ("topk", "sampled"):
        a = one.topk_target(every) if kind == "topk" else one.sampled_target(every)
        b = two.topk_target(every) if kind == "topk" else two.sampled_target(every)
        # Ranks pack different batches, so the teacher's GEMMs see other row counts: float
        # values may differ in the last bits (then in bf16 rounding), ids and draws may not.
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)
            elif isinstance(x, torch.Tensor):
                assert torch.equal(x, y)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    teacher_dir, _ = _write_inputs(tmp_path, n=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    cmd = [sys.executable, "-m", "pangu_fastkd.scoring", *_cli(teacher_dir, bad, tmp_path / "c")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("scoring error:") and "bad.jsonl:1" in done.stderr
    assert "Traceback" not in done.stderr
    json.loads((teacher_dir / "config.json").read_text())  # inputs untouched


class _EchoTeacher:
    """A teacher whose greedy next token is always the current token: it agrees with the
    reference exactly where a token repeats ("ee" in "Checked", "11"), which the test can count
    from the sequences alone."""

    training = False
    output_bias = None
    logit_softcap = None

    def __init__(self, vocab_size: int):
        self.output_weight = torch.eye(vocab_size)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def hidden_states(self, input_ids, cu_seqlens):
        return torch.nn.functional.one_hot(input_ids, self.output_weight.shape[0]).float()


@pytest.mark.parametrize("condition", [None, "\n\n(The reference answer is {answer}.)"])
def test_reference_agreement_counts_the_teachers_greedy_hits(condition):
    teacher = _EchoTeacher(TOKENIZER.vocab_size)
    examples = make_examples()
    agree = total = whole = 0
    for ex in examples:
        seq = teacher_sequence(ex, TOKENIZER, TEMPLATE, condition_template=condition)
        hits = [seq.teacher_ids[r] == label for r, label in zip(seq.rows, seq.labels, strict=True)]
        agree, total, whole = agree + sum(hits), total + len(hits), whole + all(hits)
    # Several sequences packed per forward, in small batches: the same hits.
    rate = reference_agreement(
        teacher, TOKENIZER, TEMPLATE, examples, condition_template=condition, batch_tokens=90
    )
    assert 0 < agree < total and rate.tokens == agree / total
    assert rate.sequences == whole / len(examples)
    assert reference_agreement(teacher, TOKENIZER, TEMPLATE, []) == Agreement(0.0, 0.0)
