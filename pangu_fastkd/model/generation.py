"""Batched decoding of a ``DecoderLM`` with a KV cache (``DecoderLM.generate``).

Per batch of prompts: one prefill packs the prompts into a row and runs the model's own layers
with the training path's packed attention, storing every layer's rotated keys and values
into a per-sequence cache; then each decode step feeds one token per unfinished sequence, whose
query attends to that sequence's cache through SDPA with a padding mask. Finished sequences are
dropped from the cache, so later steps only pay for the live ones. Sampling and the per-prompt
generators are ``model.sampling``'s, shared with the Hugging Face backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.boundaries import PackedDocuments, cu_seqlens_from_lengths, resolve_documents
from ..ops.packed_attention import attend_documents
from .sampling import Generation, GenerationConfig, prompt_generators, sample_tokens

if TYPE_CHECKING:
    # Types only: modeling imports this module for DecoderLM.generate.
    from .modeling import Attend, DecoderLM

__all__ = ["decode_with_kv_cache"]


@torch.no_grad()
def decode_with_kv_cache(
    model: DecoderLM, prompts: list[list[int]], config: GenerationConfig, batch_size: int
) -> list[Generation]:
    """Continue prompts already checked by ``sampling.check_prompts``, ``batch_size`` at a time.

    Returns:
        One ``Generation`` per prompt, in order.
    """
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = prompt_generators(config, start, len(batch))
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

    def prefill(self, rows: Tensor, documents: PackedDocuments) -> Attend:
        """Packed attention over the prompts that also stores each token's key and value.

        Args:
            rows: ``[T]`` cache row (sequence) of each packed token.
            documents: the prompts' boundaries and positions in the packed row.
        """
        positions = documents.positions

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.keys[layer][rows, :, positions] = k  # [T, Hkv, D] into each sequence's slots
            self.values[layer][rows, :, positions] = v
            return attend_documents(q, k, v, documents)

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
    input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    documents = resolve_documents(input_ids, cu_seqlens_from_lengths(lengths))
    row = torch.repeat_interleave(
        torch.arange(batch, device=device), torch.tensor(lengths, device=device)
    )

    attend = cache.prefill(row, documents)
    hidden = model.run_decoder(input_ids, documents.positions, attend)  # [T, hidden]
    last_hidden = hidden[documents.cu_seqlens[1:].long() - 1]  # [B, hidden]: each last token
    logits = F.linear(last_hidden, model.output_weight).float()  # [B, V]

    tokens: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * batch
    live = list(range(batch))  # cache row r holds prompt live[r]
    # Slot of each live sequence's next fed-back token: its length so far.
    next_position = torch.tensor(lengths, dtype=torch.int64, device=device)  # [A]
    while True:
        chosen = sample_tokens(logits, config, generators, live)
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
