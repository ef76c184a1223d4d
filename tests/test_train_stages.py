"""Each config table checks itself, and the loss module takes the sparse-KD options from ops."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.data.packing import PackedBatch
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights
from pangu_fastkd.ops import SparseKDOptions, TopKTarget, fused_linear_sparse_kd
from pangu_fastkd.train.config import ConfigError
from pangu_fastkd.train.loop import LossModule
from pangu_fastkd.train.specs import DataSpec, ModelSpec, OptimSpec, TrainSpec
from pangu_fastkd.train.stages import KDStage, RolloutStage, ScoreStage, SFTStage

SCORE = ScoreStage(name="score", data="train_fast", teacher="t", temperature=2.0)
ROLLOUT = RolloutStage(name="roll", data="train_fast")
SFT = SFTStage(name="sft", data="train_fast")
EARLIER = {s.name: s for s in (SFT, ROLLOUT, SCORE)}


def _raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


# ---------------------------------------------------------------------------------------------
# Stages


def test_valid_stages_pass_with_their_references():
    SFTStage(name="a", data="roll", start_from="sft").validate("s", EARLIER, ["t"])
    KDStage(name="k", cache="score", temperature=2.0).validate("s", EARLIER, ["t"])
    KDStage(name="k", cache="score", missing_mass="renorm").validate("s", EARLIER, ["t"])
    RolloutStage(name="r", data="train_reasoning", start_from="init").validate("s", {}, [])
    ScoreStage(name="c", data="roll", teacher="t").validate("s", EARLIER, ["t"])


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (SFTStage(name="a", data="later"), "w.data: 'later' is neither a split"),
        (SFTStage(name="a", data="score"), "w.data: 'score' is neither a split"),
        (SFTStage(name="a", data="train_fast", start_from="roll"), "w.start_from: 'roll' is not"),
        (
            SFTStage(name="a", data="train_fast", train=TrainSpec(grad_accum=0)),
            "w.train.grad_accum must be >= 1, got 0",
        ),
        (KDStage(name="k", cache="sft"), "w.cache: 'sft' is not an earlier score stage"),
        (KDStage(name="k", cache="score", divergence="tvd"), "w.divergence must be one of"),
        (KDStage(name="k", cache="score", missing_mass="x"), "w.missing_mass must be one of"),
        (KDStage(name="k", cache="score", target="all"), "w.target must be 'topk' or 'sampled'"),
        (
            KDStage(name="k", cache="score", temperature=2.0, kd_weight=2.0),
            "w.kd_weight must be in [0, 1], got 2.0",
        ),
        (
            KDStage(name="k", cache="score", missing_mass="renorm", temperature=0.0),
            "w.temperature must be > 0, got 0.0",
        ),
        (
            KDStage(name="k", cache="score", temperature=2.0, target="sampled"),
            "w: target 'sampled' needs sampled_draws in 'score'",
        ),
        (KDStage(name="k", cache="score"), "w: missing_mass 'tail' needs the KD temperature"),
        (
            RolloutStage(name="r", data="train_fast", samples_per_prompt=0),
            "w.samples_per_prompt must be >= 1",
        ),
        (RolloutStage(name="r", data="roll2"), "w.data: 'roll2' is neither a split"),
        (ScoreStage(name="c", data="train_fast", teacher="ghost"), "w.teacher: no teacher"),
        (ScoreStage(name="c", data="train_fast", teacher="t", k=0), "w.k must be >= 1, got 0"),
        (
            RolloutStage(name="r", data="train_fast", max_prompts=-1),
            "w.max_prompts must be >= 0 (0: all), got -1",
        ),
        (
            ScoreStage(name="c", data="train_fast", teacher="t", max_examples=-2),
            "w.max_examples must be >= 0 (0: all), got -2",
        ),
    ],
)
def test_each_stage_names_its_bad_value(stage, message):
    with _raises(message):
        stage.validate("w", EARLIER, ["t"])


# ---------------------------------------------------------------------------------------------
# Models, training and data tables


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (TrainSpec(steps=-1), "x.steps must be >= 0"),
        (TrainSpec(batch_tokens=4), "x.batch_tokens must be >= 8, got 4"),
        (TrainSpec(schedule="random"), "x.schedule: 'random' is not one of"),
        (TrainSpec(difficulty="hard"), "x.difficulty must be 'given' or 'length'"),
        (TrainSpec(optim=OptimSpec(lr=0.0)), "x.optim.lr must be > 0, got 0.0"),
    ],
)
def test_train_spec_names_its_bad_value(train, message):
    with _raises(message):
        train.validate("x")


def test_model_spec_checks_itself_and_trains_with_defaults_when_asked():
    spec = ModelSpec(preset="tiny", train_on=["train_fast"])
    assert spec.train == TrainSpec()  # a teacher trained here without a [train] table
    spec.validate("t")
    with _raises("t: give exactly one of 'preset' and 'path'"):
        ModelSpec(preset="tiny", path="/m").validate("t")
    with _raises("t.backend: presets are always embedded models"):
        ModelSpec(preset="tiny", backend="transformers").validate("t")
    with _raises("t.train_on: 'eval' is not in"):
        ModelSpec(preset="tiny", train_on=["eval"]).validate("t")
    with _raises("t.train.optim.lr must be > 0"):
        ModelSpec(preset="tiny", train=TrainSpec(optim=OptimSpec(lr=-1.0))).validate("t")


def test_data_spec_checks_itself():
    DataSpec().validate(student_has_path=False)
    with _raises("data.tokenizer = 'student' needs a student with a 'path'"):
        DataSpec(tokenizer="student").validate(student_has_path=False)
    DataSpec(tokenizer="student").validate(student_has_path=True)
    with _raises("data.source = 'files' needs data.train_fast"):
        DataSpec(source="files").validate(student_has_path=False)
    with _raises("data.chat_template_kwargs: only a directory's own template"):
        DataSpec(chat_template="default", chat_template_kwargs={"x": 1}).validate(False)


# ---------------------------------------------------------------------------------------------
# SparseKDOptions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kd_weight": 1.5}, "kd_weight must be in [0, 1], got 1.5"),
        ({"beta": -0.1}, "beta must be in [0, 1], got -0.1"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": float("inf")}, "temperature must be > 0, got inf"),
        ({"z_loss": float("nan")}, "z_loss must be >= 0, got nan"),
        ({"divergence": "tvd"}, "divergence must be one of"),
        ({"missing_mass": "drop"}, "missing_mass must be one of"),
    ],
)
def test_sparse_kd_options_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SparseKDOptions(**kwargs)


def test_sparse_kd_options_are_frozen_and_are_the_ops_keywords():
    options = SparseKDOptions(kd_weight=0.5, divergence="jsd", beta=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.kd_weight = 1.0  # type: ignore[misc]
    assert options.as_kwargs() == {
        "kd_weight": 0.5,
        "divergence": "jsd",
        "beta": 0.3,
        "temperature": 1.0,
        "missing_mass": "tail",
        "include_label": None,
        "z_loss": 0.0,
    }
    stage = KDStage(name="k", cache="c", kd_weight=0.4, divergence="reverse_kl", temperature=2.0)
    assert stage.loss_options() == SparseKDOptions(
        kd_weight=0.4, divergence="reverse_kl", temperature=2.0
    )


def _batch(vocab: int) -> PackedBatch:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 7, 4]
    T = sum(lengths)
    input_ids = torch.randint(0, vocab, (T,), generator=gen)
    labels = torch.full((T,), -100, dtype=torch.long)
    cu = cu_seqlens_from_lengths(lengths)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        labels[start + 1 : end - 1] = input_ids[start + 2 : end]
    positions = torch.cat([torch.arange(n) for n in lengths])
    return PackedBatch(input_ids, labels, cu, positions, ("a", "b", "c"))


def test_loss_module_uses_every_option_it_is_given():
    vocab, K = 40, 6
    model = DecoderLM(ModelConfig.preset("tiny", vocab))
    init_weights(model, seed=2)
    batch = _batch(vocab)
    N = int((batch.labels != -100).sum())
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:K] for _ in range(N)])
    logits = torch.randn(N, K, generator=gen)
    lse = torch.logsumexp(logits, -1) + 0.5
    target = TopKTarget(ids, logits, lse, torch.randn(N, generator=gen), temperature=1.0)
    options = SparseKDOptions(kd_weight=0.6, divergence="jsd", beta=0.2, z_loss=1e-3)
    loss = LossModule(model, options)(batch, target, 11.0)
    hidden = model.hidden_states(batch.input_ids, batch.cu_seqlens)[batch.labels != -100]
    expected = fused_linear_sparse_kd(
        hidden,
        model.output_weight,
        batch.labels[batch.labels != -100],
        target,
        kd_weight=0.6,
        divergence="jsd",
        beta=0.2,
        z_loss=1e-3,
        reduction="sum",
        num_items=11.0,
    )
    assert torch.equal(loss, expected)
    other = LossModule(model, SparseKDOptions(kd_weight=0.6, divergence="jsd"))(batch, target, 11)
    assert not torch.equal(loss, other)  # beta and z_loss reached the op
