"""Tests of JSONL records: both shapes, every error message, atomic writes, fingerprints."""

from __future__ import annotations

import json
import os
import re

import pytest

from pangu_fastkd.data import (
    Example,
    Message,
    RecordError,
    example_to_record,
    fingerprint_examples,
    read_jsonl,
    write_jsonl,
)


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(**fields) -> str:
    return json.dumps(fields, ensure_ascii=False)


CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_read_both_shapes(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            record(
                id="q1",
                messages=[{"role": "system", "content": "be brief"}, *CHAT],
                mode="fast",
                difficulty=2,
                answer="4",
            ),
            "",  # blank lines are skipped but still counted
            record(prompt="你好", response="🙂 hi", system="sys", mode="reasoning", answer=7),
            record(prompt="p", response="r", id=12, difficulty=0.5, mode=None, extra="ignored"),
        ],
    )
    first, second, third = read_jsonl(path)
    assert first == Example(
        id="q1",
        messages=(
            Message("system", "be brief"),
            Message("user", "2+2?"),
            Message("assistant", "4"),
        ),
        mode="fast",
        difficulty=2.0,
        answer="4",
    )
    assert isinstance(first.difficulty, float)
    assert second.id == "train:3"  # file stem and 1-based physical line number
    assert second.messages == (
        Message("system", "sys"),
        Message("user", "你好"),
        Message("assistant", "🙂 hi"),
    )
    assert second.mode == "reasoning" and second.answer == "7" and second.difficulty is None
    assert third.id == "12" and third.difficulty == 0.5 and third.mode is None


def test_prompt_messages_and_response():
    ex = Example(
        "x",
        (
            Message("system", "s"),
            Message("user", "u1"),
            Message("assistant", "a1"),
            Message("user", "u2"),
            Message("assistant", "a2"),
        ),
    )
    assert ex.prompt_messages == ex.messages[:4]
    assert ex.response == "a2"
    prompt_only = Example("y", (Message("user", "u"),))
    assert prompt_only.prompt_messages == prompt_only.messages
    assert prompt_only.response is None


def test_prompt_only_data_needs_require_response_false(tmp_path):
    path = write_lines(
        tmp_path / "eval.jsonl",
        [record(prompt="q", answer="a"), record(messages=[{"role": "user", "content": "u"}])],
    )
    with pytest.raises(RecordError, match="require_response=False"):
        read_jsonl(path)
    examples = read_jsonl(path, require_response=False)
    assert [ex.messages for ex in examples] == [(Message("user", "q"),), (Message("user", "u"),)]


BAD_RECORDS = [
    ('{"prompt": "a", ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got array"),
    (record(id="x"), "missing field: a record needs 'messages' or 'prompt'"),
    (record(response="r"), "missing field 'prompt'"),
    (record(messages=CHAT, prompt="p"), "either 'messages' or 'prompt'/'response', not both"),
    (record(messages="hi"), "'messages' must be a list, got string"),
    (record(messages=[]), "empty conversation"),
    (record(messages=["hi"]), r"messages\[0\] must be an object, got string"),
    (record(messages=[{"content": "c"}]), r"messages\[0\] is missing field 'role'"),
    (record(messages=[{"role": "user"}]), r"messages\[0\] is missing field 'content'"),
    (
        record(messages=[{"role": "tool", "content": "c"}]),
        r"messages\[0\] has unknown role 'tool'; expected one of system, user, assistant",
    ),
    (
        record(messages=[{"role": "assistant", "content": 4}]),
        r"messages\[0\]\.content must be a string, got number",
    ),
    (record(prompt=["p"], response="r"), "'prompt' must be a string, got array"),
    (record(prompt="p", response="r", system=1), "'system' must be a string, got number"),
    (
        record(messages=CHAT, mode="slow"),
        "unknown mode 'slow'; expected one of 'reasoning', 'fast'",
    ),
    (record(messages=CHAT, difficulty="hard"), "non-numeric difficulty 'hard'"),
    (record(messages=CHAT, difficulty=True), "non-numeric difficulty True"),
    ('{"prompt": "p", "response": "r", "difficulty": NaN}', "difficulty must be finite, got nan"),
    (record(messages=CHAT, answer=["4"]), "'answer' must be a string or a number, got array"),
    (record(messages=CHAT, id=1.5), "'id' must be a string or an integer, got number"),
    (record(messages=CHAT, id=""), "'id' must not be empty"),
    (record(messages=CHAT[:1]), "the last message is from the 'user', not the assistant"),
    (
        '{"prompt": "p", "response": "bad \\ud800"}',
        r"'response' has an unpaired surrogate '\\ud800' at index 4",
    ),
    (
        '{"messages": [{"role": "user", "content": "\\udfff"}]}',
        r"messages\[0\]\.content has an unpaired surrogate",
    ),
]


@pytest.mark.parametrize(("line", "message"), BAD_RECORDS)
def test_read_errors_name_the_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", [record(messages=CHAT), "   ", line])
    with pytest.raises(RecordError, match=rf"^{re.escape(str(path))}:3: .*{message}"):
        read_jsonl(path)


def test_read_rejects_duplicate_ids(tmp_path):
    lines = [record(id=i, messages=CHAT) for i in ("a", "b", 0, "a")]
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(RecordError, match=r"d\.jsonl:4: duplicate id 'a' \(first seen on line 1\)"):
        read_jsonl(path)
    # An integer id and its text are the same id.
    path = write_lines(tmp_path / "d.jsonl", [*lines[:3], record(id="0", messages=CHAT)])
    with pytest.raises(RecordError, match=r"duplicate id '0' \(first seen on line 3\)"):
        read_jsonl(path)


def test_read_rejects_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(record(messages=CHAT).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_record_error_is_a_value_error():
    assert issubclass(RecordError, ValueError)


def test_message_and_example_validate_their_fields():
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        Message("bot", "x")
    with pytest.raises(TypeError, match="content must be a str, got int"):
        Message("user", 3)
    user = (Message("user", "u"),)
    with pytest.raises(ValueError, match="messages must be a non-empty tuple"):
        Example("e", ())
    with pytest.raises(ValueError, match="messages must be a non-empty tuple"):
        Example("e", [Message("user", "u")])
    with pytest.raises(TypeError, match="must be Message objects, got dict"):
        Example("e", ({"role": "user", "content": "u"},))
    with pytest.raises(ValueError, match="unknown mode 'slow'"):
        Example("e", user, mode="slow")
    with pytest.raises(ValueError, match="difficulty must be a finite number, got inf"):
        Example("e", user, difficulty=float("inf"))
    with pytest.raises(TypeError, match="answer must be a str, got int"):
        Example("e", user, answer=4)
    with pytest.raises(ValueError, match="id must be a non-empty str"):
        Example("", user)


def sample_examples() -> list[Example]:
    return [
        Example(
            "a",
            (Message("system", "s"), Message("user", "你好"), Message("assistant", "🙂\n")),
            mode="reasoning",
            difficulty=1.5,
            answer="42",
        ),
        Example("b", (Message("user", 'quote " and \\'), Message("assistant", ""))),
    ]


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, sample_examples())
    assert read_jsonl(path) == sample_examples()
    # None fields are left out of the records, non-ASCII text is written as is.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[1]) == example_to_record(sample_examples()[1])
    assert set(json.loads(lines[1])) == {"id", "messages"}
    assert "你好" in lines[0]


def test_write_dicts_and_overwrite_atomically(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, sample_examples())
    write_jsonl(path, [{"prompt": "p", "response": "r"}])
    assert [ex.messages for ex in read_jsonl(path)] == [
        (Message("user", "p"), Message("assistant", "r"))
    ]
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("items", "error", "message"),
    [
        ([{"ok": 1}, {"bad": {1, 2}}], ValueError, "item 1 is not JSON-serializable"),
        ([{"nan": float("nan")}], ValueError, "item 0 is not JSON-serializable"),
        ([{"ok": 1}, "text"], TypeError, "item 1 is a str, not Example or dict"),
    ],
)
def test_failed_write_keeps_the_old_file(tmp_path, items, error, message):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, sample_examples())
    before = path.read_bytes()
    with pytest.raises(error, match=message):
        write_jsonl(path, items)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_fingerprint_examples():
    examples = sample_examples()
    fp = fingerprint_examples(examples)
    assert fp == fingerprint_examples(sample_examples())
    assert len(fp) == 64
    assert fp != fingerprint_examples(examples[::-1])  # order is part of a curriculum
    assert fp != fingerprint_examples(examples[:1])
    a = examples[0]
    for changed in (
        Example("a2", a.messages, a.mode, a.difficulty, a.answer),
        Example("a", a.messages[1:], a.mode, a.difficulty, a.answer),
        Example("a", a.messages, "fast", a.difficulty, a.answer),
        Example("a", a.messages, a.mode, 2.5, a.answer),
        Example("a", a.messages, a.mode, a.difficulty, None),
    ):
        assert fingerprint_examples([changed, examples[1]]) != fp
    # An integer difficulty is the same difficulty as its float.
    b = Example("b", examples[1].messages, difficulty=3)
    assert fingerprint_examples([b]) == fingerprint_examples([Example("b", b.messages, None, 3.0)])
    with pytest.raises(TypeError, match="expects Example objects, got dict"):
        fingerprint_examples([example_to_record(a)])
