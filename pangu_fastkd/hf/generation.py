"""Decoding an ``HFCausalLM`` with transformers' ``generate``, sampling by our own rules.

Our packed attention refuses KV-cache decoding, so a decode switches the model to SDPA for its
duration; tokens are drawn by ``model.sampling`` with per-prompt generators, so an HF model and
the embedded ``DecoderLM`` sample alike from the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..model.sampling import Generation, GenerationConfig, prompt_generators, sample_tokens
from ._require import require_transformers

if TYPE_CHECKING:
    from .model import HFCausalLM

__all__ = ["DECODE_ATTENTION", "generate_hf"]

# Decoding needs a KV cache, which pangu_fastkd attention refuses; SDPA is in every torch build.
# Architectures transformers does not run on SDPA (Gemma-2's attention softcap) decode eagerly.
DECODE_ATTENTION = "sdpa"
FALLBACK_DECODE_ATTENTION = "eager"


@torch.no_grad()
def generate_hf(
    model: HFCausalLM,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    batch_size: int = 16,
) -> list[Generation]:
    """``HFCausalLM.generate`` on prompts it has checked (``sampling.check_prompts``: non-empty,
       in the vocabulary, within ``max_position_embeddings``), through transformers' ``generate``.
    Each batch is left-padded and decoded with SDPA
       attention (switched back to ``pangu_fastkd`` afterwards) and a neutral transformers
       generation config, so the model's own ``generation_config.json`` (top-k, repetition
       penalty, ...) does not leak in. Tokens are picked by transformers' greedy argmax; with
       ``temperature > 0`` a logits processor first draws the token with ``generate``'s own
       sampler and per-prompt generators, so a prompt's sample depends on the seed and its index,
       not on ``batch_size``.

       Returns:
           One ``Generation`` per prompt, in order.
    """
    transformers = require_transformers()
    hf_model = model.hf_model
    device = hf_model.get_input_embeddings().weight.device
    stop_ids = list(config.stop_token_ids)
    # Any id will do for padding: padded positions are masked and the tokens after a stop are
    # cut off below by position, never by value.
    pad_id = stop_ids[0] if stop_ids else 0
    hf_config = transformers.GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id,
        use_cache=True,
    )

    saved_attention = hf_model.config._attn_implementation
    saved_generation_config = hf_model.generation_config
    results: list[Generation] = []
    try:
        try:
            hf_model.set_attn_implementation(DECODE_ATTENTION)
        except ValueError:
            hf_model.set_attn_implementation(FALLBACK_DECODE_ATTENTION)
        hf_model.generation_config = transformers.GenerationConfig()
        for start in range(0, len(prompts), batch_size):
            batch = [list(p) for p in prompts[start : start + batch_size]]
            processors = transformers.LogitsProcessorList()
            generators = prompt_generators(config, start, len(batch))
            if generators is not None:
                processors.append(_SampleProcessor(config, generators))
            width = max(len(p) for p in batch)
            # Left padding: every prompt's last token sits in the last column, where decoding
            # continues; the mask hides the padding and transformers derives positions from it.
            ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
            mask = torch.zeros((len(batch), width), dtype=torch.int64)
            for row, prompt in enumerate(batch):
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            out = hf_model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=hf_config,
                logits_processor=processors,
            )
            new_tokens = out[:, width:].tolist()
            results.extend(_as_generation(row, stop_ids) for row in new_tokens)
    finally:
        hf_model.generation_config = saved_generation_config
        hf_model.set_attn_implementation(saved_attention)
    return results


def _as_generation(tokens: list[int], stop_ids: list[int]) -> Generation:
    """Cut a row of generated ids after its first stop token (the rest is padding)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(tokens=tokens[: index + 1], stopped=True)
    return Generation(tokens=tokens, stopped=False)


class _SampleProcessor:
    """A transformers logits processor that samples with ``generate``'s rules and generators.

    Returns scores that are ``-inf`` except at the drawn token of each row, so transformers'
    greedy argmax takes exactly that token. Row ``b`` of the batch is prompt ``b`` (transformers
    keeps finished rows in the batch; their extra draws are discarded with their tokens).
    """

    def __init__(self, config: GenerationConfig, generators: list[torch.Generator]) -> None:
        self.config = config
        self.generators = generators

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        rows = list(range(scores.shape[0]))
        chosen = sample_tokens(scores.float(), self.config, self.generators, rows)
        out = torch.full_like(scores, float("-inf"))
        index = torch.tensor(chosen, device=scores.device)[:, None]
        return out.scatter(1, index, 0.0)
