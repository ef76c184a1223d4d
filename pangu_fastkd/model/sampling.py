"""Sampling primitives every backend's ``generate`` shares: the options, the result, the checks
of a batch of prompts, per-prompt seeds and the choice of the next token.

Randomness: every prompt draws from its own ``torch.Generator`` seeded from
``(config.seed, index of the prompt in the list)``, so a result depends on the seed and the
prompt's position, not on ``batch_size`` or on which other prompts share its batch.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Generation",
    "GenerationConfig",
    "as_token_ids",
    "check_prompts",
    "prompt_generators",
    "prompt_seed",
    "sample_tokens",
]


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample.

    Attributes:
        max_new_tokens: most tokens generated per prompt (>= 1).
        temperature: softmax temperature; 0 means greedy (argmax, first index on ties).
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities,
            before the last one, sum to less than ``top_p`` (always at least one); 1 keeps all.
        stop_token_ids: a sequence ends after generating any of these (e.g. the model's
            ``config.eos_token_ids``); it is included in the output.
        seed: seed of the per-prompt generators.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        # A frozen dataclass: normalise a list of stop ids into the declared tuple.
        object.__setattr__(
            self, "stop_token_ids", tuple(as_token_ids(self.stop_token_ids, "stop_token_ids"))
        )


@dataclass
class Generation:
    """One prompt's continuation.

    Attributes:
        tokens: generated tokens only (the stop token included when one ended it).
        stopped: True if a stop token ended it, False if it reached ``max_new_tokens``.
    """

    tokens: list[int]
    stopped: bool


def check_prompts(
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    batch_size: int,
    *,
    vocab_size: int,
    max_positions: int,
) -> list[list[int]]:
    """The prompts as lists of Python ints, after the checks every backend makes.

    Raises:
        TypeError: ``config`` is not a ``GenerationConfig`` or a prompt is not a token-id list.
        ValueError: ``batch_size`` below 1, an empty prompt, an id outside the vocabulary, or a
            prompt whose length plus ``max_new_tokens`` exceeds ``max_positions``.
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for token in config.stop_token_ids:
        if token >= vocab_size:
            raise ValueError(f"stop token {token} is outside the vocabulary [0, {vocab_size})")
    checked: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        ids = as_token_ids(prompt, f"prompts[{index}]")
        if not ids:
            raise ValueError(f"prompts[{index}] is empty; every prompt needs at least one token")
        if max(ids) >= vocab_size:
            raise ValueError(
                f"prompts[{index}] has token id {max(ids)} outside the vocabulary [0, {vocab_size})"
            )
        if len(ids) + config.max_new_tokens > max_positions:
            raise ValueError(
                f"prompts[{index}] has {len(ids)} tokens; with max_new_tokens="
                f"{config.max_new_tokens} it exceeds max_position_embeddings ({max_positions})"
            )
        checked.append(ids)
    return checked


def prompt_generators(
    config: GenerationConfig, start: int, count: int
) -> list[torch.Generator] | None:
    """The generators of prompts ``start .. start + count - 1``; None when sampling is greedy."""
    if config.temperature == 0:
        return None
    return [
        torch.Generator().manual_seed(prompt_seed(config.seed, start + i)) for i in range(count)
    ]


def sample_tokens(
    logits: Tensor,
    config: GenerationConfig,
    generators: list[torch.Generator] | None,
    prompt_indices: list[int],
) -> list[int]:
    """One token per row of ``logits [A, V]`` float32; row ``a`` belongs to batch prompt
    ``prompt_indices[a]`` and draws from that prompt's generator."""
    if config.temperature == 0 or generators is None:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.cpu().double() / config.temperature, dim=-1)  # [A, V]
    chosen = []
    for a, b in enumerate(prompt_indices):
        p = probs[a]
        order = torch.argsort(p, descending=True, stable=True)
        sorted_p = p[order]
        if config.top_p < 1:
            # Keep a token while the mass strictly before it is below top_p: the smallest
            # prefix whose mass reaches top_p, and never empty.
            mass_before = torch.cumsum(sorted_p, dim=0) - sorted_p
            kept = int((mass_before < config.top_p).sum().clamp(min=1))
            sorted_p, order = sorted_p[:kept], order[:kept]
        cdf = torch.cumsum(sorted_p, dim=0)
        u = torch.rand((), generator=generators[b], dtype=torch.float64) * cdf[-1]
        # First bucket whose cdf exceeds u; zero-probability tokens are never chosen.
        pick = int(torch.searchsorted(cdf, u.reshape(1), right=True).clamp(max=cdf.numel() - 1))
        chosen.append(int(order[pick]))
    return chosen


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for prompt ``index``, spread by sha256 so neighbours differ."""
    digest = hashlib.sha256(f"pangu_fastkd.generate:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def as_token_ids(values: object, name: str) -> list[int]:
    """Python ints >= 0 from a sequence of integers (not bools, not floats)."""
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(values).__name__}")
    ids = []
    for value in values:
        if isinstance(value, bool):
            raise TypeError(f"{name} must hold integer token ids, got {value!r}")
        try:
            token = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must hold integer token ids, got {value!r}") from None
        if token < 0:
            raise ValueError(f"{name} has a negative token id {token}")
        ids.append(token)
    return ids
