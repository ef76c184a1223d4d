"""End-of-stage evaluation: held-out loss and exact-match accuracy of greedy answers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends import CausalLM, generate, head_parts
from ..data import ChatRenderer, Example, Tokenizer, pack_examples, tokenize_example
from ..data.demo_curriculum import extract_answer
from ..model import GenerationConfig
from ..ops import fused_linear_cross_entropy
from .config import EvalSpec

__all__ = [
    "answer_matches",
    "answer_outcomes",
    "eval_loss",
    "evaluate",
    "exact_match_accuracy",
    "outcome_string",
    "parse_outcomes",
]


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match of the final answer: the number after the last "Answer:" when the text has
    one (the demo's format), else the whole stripped response."""
    found = extract_answer(generated)
    if found is not None:
        return found == answer.strip()
    return generated.strip() == answer.strip()


@torch.no_grad()
def eval_loss(
    model: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    batch_tokens: int,
) -> float:
    """Mean cross-entropy per supervised token of ``examples`` (teacher-forced)."""
    tokenized = [tokenize_example(ex, tokenizer, template) for ex in examples]
    budget = max(batch_tokens, max(len(t.input_ids) for t in tokenized))
    total, count = 0.0, 0
    for batch in pack_examples(tokenized, budget):
        hidden = model.hidden_states(batch.input_ids, batch.cu_seqlens)
        rows = batch.labels != -100
        weight, bias, softcap = head_parts(model)
        loss = fused_linear_cross_entropy(
            hidden[rows].to(weight.dtype),
            weight,
            batch.labels[rows],
            bias=bias,
            softcap=softcap,
            reduction="sum",
        )
        total += float(loss)
        count += int(rows.sum())
    return total / max(count, 1)


@torch.no_grad()
def answer_outcomes(
    model: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    spec: EvalSpec,
) -> list[bool]:
    """For each of ``examples``, whether its greedy response has the reference ``answer``."""
    prompts = [
        template.render(ex.prompt_messages, tokenizer, add_generation_prompt=True)[0]
        for ex in examples
    ]
    config = GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        temperature=0.0,
        stop_token_ids=tuple(template.stop_ids(tokenizer)),
    )
    outputs = generate(model, prompts, config, batch_size=spec.batch_size)
    outcomes = []
    for ex, out in zip(examples, outputs, strict=True):
        tokens = out.tokens[:-1] if out.stopped else out.tokens
        outcomes.append(answer_matches(tokenizer.decode(tokens), ex.answer or ""))
    return outcomes


def exact_match_accuracy(
    model: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    spec: EvalSpec,
) -> float:
    """Fraction of ``examples`` whose greedy response has the reference ``answer``."""
    outcomes = answer_outcomes(model, tokenizer, template, examples, spec)
    return sum(outcomes) / max(len(outcomes), 1)


def outcome_string(outcomes: Sequence[bool]) -> str:
    """Per-problem outcomes as a string of ``1`` (right) and ``0`` (wrong), in problem order:
    what the eval row keeps so that two stages can be compared problem by problem."""
    return "".join("1" if ok else "0" for ok in outcomes)


def parse_outcomes(text: str) -> list[bool]:
    """The inverse of ``outcome_string``."""
    if not isinstance(text, str) or set(text) - {"0", "1"}:
        raise ValueError("per-problem outcomes must be a string of 0 and 1")
    return [c == "1" for c in text]


def evaluate(
    model: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    eval_sets: dict[str, Sequence[Example]],
    spec: EvalSpec,
) -> dict[str, float | str | None]:
    """For each mode ("reasoning", "fast"): ``loss_<mode>``, ``acc_<mode>`` and
    ``correct_<mode>`` (``outcome_string`` of the problems in eval order); None without data."""
    was_training = model.training
    model.eval()
    results: dict[str, float | str | None] = {}
    try:
        for mode in ("reasoning", "fast"):
            examples = list(eval_sets.get(mode, ()))[: spec.max_examples]
            if not examples:
                for key in ("loss", "acc", "correct"):
                    results[f"{key}_{mode}"] = None
                continue
            results[f"loss_{mode}"] = eval_loss(
                model, tokenizer, template, examples, spec.batch_tokens
            )
            outcomes = answer_outcomes(model, tokenizer, template, examples, spec)
            results[f"acc_{mode}"] = sum(outcomes) / len(outcomes)
            results[f"correct_{mode}"] = outcome_string(outcomes)
    finally:
        model.train(was_training)
    return results
