"""How often the teacher's top-1 is the reference's next token: what label conditioning adds.

Teacher-forced on the reference responses themselves, a teacher scored without the answer in
its context is right as often as it can compute; with the answer in its context (the
label-conditioned template) it can also copy it. The two rates side by side say how much of a
label-conditioned cache is the teacher's own knowledge and how much an echo of the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backends import CausalLM, head_parts
from ..data import ChatRenderer, Example, Tokenizer
from ..data.boundaries import cu_seqlens_from_lengths
from .run import head_logits, teacher_batches
from .sequences import teacher_sequence

__all__ = ["reference_agreement"]

_ROW_CHUNK = 256  # logits rows at a time: [256, V] stays small for a 150k vocabulary


@torch.inference_mode()
def reference_agreement(
    teacher: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    *,
    condition_template: str | None = None,
    batch_tokens: int = 4096,
) -> float:
    """Share of the reference responses' tokens that are the teacher's greedy next token.

    Args:
        teacher: the scoring model.
        examples: examples with reference responses (their assistant turns are the tokens
            checked), e.g. the ground-truth split a rollout stage answered.
        condition_template: None for plain teacher forcing, else the label-conditioned
            template (``{answer}`` filled from each example).
        batch_tokens: teacher tokens per forward.

    Returns:
        A fraction in [0, 1] over every supervised token of ``examples`` (0 without any).
    """
    seqs = [
        teacher_sequence(ex, tokenizer, template, condition_template=condition_template)
        for ex in examples
    ]
    weight, bias, softcap = head_parts(teacher)
    was_training = teacher.training
    teacher.eval()
    agree = total = 0
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
            for start in range(0, len(rows), _ROW_CHUNK):
                chunk = rows[start : start + _ROW_CHUNK]
                logits = head_logits(hidden[chunk], weight, bias, softcap)
                top1 = logits.argmax(dim=-1)
                agree += int((top1 == labels[start : start + _ROW_CHUNK]).sum())
            total += len(rows)
    finally:
        teacher.train(was_training)
    return agree / total if total else 0.0
