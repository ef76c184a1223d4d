"""A local Hugging Face directory's own Jinja chat template, as a drop-in for ``ChatTemplate``.

``HFChatTemplate.render`` returns the ids ``tokenizer.apply_chat_template`` produces and the
mask ``ChatTemplate`` documents: True exactly on each assistant turn's content tokens and the
end-of-turn token closing it. The mask comes from the template's ``{% generation %}`` blocks when
it has them (``return_assistant_tokens_mask``), else from rendering growing prefixes of the
conversation and diffing the token ids (the TRL/axolotl approach). The end-of-turn token of a turn
is the first special token after its content; tokens after it (ChatML's newline) are separators.

Special-token text inside message content is encoded as text (``sanitize_control_tokens``), as
``HFTokenizer.encode`` does, so data cannot forge a turn marker. Added tokens that are not special
(reasoning tags such as ``<think>``) keep their ids, because the student must learn to emit them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.chat import ChatRenderer
from ..data.records import Message
from ..data.tokenizer import Tokenizer
from ._require import require_transformers

__all__ = ["ChatRenderer", "HFChatTemplate", "TemplatePrefixError", "template_for"]

# `{% generation %}`, `{%- generation -%}`: the blocks `return_assistant_tokens_mask` reads.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplatePrefixError(ValueError):
    """The template renders an earlier part of a conversation differently inside the whole.

    E.g. templates that drop the reasoning of earlier assistant turns: the tokens the model saw
    when it produced a turn are not in the full rendering, so no mask over it is right.
    """


class HFChatTemplate:
    """Renders conversations with a transformers tokenizer's own chat template.

    Prefer ``from_directory`` (or ``template_for``). The tokenizer passed to ``render`` and
    ``stop_ids`` is the pipeline's ``Tokenizer`` for the same vocabulary (``HFTokenizer`` of the
    same directory); it is checked against this template's tokenizer, never used to encode.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
        source: str = "<in-memory tokenizer>",
    ) -> None:
        """Wrap a transformers fast tokenizer that has a chat template.

        Args:
            hf_tokenizer: a ``PreTrainedTokenizerFast`` (copied; the original is not changed).
            template_kwargs: extra variables for the template, e.g. ``{"enable_thinking": False}``.
            source: where the tokenizer came from, for error messages.
        """
        transformers = require_transformers()
        if not isinstance(hf_tokenizer, transformers.PreTrainedTokenizerBase):
            raise TypeError(
                f"HFChatTemplate wraps a transformers tokenizer, got {type(hf_tokenizer).__name__}"
            )
        if not getattr(hf_tokenizer, "is_fast", False):
            # Token offsets (for the generation mask) exist only in fast tokenizers.
            raise TypeError(f"{source}: HFChatTemplate needs a fast tokenizer (tokenizer.json)")
        if hf_tokenizer.chat_template is None:
            raise ValueError(f"{source}: the tokenizer has no chat template")
        self.source = source
        self.template_kwargs: dict[str, Any] = dict(template_kwargs or {})
        reserved = {"add_generation_prompt", "tokenize", "messages", "conversation"}
        if clash := reserved & self.template_kwargs.keys():
            raise ValueError(f"template_kwargs must not set {sorted(clash)}; render sets them")
        self._tok = copy.deepcopy(hf_tokenizer)
        if self._tok.chat_control_tokens is None:
            # Sanitize only special tokens in content: transformers' default also sanitizes added
            # tokens the template mentions (e.g. <think>), which would teach reasoning tags as text.
            self._tok.chat_control_tokens = []
        self._special_ids = frozenset(
            i for i, t in self._tok.added_tokens_decoder.items() if t.special
        )
        self.has_generation_blocks = bool(_GENERATION_BLOCK.search(self._tok.get_chat_template()))
        self.end_id = self._probe_end_id()

    @classmethod
    def from_directory(cls, path: str | Path, **template_kwargs: Any) -> HFChatTemplate:
        """The chat template of a local HF tokenizer directory (nothing is downloaded)."""
        transformers = require_transformers()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot load a transformers tokenizer ({err})") from err
        return cls(tok, template_kwargs=template_kwargs, source=str(path))

    def __repr__(self) -> str:
        return f"HFChatTemplate({self.source!r})"

    # -----------------------------------------------------------------------------------------
    # Rendering

    def _ids(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
        """Token ids of ``messages`` exactly as ``apply_chat_template`` makes them."""
        out = self._tok.apply_chat_template(
            _as_dicts(messages),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
            sanitize_control_tokens=True,
            **self.template_kwargs,
        )
        return list(out["input_ids"])

    def _probe_end_id(self) -> int:
        """The end-of-turn id: the first special token after an assistant reply's content."""
        user = [Message("user", "hi")]
        try:
            prompt = self._ids(user, add_generation_prompt=True)
            whole = self._ids([*user, Message("assistant", "ok")], add_generation_prompt=False)
        except Exception as err:  # Jinja raises its own errors (e.g. templates needing a system)
            raise ValueError(
                f"{self.source}: rendering a probe user/assistant exchange with the chat template "
                f"failed ({type(err).__name__}: {err})"
            ) from err
        if whole[: len(prompt)] == prompt:
            for tid in whole[len(prompt) :]:
                if tid in self._special_ids:
                    return tid
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"{self.source}: cannot tell the end-of-turn token: the template does not close an "
                "assistant reply with a special token and the tokenizer has no eos token"
            )
        return int(self._tok.eos_token_id)

    def _check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Reject a pipeline tokenizer whose vocabulary is not this template's."""
        end_text = self._tok.convert_ids_to_tokens(self.end_id)
        try:
            same_end = tokenizer.token_id(end_text) == self.end_id
        except KeyError:
            same_end = False
        if tokenizer.vocab_size != len(self._tok) or not same_end:
            raise ValueError(
                f"{tokenizer!r} is not the tokenizer of {self!r}: expected vocab_size "
                f"{len(self._tok)} with {end_text!r} = {self.end_id}; load both from the same "
                "directory"
            )

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
            tokenizer: the pipeline's tokenizer for the same vocabulary (checked, not used).
            add_generation_prompt: end with the template's assistant header, for generation (the
                conversation must then not end with an assistant message).

        Returns:
            ``(ids, supervised)``, two lists of the same length: ``ids`` as
            ``apply_chat_template`` makes them; ``supervised[t]`` True exactly on assistant
            content tokens and the end token closing each assistant turn.

        Raises:
            TemplatePrefixError: the template renders the conversation up to an assistant turn
                differently from the start of the whole (names the turn).
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
        self._check_tokenizer(tokenizer)
        ids = self._ids(messages, add_generation_prompt=add_generation_prompt)
        assistant_turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
        supervised = None
        if self.has_generation_blocks and assistant_turns:
            supervised = self._generation_mask(
                messages, ids, len(assistant_turns), add_generation_prompt=add_generation_prompt
            )
        if supervised is None:
            supervised = self._prefix_diff_mask(messages, ids, assistant_turns)
        return ids, supervised

    def _generation_mask(
        self,
        messages: Sequence[Message],
        ids: list[int],
        n_turns: int,
        *,
        add_generation_prompt: bool,
    ) -> list[bool] | None:
        """Mask from ``{% generation %}`` blocks, or None when it cannot be used here.

        transformers cannot sanitize content and return the mask in one call, so the mask is
        used only when the unsanitized ids are the same (no special-token text in the content).
        Each block is cut after its first special token (a separator inside the block is not
        learned) or extended by the special token right after it (an end token outside it).
        """
        out = self._tok.apply_chat_template(
            _as_dicts(messages),
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=True,
            **self.template_kwargs,
        )
        if list(out["input_ids"]) != ids:
            return None
        runs = _runs([bool(b) for b in out["assistant_masks"]])
        if len(runs) != n_turns:  # e.g. an empty reply leaves no tokens inside its block
            return None
        supervised = [False] * len(ids)
        for start, stop in runs:
            end = next((t for t in range(start, stop) if ids[t] in self._special_ids), None)
            if end is None and stop < len(ids) and ids[stop] in self._special_ids:
                end = stop
            if end is None:
                return None  # no end token found; the prefix diff names the turn
            supervised[start : end + 1] = [True] * (end + 1 - start)
        return supervised

    def _prefix_diff_mask(
        self, messages: Sequence[Message], ids: list[int], assistant_turns: list[int]
    ) -> list[bool]:
        """Mask from rendering each assistant turn's prompt and the turn, diffing token ids."""
        supervised = [False] * len(ids)
        for i in assistant_turns:
            where = f"assistant message {i} (of {len(messages)} messages)"
            if i == 0:
                raise ValueError(
                    f"{self.source}: {where} has no messages before it; the chat template needs "
                    "a prompt to render its generation header"
                )
            prompt = self._ids(messages[:i], add_generation_prompt=True)
            turn = self._ids(messages[: i + 1], add_generation_prompt=False)
            if turn[: len(prompt)] != prompt:
                raise TemplatePrefixError(
                    f"{self.source}: the chat template renders the messages before {where} plus "
                    "the generation prompt differently from the start of the conversation "
                    "including that message, so its tokens cannot be located"
                )
            span = turn[len(prompt) :]
            end = next((t for t, tid in enumerate(span) if tid in self._special_ids), None)
            if end is None:
                raise ValueError(
                    f"{self.source}: the chat template closes {where} with no special token, so "
                    "there is no end-of-turn token to supervise"
                )
            stop = len(prompt) + end + 1
            if ids[:stop] != turn[:stop]:
                raise TemplatePrefixError(
                    f"{self.source}: the chat template renders the conversation up to the end of "
                    f"{where} differently inside the whole conversation (e.g. it drops earlier "
                    "reasoning), so the tokens the model produced for it are not in the sequence"
                )
            supervised[len(prompt) : stop] = [True] * (stop - len(prompt))
        return supervised

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """The end-of-turn id, then the pipeline tokenizer's eos and the HF eos when they differ."""
        self._check_tokenizer(tokenizer)
        ids = [self.end_id, tokenizer.eos_id]
        if self._tok.eos_token_id is not None:
            ids.append(int(self._tok.eos_token_id))
        return tuple(dict.fromkeys(ids))


def _as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each maximal run of True."""
    runs: list[tuple[int, int]] = []
    start = None
    for t, b in enumerate([*mask, False]):
        if b and start is None:
            start = t
        elif not b and start is not None:
            runs.append((start, t))
            start = None
    return runs


def _stores_chat_template(tokenizer_dir: str | Path) -> bool:
    """Whether the directory stores a chat template (checked from files, transformers unused)."""
    path = Path(tokenizer_dir)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    extra = path / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config}: not valid JSON ({err})") from err
    return isinstance(data, dict) and bool(data.get("chat_template"))


def template_for(tokenizer_dir: str | Path, **template_kwargs: Any) -> HFChatTemplate | None:
    """The directory's own chat template, or None when it has none.

    Args:
        tokenizer_dir: a local HF tokenizer directory (``tokenizer.json`` and its configs).
        template_kwargs: extra template variables, e.g. ``enable_thinking=False``.
    """
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
    if not _stores_chat_template(path):
        return None
    return HFChatTemplate.from_directory(path, **template_kwargs)
