"""Chat template: conversations to token ids and a mask of the tokens the student learns.

A turn renders as ``<role prefix> content <end token> <separator>``. Marker strings are split on
the template's special tokens, which map to their special ids; everything else (marker text
such as ChatML's ``"assistant\\n"``, and all message content) goes through
``tokenizer.encode``, which never produces special ids, so message text cannot forge a turn.

The supervised mask is True exactly on assistant content tokens and the end token closing an
assistant turn: the student learns to answer and to stop, never to predict prompts or markers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .records import Example, Message
from .tokenizer import Tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "ChatRenderer",
    "ChatTemplate",
    "TokenizedExample",
    "default_template",
    "tokenize_example",
]


@runtime_checkable
class ChatRenderer(Protocol):
    """What the pipeline, evaluation, rollouts and scoring call on a chat template."""

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer,
        *,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """``(ids, supervised)``: supervised exactly on assistant content and its end token."""
        ...

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """Ids generation stops on."""
        ...


@dataclass(frozen=True)
class ChatTemplate:
    """Turn markers; the defaults are the ``ByteTokenizer`` specials.

    Attributes:
        system_prefix, user_prefix, assistant_prefix: text before each turn's content.
        end_token: the special token closing every turn (supervised after assistant content).
        separator: text after each end token (e.g. ChatML's newline); never supervised.
        special_tokens: the marker substrings that are special tokens (mapped through
            ``tokenizer.token_id``, never encoded as text); must include ``end_token``.
        add_bos: start with ``tokenizer.bos_id`` when the tokenizer has one.
    """

    system_prefix: str = "<|system|>"
    user_prefix: str = "<|user|>"
    assistant_prefix: str = "<|assistant|>"
    end_token: str = "<|end|>"
    separator: str = ""
    special_tokens: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    add_bos: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.special_tokens, tuple) or not all(
            isinstance(t, str) and t for t in self.special_tokens
        ):
            raise TypeError(
                f"special_tokens must be a tuple of non-empty strings, got {self.special_tokens!r}"
            )
        if self.end_token not in self.special_tokens:
            raise ValueError(
                f"end_token {self.end_token!r} must be one of special_tokens {self.special_tokens}"
            )
        prefixes = (self.system_prefix, self.user_prefix, self.assistant_prefix)
        if not all(isinstance(p, str) and p for p in prefixes):
            raise ValueError(f"role prefixes must be non-empty strings, got {prefixes!r}")
        if len(set(prefixes)) != 3:
            raise ValueError(f"role prefixes must differ from each other, got {prefixes!r}")
        if not isinstance(self.separator, str):
            raise TypeError(f"separator must be a str, got {type(self.separator).__name__}")

    def _marker_ids(self, marker: str, tokenizer: Tokenizer) -> list[int]:
        """Ids of a marker string: special tokens by id, the text between them encoded."""
        # Longest first, so a special that extends another one wins.
        specials = sorted(self.special_tokens, key=len, reverse=True)
        pattern = "(" + "|".join(map(re.escape, specials)) + ")"
        ids: list[int] = []
        for i, piece in enumerate(re.split(pattern, marker)):
            if i % 2:  # re.split puts captured separators at odd indices
                ids.append(tokenizer.token_id(piece))
            elif piece:
                ids.extend(tokenizer.encode(piece))
        return ids

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer,
        *,
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and its supervised mask.

        Args:
            messages: the turns, at least one.
            tokenizer: maps text and special tokens to ids.
            add_generation_prompt: end with the assistant prefix, for generation (the
                conversation must then not end with an assistant message).

        Returns:
            ``(ids, supervised)``, two lists of the same length: ``supervised[t]`` is True
            exactly on assistant content tokens and the end token closing an assistant turn.
        """
        if not messages:
            raise ValueError("render needs at least one message")
        for m in messages:
            if not isinstance(m, Message):
                raise TypeError(f"render expects Message objects, got {type(m).__name__}")
        if add_generation_prompt and messages[-1].role == "assistant":
            raise ValueError(
                "add_generation_prompt=True needs a conversation that does not end with an "
                "assistant message"
            )
        prefix_ids = {
            "system": self._marker_ids(self.system_prefix, tokenizer),
            "user": self._marker_ids(self.user_prefix, tokenizer),
            "assistant": self._marker_ids(self.assistant_prefix, tokenizer),
        }
        end_id = tokenizer.token_id(self.end_token)
        separator_ids = self._marker_ids(self.separator, tokenizer)

        ids: list[int] = []
        supervised: list[bool] = []
        if self.add_bos and tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
            supervised.append(False)
        for m in messages:
            is_assistant = m.role == "assistant"
            content_ids = tokenizer.encode(m.content)
            ids += prefix_ids[m.role]
            supervised += [False] * len(prefix_ids[m.role])
            ids += content_ids
            supervised += [is_assistant] * len(content_ids)
            ids.append(end_id)
            supervised.append(is_assistant)
            ids += separator_ids
            supervised += [False] * len(separator_ids)
        if add_generation_prompt:
            ids += prefix_ids["assistant"]
            supervised += [False] * len(prefix_ids["assistant"])
        return ids, supervised

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """Ids generation should stop on: the turn end token, and eos when it differs."""
        end_id = tokenizer.token_id(self.end_token)
        return (end_id,) if end_id == tokenizer.eos_id else (end_id, tokenizer.eos_id)


# Qwen-style ChatML, e.g. "<|im_start|>user\nHi<|im_end|>\n".
CHATML_TEMPLATE = ChatTemplate(
    system_prefix="<|im_start|>system\n",
    user_prefix="<|im_start|>user\n",
    assistant_prefix="<|im_start|>assistant\n",
    end_token="<|im_end|>",
    separator="\n",
    special_tokens=("<|im_start|>", "<|im_end|>"),
)

# Llama 3 instruct, e.g. "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>".
LLAMA3_TEMPLATE = ChatTemplate(
    system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
    user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    end_token="<|eot_id|>",
    special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)


def default_template(tokenizer: Tokenizer) -> ChatTemplate:
    """The template matching the tokenizer's special tokens.

    Tried in order: the ``ByteTokenizer`` markers (``<|system|>`` ... ``<|end|>``), ChatML
    (``<|im_start|>``/``<|im_end|>``), Llama 3 (``<|start_header_id|>`` ... ``<|eot_id|>``).

    Raises:
        ValueError: the tokenizer has none of these sets; pass an explicit ``ChatTemplate``.
    """
    candidates = (ChatTemplate(), CHATML_TEMPLATE, LLAMA3_TEMPLATE)
    for template in candidates:
        if all(_has_token(tokenizer, t) for t in template.special_tokens):
            return template
    looked_for = "; ".join(", ".join(t.special_tokens) for t in candidates)
    raise ValueError(
        f"{tokenizer!r} has no known chat special tokens (looked for: {looked_for}); "
        "build an explicit ChatTemplate(...) with its turn markers"
    )


def _has_token(tokenizer: Tokenizer, token: str) -> bool:
    try:
        tokenizer.token_id(token)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class TokenizedExample:
    """A rendered conversation, ready to pack.

    Attributes:
        example_id: the source ``Example.id``.
        input_ids: token ids, BOS first when the tokenizer has one.
        supervised: same length; True where the token is a training target.
    """

    example_id: str
    input_ids: tuple[int, ...]
    supervised: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, tuple) or not isinstance(self.supervised, tuple):
            raise TypeError(f"example {self.example_id!r}: input_ids and supervised must be tuples")
        if len(self.input_ids) != len(self.supervised):
            raise ValueError(
                f"example {self.example_id!r}: input_ids has {len(self.input_ids)} tokens but "
                f"supervised has {len(self.supervised)}"
            )
        if not self.input_ids:
            raise ValueError(f"example {self.example_id!r} has no tokens")

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_example(
    example: Example, tokenizer: Tokenizer, template: ChatRenderer
) -> TokenizedExample:
    """Render ``example.messages`` with ``template``: ids and the assistant-only mask."""
    ids, supervised = template.render(example.messages, tokenizer)
    return TokenizedExample(example.id, tuple(ids), tuple(supervised))
