"""What the teacher reads, and which of its positions answer for each student target.

Teacher-forced scoring runs the teacher over the student's own sequence (ground truth or a
rollout). In label-conditioned mode the teacher's context also holds the reference answer (the
paper's "conditioned on the ground-truth answer"): the template's text is appended to the first
user message, so every later token shifts. The student's targets (assistant tokens) are found
again in the teacher's sequence, token for token, and the cache row of each student target is
the teacher's next-token distribution just before it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..data import ChatRenderer, Example, Message, Tokenizer, tokenize_example

__all__ = [
    "DEFAULT_CONDITION_TEMPLATE",
    "TeacherSequence",
    "condition_on_answer",
    "student_rows",
    "teacher_sequence",
]

DEFAULT_CONDITION_TEMPLATE = "\n\n(The reference answer is {answer}.)"


@dataclass(frozen=True)
class TeacherSequence:
    """One sequence as the teacher scores it.

    Attributes:
        example_id: the student's example id (the cache's sequence id).
        teacher_ids: the tokens the teacher reads.
        rows: teacher positions whose next-token logits are the targets, one per supervised
            student row, in the student's order.
        labels: the student's label token of each row (the token at ``rows[i] + 1`` in the
            teacher sequence).
    """

    example_id: str
    teacher_ids: tuple[int, ...]
    rows: tuple[int, ...]
    labels: tuple[int, ...]


def student_rows(input_ids: tuple[int, ...], supervised: tuple[bool, ...]) -> list[int]:
    """Positions ``t`` whose label ``input_ids[t + 1]`` is supervised: the cache's rows."""
    return [t for t in range(len(input_ids) - 1) if supervised[t + 1]]


def condition_on_answer(example: Example, template: str) -> Example:
    """The example with ``template.format(answer=...)`` appended to its first user message."""
    if example.answer is None:
        raise ValueError(
            f"example {example.id!r} has no 'answer': label-conditioned scoring needs one"
        )
    messages = list(example.messages)
    for i, message in enumerate(messages):
        if message.role == "user":
            hint = template.format(answer=example.answer)
            messages[i] = Message(role="user", content=message.content + hint)
            return replace(example, messages=tuple(messages))
    raise ValueError(f"example {example.id!r} has no user message to condition on")


def teacher_sequence(
    example: Example,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    *,
    condition_template: str | None = None,
) -> TeacherSequence:
    """Tokenizes ``example`` for the teacher and aligns its rows with the student's.

    Args:
        example: the student's sequence (its assistant turns are the targets).
        tokenizer: shared by teacher and student.
        template: the chat template both use.
        condition_template: None for plain teacher forcing; else the text (with ``{answer}``)
            added to the teacher's first user message.
    """
    student = tokenize_example(example, tokenizer, template)
    rows = student_rows(student.input_ids, student.supervised)
    labels = tuple(student.input_ids[t + 1] for t in rows)
    if condition_template is None:
        return TeacherSequence(example.id, student.input_ids, tuple(rows), labels)
    teacher = tokenize_example(
        condition_on_answer(example, condition_template), tokenizer, template
    )
    teacher_rows = student_rows(teacher.input_ids, teacher.supervised)
    teacher_labels = tuple(teacher.input_ids[u + 1] for u in teacher_rows)
    if teacher_labels != labels:
        raise ValueError(
            f"example {example.id!r}: with the reference answer in the context, the assistant "
            "tokens no longer match the student's (the condition template must not change how "
            "the response is tokenized)"
        )
    return TeacherSequence(example.id, teacher.input_ids, tuple(teacher_rows), labels)
