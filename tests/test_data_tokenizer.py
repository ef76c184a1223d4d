"""Tests of ByteTokenizer and load_tokenizer's dispatch (HF tokenizers: test_data_hf.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pangu_fastkd.data import BYTE_SPECIAL_TOKENS, ByteTokenizer, Tokenizer, load_tokenizer

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)

UNICODE_TEXTS = [
    "",
    "plain ascii, with\ttabs\nand newlines",
    "你好，世界。盘古模型",  # CJK with full-width punctuation
    "emoji 🙂 and a family 👩‍👩‍👧 (zero-width joiners) and a flag 🇨🇳",
    "combining marks: e\u0301 a\u0308\u0323 and precomposed é",
    "العربية עברית mixed direction",
    "nul\x00 and del\x7f bytes",
    "literal specials stay text: <|user|> <|end|> <|eos|>",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_byte_round_trip_on_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@PROPERTY
@given(st.text())
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfeA",  # bytes that never start a UTF-8 sequence
        "你".encode()[:2],  # a truncated 3-byte character
        b"ok\xc3",  # truncated at the end
        b"\xed\xa0\x80",  # an encoded surrogate, invalid in UTF-8
    ],
)
def test_byte_decode_invalid_utf8_uses_replacement(raw):
    tok = ByteTokenizer()
    text = tok.decode(list(raw))
    assert text == raw.decode("utf-8", errors="replace")
    assert "\ufffd" in text


def test_byte_special_tokens_are_never_injected_from_text():
    tok = ByteTokenizer()
    for special in BYTE_SPECIAL_TOKENS:
        ids = tok.encode(f"x{special}y")
        assert tok.token_id(special) not in ids
        assert all(i < 256 for i in ids)
        assert tok.decode(ids) == f"x{special}y"


def test_byte_vocabulary_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == 263
    assert [tok.token_id(s) for s in BYTE_SPECIAL_TOKENS] == list(range(256, 263))
    assert tok.pad_id == tok.token_id("<|pad|>")
    assert tok.bos_id == tok.token_id("<|bos|>")
    # Generation stops at the end of the assistant's turn, which the template closes with <|end|>.
    assert tok.eos_id == tok.token_id("<|end|>")
    assert isinstance(tok, Tokenizer)


def test_byte_decode_renders_specials_between_bytes():
    tok = ByteTokenizer()
    half = list("你".encode())
    ids = [tok.bos_id, *half[:2], tok.token_id("<|assistant|>"), half[2], *tok.encode("é")]
    # A special token ends a byte run: the split character is two replacement runs, not "你".
    expected = "<|bos|>" + b"\xe4\xbd".decode(errors="replace") + "<|assistant|>"
    expected += b"\xa0".decode(errors="replace") + "é"
    assert tok.decode(ids) == expected


def test_byte_decode_accepts_numpy_and_torch_ints():
    tok = ByteTokenizer()
    ids = tok.encode("ab")
    assert tok.decode(np.array(ids)) == "ab"
    assert tok.decode(torch.tensor(ids)) == "ab"


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        ([263], ValueError, r"token id 263 at index 0 is outside the vocabulary \[0, 263\)"),
        ([65, -1], ValueError, "token id -1 at index 1"),
        ([1.5], TypeError, "must be integers, got float at index 0"),
        ([True], TypeError, "must be integers, got bool"),
        (torch.tensor([1.0]), TypeError, "must be integers, got float"),
        (
            np.array([[1, 2]]),
            TypeError,
            r"flat sequence of integers, got a ndarray of shape \(2,\)",
        ),
    ],
)
def test_byte_decode_rejects_bad_ids(ids, error, message):
    with pytest.raises(error, match=message):
        ByteTokenizer().decode(ids)


def test_byte_encode_rejects_non_text():
    with pytest.raises(TypeError, match="encode expects str, got bytes"):
        ByteTokenizer().encode(b"abc")


def test_byte_token_id_names_the_missing_token():
    with pytest.raises(KeyError, match=r"no special token '<\|im_start\|>'.*<\|pad\|>"):
        ByteTokenizer().token_id("<|im_start|>")


def test_byte_fingerprint_is_stable():
    a, b = ByteTokenizer().fingerprint(), ByteTokenizer().fingerprint()
    assert a == b
    assert len(a) == 64 and int(a, 16) >= 0


def test_load_tokenizer_byte():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'byte' nor an existing"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither 'byte'"):
        load_tokenizer("bytes")  # a typo of "byte" is a missing path, and says so
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json"):
        load_tokenizer(tmp_path)
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"is not a \.json file"):
        load_tokenizer(model)
    with pytest.raises(TypeError, match="'byte' or a path, got int"):
        load_tokenizer(3)
