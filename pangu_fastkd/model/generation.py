"""Batched sampling from a ``DecoderLM`` with a KV cache.

Per batch of prompts: one prefill packs the prompts into a row and runs the model's own layers
with ``ops.packed_attention`` (the training path), storing every layer's rotated keys and values
into a per-sequence cache; then each decode step feeds one token per unfinished sequence, whose
query attends to that sequence's cache through SDPA with a padding mask. Finished sequences are
dropped from the cache, so later steps only pay for the live ones.

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.packed_attention import packed_attention
from ..ops.packed_attention_reference import cu_seqlens_from_lengths
from .modeling import Attend, DecoderLM

if TYPE_CHECKING:
    from ..hf.model import HFCausalLM

__all__ = ["Generation", "GenerationConfig", "generate"]


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
            self, "stop_token_ids", tuple(_as_token_ids(self.stop_token_ids, "stop_token_ids"))
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


@torch.no_grad()
def generate(
    model: DecoderLM | HFCausalLM,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
) -> list[Generation]:
    """Continue every prompt, ``batch_size`` prompts at a time.

    Args:
        model: the decoder (any device and floating dtype; the cache uses its dtype), or an
            ``HFCausalLM``, decoded by transformers' ``generate`` (``hf.model.generate_hf``).
        prompts: non-empty token-id lists, ids in ``[0, vocab_size)``.
        config: sampling options.
        batch_size: prompts per prefill/decode batch; greedy results do not depend on it.

    Returns:
        One ``Generation`` per prompt, in order.

    Raises:
        ValueError: an empty prompt, an id outside the vocabulary, or a prompt whose length plus
            ``max_new_tokens`` exceeds the model's ``max_position_embeddings``.
    """
    if not isinstance(model, DecoderLM):
        # Imported here: pangu_fastkd.hf imports this module (and never transformers at import).
        from ..hf.model import HFCausalLM, generate_hf

        if not isinstance(model, HFCausalLM):
            raise TypeError(
                f"model must be a DecoderLM or an HFCausalLM, got {type(model).__name__}"
            )
        # The checks below are shared (HFCausalLM.config has vocab_size and
        # max_position_embeddings); then generate_hf decodes with transformers.
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    vocab_size = model.config.vocab_size
    limit = model.config.max_position_embeddings
    for token in config.stop_token_ids:
        if token >= vocab_size:
            raise ValueError(f"stop token {token} is outside the vocabulary [0, {vocab_size})")
    checked: list[list[int]] = []
    for index, prompt in enumerate(prompts):
        ids = _as_token_ids(prompt, f"prompts[{index}]")
        if not ids:
            raise ValueError(f"prompts[{index}] is empty; every prompt needs at least one token")
        if max(ids) >= vocab_size:
            raise ValueError(
                f"prompts[{index}] has token id {max(ids)} outside the vocabulary [0, {vocab_size})"
            )
        if len(ids) + config.max_new_tokens > limit:
            raise ValueError(
                f"prompts[{index}] has {len(ids)} tokens; with max_new_tokens="
                f"{config.max_new_tokens} it exceeds max_position_embeddings ({limit})"
            )
        checked.append(ids)
    if not isinstance(model, DecoderLM):
        return generate_hf(model, checked, config, batch_size=batch_size)

    results: list[Generation] = []
    for start in range(0, len(checked), batch_size):
        batch = checked[start : start + batch_size]
        generators = None
        if config.temperature > 0:
            generators = [
                torch.Generator().manual_seed(_prompt_seed(config.seed, start + i))
                for i in range(len(batch))
            ]
        results.extend(_generate_batch(model, batch, config, generators))
    return results


# ---------------------------------------------------------------------------------------------
# One batch


class _KVCache:
    """Rotated keys and values of each live sequence: per layer ``[B, Hkv, capacity, D]``."""

    def __init__(self, model: DecoderLM, batch: int, capacity: int) -> None:
        cfg = model.config
        weight = model.embed_tokens.weight
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.resolved_head_dim)
        self.keys = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        self.values = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, capacity: int) -> None:
        """Grow the position axis to at least ``capacity`` (doubling, to amortise copies)."""
        if capacity <= self.capacity:
            return
        new_capacity = max(capacity, 2 * self.capacity)
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                grown = t.new_zeros((*t.shape[:2], new_capacity, t.shape[3]))
                grown[:, :, : t.shape[2]] = t
                cache[i] = grown

    def keep(self, rows: Tensor) -> None:
        """Keep only the sequences at ``rows`` (in that order)."""
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                cache[i] = t[rows]

    def prefill(
        self, rows: Tensor, positions: Tensor, cu_seqlens: Tensor, max_seqlen: int
    ) -> Attend:
        """Packed attention over the prompts that also stores each token's key and value.

        Args:
            rows: ``[T]`` cache row (sequence) of each packed token.
            positions: ``[T]`` position of each token in its sequence.
            cu_seqlens: ``[B + 1]`` int32 prompt boundaries of the packed row.
            max_seqlen: the longest prompt.
        """

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.keys[layer][rows, :, positions] = k  # [T, Hkv, D] into each sequence's slots
            self.values[layer][rows, :, positions] = v
            return packed_attention(q, k, v, cu_seqlens, max_seqlen)

        return attend

    def decode(self, positions: Tensor) -> Attend:
        """Attention of one new token per live sequence against that sequence's cache.

        Args:
            positions: ``[A]`` slot of each live sequence's new token (its length so far).
        """
        span = int(positions.max()) + 1
        self.reserve(span)
        rows = torch.arange(positions.shape[0], device=positions.device)
        # mask[a, j]: sequence a's query sees slot j, its own tokens up to the new one.
        slots = torch.arange(span, device=positions.device)
        mask = (slots[None, :] <= positions[:, None])[:, None, None, :]  # [A, 1, 1, span]

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.keys[layer][rows, :, positions] = k  # [A, Hkv, D]
            self.values[layer][rows, :, positions] = v
            out = F.scaled_dot_product_attention(
                q.unsqueeze(2),  # [A, Hq, 1, D]
                self.keys[layer][:, :, :span],  # [A, Hkv, span, D]
                self.values[layer][:, :, :span],
                attn_mask=mask,
                enable_gqa=True,  # as packed_attention: query head h reads kv head h // (Hq // Hkv)
            )
            return out.squeeze(2)  # [A, Hq, D]

        return attend


def _generate_batch(
    model: DecoderLM,
    prompts: list[list[int]],
    config: GenerationConfig,
    generators: list[torch.Generator] | None,
) -> list[Generation]:
    device = model.embed_tokens.weight.device
    lengths = [len(p) for p in prompts]
    batch = len(prompts)
    stop_ids = set(config.stop_token_ids)
    # Positions the cache must hold: the prompt plus every generated token fed back in (the
    # last generated token is never fed back). Start small; reserve() grows it by doubling.
    final_capacity = max(lengths) + config.max_new_tokens - 1
    cache = _KVCache(model, batch, min(final_capacity, max(lengths) + 32))

    # Prefill: all prompts as one packed row, through the training path's packed attention.
    cu_seqlens = cu_seqlens_from_lengths(lengths).to(device)
    input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    row = torch.repeat_interleave(
        torch.arange(batch, device=device), torch.tensor(lengths, device=device)
    )
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])  # [T]

    attend = cache.prefill(row, positions, cu_seqlens, max(lengths))
    hidden = model.run_decoder(input_ids, positions, attend)  # [T, hidden]
    last_hidden = hidden[cu_seqlens[1:].long() - 1]  # [B, hidden]: each prompt's last token
    logits = F.linear(last_hidden, model.output_weight).float()  # [B, V]

    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * batch
    live = list(range(batch))  # cache row r holds prompt live[r]
    # Slot of each live sequence's next fed-back token: its length so far.
    next_position = torch.tensor(lengths, dtype=torch.int64, device=device)  # [A]
    while True:
        chosen = _sample(logits, config, generators, live)
        still_live_rows = []
        for r, (b, token) in enumerate(zip(live, chosen, strict=True)):
            tokens[b].append(token)
            if token in stop_ids:
                stopped[b] = True
            elif len(tokens[b]) < config.max_new_tokens:
                still_live_rows.append(r)
        if not still_live_rows:
            break
        if len(still_live_rows) < len(live):
            keep = torch.tensor(still_live_rows, dtype=torch.int64, device=device)
            cache.keep(keep)
            next_position = next_position[keep]
            live = [live[r] for r in still_live_rows]
        step_ids = torch.tensor([tokens[b][-1] for b in live], dtype=torch.int64, device=device)
        attend = cache.decode(next_position)
        hidden = model.run_decoder(step_ids, next_position, attend)  # [A, hidden]
        logits = F.linear(hidden, model.output_weight).float()  # [A, V]
        next_position = next_position + 1
    return [Generation(tokens=t, stopped=s) for t, s in zip(tokens, stopped, strict=True)]


# ---------------------------------------------------------------------------------------------
# Sampling


def _sample(
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


def _prompt_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for prompt ``index``, spread by sha256 so neighbours differ."""
    digest = hashlib.sha256(f"pangu_fastkd.generate:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _as_token_ids(values: object, name: str) -> list[int]:
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
