"""Training records: conversations read from and written to JSONL.

One JSON object per line, in one of two shapes::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "response": "...", "system": "..."}        # system optional

plus the optional keys ``id``, ``mode`` ("reasoning" | "fast" | null), ``difficulty`` (a number)
and ``answer`` (the reference final answer). Other keys are ignored, so datasets can carry
their own metadata. Blank lines are skipped; line numbers in errors count every line. Every
conversation has a user message before its response (or, prompt-only, at all): a turn the model
is asked to answer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durable import atomic_write_text

__all__ = [
    "MODES",
    "ROLES",
    "Example",
    "Message",
    "RecordError",
    "example_to_record",
    "fingerprint_examples",
    "read_jsonl",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")
MODES = ("reasoning", "fast")


class RecordError(ValueError):
    """A JSONL record that cannot be read; the message starts with ``<file>:<line>:``."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation.

    Attributes:
        role: ``"system"``, ``"user"`` or ``"assistant"``.
        content: the turn's text.
    """

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be a str, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Example:
    """One training or evaluation conversation.

    Attributes:
        id: unique within its file: the record's ``id``, else ``"<file stem>:<line number>"``.
        messages: the turns, at least one.
        mode: ``"reasoning"``, ``"fast"`` or None (unspecified).
        difficulty: any finite number (higher is harder), or None.
        answer: the reference final answer, for label-conditioned scoring and evaluation.
    """

    id: str
    messages: tuple[Message, ...]
    mode: str | None = None
    difficulty: float | None = None
    answer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"example id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.messages, tuple) or not self.messages:
            raise ValueError(f"example {self.id!r}: messages must be a non-empty tuple of Message")
        for m in self.messages:
            if not isinstance(m, Message):
                raise TypeError(
                    f"example {self.id!r}: messages must be Message objects, got {type(m).__name__}"
                )
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(
                f"example {self.id!r}: unknown mode {self.mode!r}; expected one of "
                f"{', '.join(MODES)} or None"
            )
        if self.difficulty is not None:
            d = self.difficulty
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
                raise ValueError(
                    f"example {self.id!r}: difficulty must be a finite number, got {d!r}"
                )
            # One type, so equal examples compare and fingerprint equal (3 == 3.0).
            object.__setattr__(self, "difficulty", float(d))
        if self.answer is not None and not isinstance(self.answer, str):
            raise TypeError(
                f"example {self.id!r}: answer must be a str, got {type(self.answer).__name__}"
            )

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """Every message before the last assistant message (all of them when there is none)."""
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "assistant":
                return self.messages[:i]
        return self.messages

    @property
    def response(self) -> str | None:
        """Content of the last assistant message, or None when there is none."""
        for m in reversed(self.messages):
            if m.role == "assistant":
                return m.content
        return None


def read_jsonl(path: str | Path, *, require_response: bool = True) -> list[Example]:
    """Read every record of a JSONL file.

    Args:
        path: the ``.jsonl`` file (UTF-8).
        require_response: when True (training data), every conversation must end with an
            assistant message; pass False for prompt-only data (evaluation, generation).

    Returns:
        The examples in file order.

    Raises:
        RecordError: ``"<file>:<line>: <what is wrong>"`` for the first bad record, including
            duplicate ids.
    """
    path = Path(path)
    examples: list[Example] = []
    first_line_of: dict[str, int] = {}
    for lineno, line in _numbered_lines(path):
        where = f"{path}:{lineno}"
        record = _decode(line, where)
        example = _parse_record(record, default_id=f"{path.stem}:{lineno}", where=where)
        if require_response and example.messages[-1].role != "assistant":
            raise RecordError(
                f"{where}: the last message is from the {example.messages[-1].role!r}, not the "
                "assistant (training data needs a response; use require_response=False for "
                "prompt-only data)"
            )
        if not any(m.role == "user" for m in example.prompt_messages):
            # Nothing to answer: rollouts, scoring and evaluation render the prompt, and would
            # fail on it only when their stage runs.
            raise RecordError(f"{where}: no user message before the response (a prompt to answer)")
        if example.id in first_line_of:
            raise RecordError(
                f"{where}: duplicate id {example.id!r} (first seen on line "
                f"{first_line_of[example.id]})"
            )
        first_line_of[example.id] = lineno
        examples.append(example)
    return examples


def _decode(line: str, where: str) -> Any:
    """The JSON value of one line; every way ``json.loads`` fails is a ``RecordError``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise RecordError(f"{where}: invalid JSON (arrays or objects nest too deeply)") from None
    except ValueError as err:  # int("9" * 5000): Python's limit on integer digits
        raise RecordError(f"{where}: invalid JSON (a number is too long: {err})") from None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line, decoding UTF-8 line by line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError(f"{path}:{lineno}: not valid UTF-8 ({err.reason})") from None
            if line.strip():
                yield lineno, line


def _parse_record(record: Any, *, default_id: str, where: str) -> Example:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {_json_type(record)}")
    has_messages = "messages" in record
    has_prompt = "prompt" in record or "response" in record
    if has_messages and has_prompt:
        raise RecordError(
            f"{where}: a record has either 'messages' or 'prompt'/'response', not both"
        )
    if has_messages:
        messages = _parse_messages(record["messages"], where)
    elif has_prompt:
        messages = _parse_prompt_response(record, where)
    else:
        raise RecordError(
            f"{where}: missing field: a record needs 'messages' or 'prompt' (with 'response')"
        )

    # The field parsers raise RecordErrors that already start with ``where``; only Example's
    # own checks need it added.
    fields = dict(
        id=_parse_id(record.get("id"), default_id, where),
        messages=messages,
        mode=_parse_mode(record.get("mode"), where),
        difficulty=_parse_difficulty(record.get("difficulty"), where),
        answer=_parse_answer(record.get("answer"), where),
    )
    try:
        return Example(**fields)
    except (TypeError, ValueError) as err:
        raise RecordError(f"{where}: {err}") from None


def _parse_messages(raw: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(raw, list):
        raise RecordError(f"{where}: 'messages' must be a list, got {_json_type(raw)}")
    if not raw:
        raise RecordError(f"{where}: empty conversation ('messages' is an empty list)")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RecordError(f"{where}: messages[{i}] must be an object, got {_json_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise RecordError(f"{where}: messages[{i}] is missing field {key!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RecordError(
                f"{where}: messages[{i}] has unknown role {_short(role)}; expected one of "
                f"{', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise RecordError(
                f"{where}: messages[{i}].content must be a string, got {_json_type(content)}"
            )
        _check_encodable(content, f"messages[{i}].content", where)
        messages.append(Message(role, content))
    return tuple(messages)


def _parse_prompt_response(record: dict[str, Any], where: str) -> tuple[Message, ...]:
    messages = []
    for key, role, required in (
        ("system", "system", False),
        ("prompt", "user", True),
        ("response", "assistant", False),
    ):
        value = record.get(key)
        if value is None:
            if required:
                raise RecordError(f"{where}: missing field {key!r}")
            continue
        if not isinstance(value, str):
            raise RecordError(f"{where}: {key!r} must be a string, got {_json_type(value)}")
        _check_encodable(value, repr(key), where)
        messages.append(Message(role, value))
    return tuple(messages)


def _check_encodable(text: str, field: str, where: str) -> None:
    # JSON escapes can produce lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RecordError(
            f"{where}: {field} has an unpaired surrogate {text[err.start]!r} at index {err.start}"
        ) from None


def _parse_id(raw: Any, default_id: str, where: str) -> str:
    if raw is None:
        return default_id
    # Integers are common ids in public datasets; floats and bools are not ids.
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise RecordError(f"{where}: 'id' must be a string or an integer, got {_json_type(raw)}")
    if raw == "":
        raise RecordError(f"{where}: 'id' must not be empty")
    return str(raw)


def _parse_mode(raw: Any, where: str) -> str | None:
    if raw is None or raw in MODES:
        return raw
    raise RecordError(
        f"{where}: unknown mode {_short(raw)}; expected one of "
        f"{', '.join(map(repr, MODES))} or null"
    )


def _parse_difficulty(raw: Any, where: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise RecordError(
            f"{where}: non-numeric difficulty {_short(raw)}; expected a number or null"
        )
    try:
        value = float(raw)
    except OverflowError:  # an int beyond the largest float
        value = math.inf
    if not math.isfinite(value):
        raise RecordError(f"{where}: difficulty must be finite, got {_short(raw)}")
    return value


def _parse_answer(raw: Any, where: str) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    # Numeric answers (math datasets) are compared as text downstream.
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    # NaN and Infinity (json.dumps writes them for a missing value in a float column, 1e400
    # parses to inf) are no answer: as text, "nan" would be compared with the model's output.
    if isinstance(raw, float) and math.isfinite(raw):
        return str(raw)
    if isinstance(raw, float):
        raise RecordError(f"{where}: 'answer' must be finite, got {raw}")
    raise RecordError(f"{where}: 'answer' must be a string or a number, got {_json_type(raw)}")


def _short(value: Any) -> str:
    """``repr(value)`` for a message, at most 80 characters (a record's value can be a book)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an int of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def example_to_record(example: Example) -> dict[str, Any]:
    """The JSON record of an example in the ``messages`` shape; None fields are left out."""
    record: dict[str, Any] = {
        "id": example.id,
        "messages": [{"role": m.role, "content": m.content} for m in example.messages],
    }
    for key in ("mode", "difficulty", "answer"):
        value = getattr(example, key)
        if value is not None:
            record[key] = value
    return record


def write_jsonl(path: str | Path, examples: Iterable[Example] | Iterable[dict[str, Any]]) -> None:
    """Write examples (or raw record dicts) as JSONL, atomically.

    The file appears complete or not at all: records go to a temporary file in the same
    directory, which is flushed, fsynced and renamed over ``path``.
    """
    path = Path(path)
    lines = []
    for i, item in enumerate(examples):
        if isinstance(item, Example):
            record = example_to_record(item)
        elif isinstance(item, dict):
            record = item
        else:
            raise TypeError(
                f"write_jsonl: item {i} is a {type(item).__name__}, not Example or dict"
            )
        try:
            lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        except (TypeError, ValueError) as err:
            raise ValueError(f"write_jsonl: item {i} is not JSON-serializable ({err})") from err
    atomic_write_text(path, "".join(lines))


def fingerprint_examples(examples: Sequence[Example]) -> str:
    """sha256 hex digest of the examples' content (ids, messages, mode, difficulty, answer).

    Order matters: the same examples in another order have another fingerprint, because the
    order is part of a curriculum.
    """
    h = hashlib.sha256()
    for example in examples:
        if not isinstance(example, Example):
            raise TypeError(
                f"fingerprint_examples expects Example objects, got {type(example).__name__}"
            )
        record = example_to_record(example)
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
