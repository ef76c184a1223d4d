"""Tokenizers: an embedded byte-level one and local Hugging Face ``tokenizer.json`` files.

Both follow the ``Tokenizer`` protocol the rest of the package is written against: ``encode``
never adds special tokens and never turns special-token text found in user data into special
ids (so a prompt cannot inject a turn marker); the chat template places special ids itself
through ``token_id``.

``eos_id`` is the token generation stops on, which for chat models is the end-of-turn token.
For ``ByteTokenizer`` that is ``<|end|>`` (the token the default chat template closes every turn
with and trains the assistant to emit); ``<|eos|>`` stays in the vocabulary as an end-of-document
marker for raw text.

The ``tokenizers`` package is imported lazily inside ``HFTokenizer`` only, so everything else in
``pangu_fastkd.data`` works without it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "BYTE_SPECIAL_TOKENS",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
]

# Order is part of the vocabulary: special i has id 256 + i.
BYTE_SPECIAL_TOKENS = (
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)

# End-of-sequence tokens of common Hugging Face vocabularies, tried in this order when neither
# tokenizer_config.json nor special_tokens_map.json names one.
_KNOWN_EOS_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data, generation and training code needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added, special-token text stays text."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; nothing skipped, special tokens rendered as their text."""
        ...

    def token_id(self, special: str) -> int:
        """Id of a special token given its text; KeyError naming it when absent."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex digest identifying the vocabulary and the special-token ids."""
        ...


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """``ids`` as a list of Python ints, or a clear error for a non-int or out-of-range id."""
    out = []
    for i, tid in enumerate(ids):
        # bool is an int subclass; True as a token id is always a bug upstream.
        if not isinstance(tid, int) and hasattr(tid, "item"):
            try:
                tid = tid.item()  # numpy / torch integer scalars
            except (ValueError, RuntimeError):  # an array with several elements
                raise TypeError(
                    f"token ids must be a flat sequence of integers, got a "
                    f"{type(tid).__name__} of shape {tuple(tid.shape)} at index {i}"
                ) from None
        if isinstance(tid, bool) or not isinstance(tid, int):
            raise TypeError(f"token ids must be integers, got {type(tid).__name__} at index {i}")
        if not 0 <= tid < vocab_size:
            raise ValueError(
                f"token id {tid} at index {i} is outside the vocabulary [0, {vocab_size})"
            )
        out.append(tid)
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then the specials of ``BYTE_SPECIAL_TOKENS`` (263 tokens).

    Needs no files: the vocabulary is the byte alphabet, so any text round-trips exactly.
    """

    def __init__(self) -> None:
        self._special_ids = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
        self._special_text = {i: tok for tok, i in self._special_ids.items()}
        self.vocab_size: int = 256 + len(BYTE_SPECIAL_TOKENS)
        self.pad_id: int = self._special_ids["<|pad|>"]
        self.bos_id: int | None = self._special_ids["<|bos|>"]
        self.eos_id: int = self._special_ids["<|end|>"]

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``; literal ``<|...|>`` text stays bytes."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: byte runs decoded as UTF-8 with replacement, specials as their text."""
        parts: list[str] = []
        run = bytearray()
        for tid in _check_ids(ids, self.vocab_size):
            if tid < 256:
                run.append(tid)
                continue
            # A special token ends the byte run: bytes on either side never join into a char.
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(self._special_text[tid])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def token_id(self, special: str) -> int:
        """Id of one of ``BYTE_SPECIAL_TOKENS``."""
        try:
            return self._special_ids[special]
        except KeyError:
            raise KeyError(
                f"ByteTokenizer has no special token {special!r}; "
                f"its specials are {', '.join(BYTE_SPECIAL_TOKENS)}"
            ) from None

    def fingerprint(self) -> str:
        """sha256 of the tokenizer kind, the special-token list and the role ids."""
        return _sha256_json(
            {
                "kind": "byte",
                "specials": list(BYTE_SPECIAL_TOKENS),
                "bos": self.bos_id,
                "eos": self.eos_id,
                "pad": self.pad_id,
            }
        )

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (through the ``tokenizers`` package).

    ``bos``/``eos``/``pad`` come from explicit arguments, else ``special_tokens_map.json``, else
    ``tokenizer_config.json`` next to the tokenizer file (the precedence ``transformers`` uses).
    Without a configured eos, the first of a few well-known eos tokens present in the vocabulary
    is used; without a pad token, pad is eos (pad positions are never supervised).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        source: str = "<in-memory tokenizer>",
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``; prefer ``from_file`` / ``from_directory``."""
        tokenizers = _import_tokenizers()
        if not isinstance(hf_tokenizer, tokenizers.Tokenizer):
            raise TypeError(
                f"HFTokenizer wraps a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}"
            )
        # Our own copy, because we change how it encodes special-token text below.
        self._tok = tokenizers.Tokenizer.from_str(hf_tokenizer.to_str())
        # Special-token text inside user data must stay text (no control-token injection).
        self._tok.encode_special_tokens = True
        self.source = source
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        self.bos_id: int | None = None if bos_token is None else self._lookup(bos_token, "bos")
        if eos_token is None:
            eos_token = next(
                (t for t in _KNOWN_EOS_TOKENS if self._tok.token_to_id(t) is not None), None
            )
            if eos_token is None:
                raise ValueError(
                    f"{source}: no eos token configured (tokenizer_config.json / "
                    f"special_tokens_map.json) and none of {', '.join(_KNOWN_EOS_TOKENS)} is in "
                    "the vocabulary; pass eos_token=... explicitly"
                )
        self.eos_id: int = self._lookup(eos_token, "eos")
        self.pad_id: int = self.eos_id if pad_token is None else self._lookup(pad_token, "pad")

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> HFTokenizer:
        """Load ``tokenizer.json`` (special-token configs are read from the same directory)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        tokenizers = _import_tokenizers()
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json ({err})") from err
        configured = _read_special_token_config(path.parent)
        return cls(
            hf,
            bos_token=bos_token if bos_token is not None else configured.get("bos_token"),
            eos_token=eos_token if eos_token is not None else configured.get("eos_token"),
            pad_token=pad_token if pad_token is not None else configured.get("pad_token"),
            source=str(path),
        )

    @classmethod
    def from_directory(cls, path: str | Path, **special_tokens: str | None) -> HFTokenizer:
        """Load ``<path>/tokenizer.json`` and the special-token configs beside it."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json (only the Hugging Face 'fast' tokenizer format is "
                "supported; convert a sentencepiece tokenizer.model with transformers first)"
            )
        return cls.from_file(file, **special_tokens)

    def _lookup(self, token: str, role: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"{self.source}: the {role} token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added, special-token text kept as text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self._tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def token_id(self, special: str) -> int:
        """Id of a token (special or not) given its exact text in the vocabulary."""
        tid = self._tok.token_to_id(special)
        if tid is None:
            raise KeyError(f"{self.source}: no token {special!r} in the vocabulary")
        return tid

    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer and the bos/eos/pad ids."""
        return _sha256_json(
            {
                "kind": "huggingface",
                "tokenizer": json.loads(self._tok.to_str()),
                "bos": self.bos_id,
                "eos": self.eos_id,
                "pad": self.pad_id,
            }
        )

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A tokenizer from a spec.

    Args:
        spec: ``"byte"`` for ``ByteTokenizer``; a directory holding ``tokenizer.json`` or the
            path of a ``.json`` tokenizer file for ``HFTokenizer``.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be 'byte' or a path, got {type(spec).__name__}")
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        return HFTokenizer.from_directory(path)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(
                f"tokenizer file {str(path)!r} is not a .json file; expected a Hugging Face "
                "tokenizer.json or a directory holding one"
            )
        return HFTokenizer.from_file(path)
    raise FileNotFoundError(
        f"tokenizer spec {str(spec)!r} is neither 'byte' nor an existing directory or "
        "tokenizer.json file"
    )


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "HFTokenizer needs the Hugging Face 'tokenizers' package: pip install tokenizers "
            "(or pip install pangu_fastkd[tokenizers])"
        ) from err
    return tokenizers


def _read_special_token_config(directory: Path) -> dict[str, str]:
    """bos/eos/pad token texts from tokenizer_config.json, overridden by special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, too deep, too long
            reason = "nested too deeply" if isinstance(err, RecursionError) else err
            raise ValueError(f"{file}: not valid JSON ({reason})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            # transformers stores either the token text or a serialized AddedToken.
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{file}: {key} must be a string, got {type(value).__name__}")
            found[key] = value
    return found


def _sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
