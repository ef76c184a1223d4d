"""How often the teacher's top-1 is the reference's next token: what label conditioning adds.

Teacher-forced on the reference responses themselves, a teacher scored without the answer in
its context is right as often as it can compute; with the answer in its context (the
label-conditioned template) it can also copy it. The two rates side by side say how much of a
label-conditioned cache is the teacher's own knowledge and how much an echo of the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..backends import CausalLM, head_parts
from ..data import ChatRenderer, Example, Tokenizer
from ..data.boundaries import cu_seqlens_from_lengths
from .run import head_logits, teacher_batches
from .sequences import teacher_sequence

__all__ = ["Agreement", "reference_agreement"]

_ROW_CHUNK = 256  # logits rows at a time: [256, V] stays small for a 150k vocabulary


@dataclass(frozen=True)
class Agreement:
    """Attributes:
    tokens: share of the reference tokens that are the teacher's greedy next token.
    sequences: share of the references whose every token is (the teacher, teacher-forced,
        would write the whole reference response: for a short answer, its exact match).
    """

    tokens: float
    sequences: float


@torch.inference_mode()
def reference_agreement(
    teacher: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    *,
    condition_template: str | None = None,
    batch_tokens: int = 4096,
) -> Agreement:
    """How often the teacher's greedy next token is the reference's, per token and per
    whole response.

    Args:
        teacher: the scoring model.
        examples: examples with reference responses (their assistant turns are the tokens
            checked), e.g. the ground-truth split a rollout stage answered.
        condition_template: None for plain teacher forcing, else the label-conditioned
            template (``{answer}`` filled from each example).
        batch_tokens: teacher tokens per forward.

    Returns:
        Both shares in [0, 1] (0 without examples).
    """
    seqs = [
        teacher_sequence(ex, tokenizer, template, condition_template=condition_template)
        for ex in examples
    ]
    weight, bias, softcap = head_parts(teacher)
    was_training = teacher.training
    teacher.eval()
    agree = total = whole = 0
    try:
        for batch in teacher_batches(seqs, range(len(seqs)), batch_tokens):
            lengths = [len(seqs[i].teacher_ids) for i in batch]
            ids = torch.tensor([t for i in batch for t in seqs[i].teacher_ids], dtype=torch.long)
            hidden = teacher.hidden_states(ids, cu_seqlens_from_lengths(lengths))
            offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0).tolist()
            rows = torch.tensor(
                [r + off for i, off in zip(batch, offsets, strict=True) for r in seqs[i].rows],
                dtype=torch.long,
            )
            labels = torch.tensor([t for i in batch for t in seqs[i].labels], dtype=torch.long)
            hits = torch.cat(
                [
                    head_logits(hidden[rows[i : i + _ROW_CHUNK]], weight, bias, softcap).argmax(-1)
                    == labels[i : i + _ROW_CHUNK]
                    for i in range(0, len(rows), _ROW_CHUNK)
                ]
            )
            agree += int(hits.sum())
            total += len(rows)
            counts = [len(seqs[i].rows) for i in batch]
            whole += sum(bool(part.all()) for part in hits.split(counts))
    finally:
        teacher.train(was_training)
    if not seqs:
        return Agreement(0.0, 0.0)
    return Agreement(agree / total if total else 0.0, whole / len(seqs))
