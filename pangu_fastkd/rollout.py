"""On-policy rollouts, offline: the current student answers a stage's prompts once.

The responses become the sequences the teacher scores (``pangu_fastkd.scoring``), so the student
later learns on its own distribution of prefixes. Each record keeps its provenance: the model's
weight fingerprint, the sampling settings and seed, and the id of the prompt it answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .backends import CausalLM, generate
from .data import ChatRenderer, Example, Message, Tokenizer, write_jsonl
from .model import GenerationConfig

__all__ = ["Rollout", "generate_rollouts", "rollout_record", "write_rollouts"]


@dataclass(frozen=True)
class Rollout:
    """One generated response.

    Attributes:
        example: the prompt's example with its assistant turn replaced by the response (id
            ``<source id>/rollout-<sample>``).
        source_id: the prompt's example id.
        stopped: True when a stop token ended the response, False when max_new_tokens did.
        provenance: model fingerprint, generation settings and seed.
    """

    example: Example
    source_id: str
    stopped: bool
    provenance: dict


def generate_rollouts(
    model: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    generation: GenerationConfig,
    *,
    samples_per_prompt: int = 1,
    batch_size: int = 16,
) -> list[Rollout]:
    """The model's responses to the prompts of ``examples``.

    Args:
        model: the student, embedded or transformers (generation runs without gradients, in
            eval mode).
        tokenizer, template: how prompts are rendered and responses decoded.
        examples: prompts are everything before each example's last assistant turn.
        generation: sampling settings; sample ``j`` of every prompt uses seed
            ``generation.seed + j``. Stop tokens default to the tokenizer's end-of-turn and
            end-of-sequence tokens when the config names none.
        samples_per_prompt: responses per prompt.
        batch_size: prompts decoded together.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
    if not generation.stop_token_ids:
        generation = replace(generation, stop_token_ids=tuple(template.stop_ids(tokenizer)))
    prompts = [
        template.render(ex.prompt_messages, tokenizer, add_generation_prompt=True)[0]
        for ex in examples
    ]
    fingerprint = model.weights_fingerprint()
    was_training = model.training
    model.eval()
    rollouts: list[Rollout] = []
    try:
        for sample in range(samples_per_prompt):
            config = replace(generation, seed=generation.seed + sample)
            outputs = generate(model, prompts, config, batch_size=batch_size)
            for ex, out in zip(examples, outputs, strict=True):
                tokens = out.tokens[:-1] if out.stopped else out.tokens
                response = Message(role="assistant", content=tokenizer.decode(tokens))
                rollout_example = replace(
                    ex,
                    id=f"{ex.id}/rollout-{sample}",
                    messages=(*ex.prompt_messages, response),
                )
                provenance = {
                    "model_fingerprint": fingerprint,
                    "generation": asdict(config),
                    "sample": sample,
                }
                rollouts.append(Rollout(rollout_example, ex.id, out.stopped, provenance))
    finally:
        model.train(was_training)
    return rollouts


def rollout_record(rollout: Rollout) -> dict:
    """The JSONL record of a rollout: the example's fields plus ``source_id`` and
    ``provenance``."""
    ex = rollout.example
    record: dict = {
        "id": ex.id,
        "messages": [{"role": m.role, "content": m.content} for m in ex.messages],
        "source_id": rollout.source_id,
        "stopped": rollout.stopped,
        "provenance": rollout.provenance,
    }
    for key in ("mode", "difficulty", "answer"):
        if getattr(ex, key) is not None:
            record[key] = getattr(ex, key)
    return record


def write_rollouts(path: str | Path, rollouts: Sequence[Rollout]) -> None:
    """Writes rollouts as JSONL (atomically) that ``read_jsonl`` reads back as examples."""
    write_jsonl(path, [rollout_record(r) for r in rollouts])
