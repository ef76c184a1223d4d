"""On-policy rollouts: the student's responses, their records and provenance."""

from __future__ import annotations

import json

import pytest
import torch

from pangu_fastkd.backends import generate
from pangu_fastkd.data import ByteTokenizer, Example, Message, default_template, read_jsonl
from pangu_fastkd.model import DecoderLM, GenerationConfig, ModelConfig, init_weights
from pangu_fastkd.rollout import generate_rollouts, rollout_record, write_rollouts

TOKENIZER = ByteTokenizer()
TEMPLATE = default_template(TOKENIZER)


def make_student(seed: int = 0) -> DecoderLM:
    model = DecoderLM(ModelConfig.preset("tiny", TOKENIZER.vocab_size))
    init_weights(model, seed=seed)
    return model


def make_examples() -> list[Example]:
    return [
        Example(
            id=f"p{i}",
            messages=(
                Message("user", f"What is {i} * 3?"),
                Message("assistant", f"{3 * i}"),
            ),
            mode="fast",
            difficulty=float(i),
            answer=str(3 * i),
        )
        for i in range(4)
    ]


def test_greedy_rollouts_are_the_models_own_tokens():
    student, examples = make_student(), make_examples()
    config = GenerationConfig(max_new_tokens=12, temperature=0.0)
    rollouts = generate_rollouts(student, TOKENIZER, TEMPLATE, examples, config, batch_size=3)
    prompts = [
        TEMPLATE.render(ex.prompt_messages, TOKENIZER, add_generation_prompt=True)[0]
        for ex in examples
    ]
    stops = TEMPLATE.stop_ids(TOKENIZER)
    direct = generate(student, prompts, GenerationConfig(12, 0.0, stop_token_ids=stops))
    for ex, rollout, out in zip(examples, rollouts, direct, strict=True):
        tokens = out.tokens[:-1] if out.stopped else out.tokens
        assert rollout.example.messages[-1] == Message("assistant", TOKENIZER.decode(tokens))
        assert rollout.example.messages[:-1] == ex.prompt_messages
        assert rollout.example.id == f"{ex.id}/rollout-0" and rollout.source_id == ex.id
        assert (rollout.example.answer, rollout.example.mode) == (ex.answer, ex.mode)
        assert rollout.stopped == out.stopped
        assert rollout.provenance["model_fingerprint"] == student.weights_fingerprint()
        assert rollout.provenance["generation"]["stop_token_ids"] == stops


def test_samples_use_their_own_seeds_and_are_reproducible():
    student, examples = make_student(1), make_examples()
    config = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=5)
    first = generate_rollouts(student, TOKENIZER, TEMPLATE, examples, config, samples_per_prompt=2)
    again = generate_rollouts(student, TOKENIZER, TEMPLATE, examples, config, samples_per_prompt=2)
    assert [r.example for r in first] == [r.example for r in again]
    assert [r.provenance["generation"]["seed"] for r in first] == [5] * 4 + [6] * 4
    responses = [r.example.messages[-1].content for r in first]
    assert responses[:4] != responses[4:]  # a random tiny model does not repeat itself


def test_records_round_trip_through_jsonl(tmp_path):
    student, examples = make_student(), make_examples()
    config = GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=2)
    rollouts = generate_rollouts(student, TOKENIZER, TEMPLATE, examples, config)
    path = tmp_path / "rollouts.jsonl"
    write_rollouts(path, rollouts)
    assert read_jsonl(path) == [r.example for r in rollouts]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [json.loads(json.dumps(rollout_record(r))) for r in rollouts]
    assert records[0]["provenance"]["generation"]["top_p"] == 0.9
    assert records[0]["source_id"] == "p0"


def test_generation_leaves_the_training_mode_alone():
    student = make_student()
    student.train()
    generate_rollouts(
        student, TOKENIZER, TEMPLATE, make_examples()[:1], GenerationConfig(max_new_tokens=2)
    )
    assert student.training
    assert all(p.grad is None for p in student.parameters())
    with pytest.raises(ValueError, match="samples_per_prompt"):
        generate_rollouts(
            student, TOKENIZER, TEMPLATE, make_examples(), GenerationConfig(), samples_per_prompt=0
        )
    assert torch.is_grad_enabled()
