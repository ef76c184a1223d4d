"""One SFT training step of a transformers ``Qwen3ForCausalLM`` three ways, for bench/bench_hf.py.

A step is forward and backward of the causal-LM cross-entropy (mean over the supervised tokens)
on one batch of documents, each a prompt (unsupervised, label -100) and an answer (labels = the
token ids, aligned with ``input_ids`` as transformers expects; the model shifts them).

- ``hf_padded``: what users write without packing: the documents as a right-padded ``[B, Lmax]``
  batch with an ``attention_mask``, ``attn_implementation="sdpa"``,
  ``model(input_ids, attention_mask=..., labels=...).loss`` (all ``[B*Lmax, V]`` logits built).
- ``hf_packed_sdpa``: transformers' own packing: ``DataCollatorWithFlattening`` makes one row
  ``[1, T]`` with ``position_ids`` restarting at each document and ``-100`` at each document's
  first label; ``sdpa``, whose mask transformers builds as a dense ``[T, T]`` block-diagonal
  causal mask from the ``position_ids``; the model's own loss. ``use_cache=False`` is required:
  transformers detects packed documents from ``position_ids`` only when there is no KV cache,
  and ``Qwen3Model`` makes one by default (then documents attend to each other).
- ``pangu_fastkd``: the same packed row, ``attn_implementation="pangu_fastkd"``
  (``pangu_fastkd.hf.register_attention``: the packed-attention kernel per document, no mask)
  and ``pangu_fastkd.hf.causal_lm_loss`` (final hidden states and ``lm_head.weight`` into
  ``fused_linear_cross_entropy``; the logits are never built).

All three hold bit-identical weights (``build_model``: the same seed, initialised in float32,
then cast) and see the same tokens, so they compute the same loss up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from train_step_baselines import document_lengths

from pangu_fastkd.hf import causal_lm_loss, register_attention, require_transformers
from pangu_fastkd.model import ModelConfig

__all__ = [
    "PROVIDERS",
    "SHAPES",
    "HFBatch",
    "HFShape",
    "build_model",
    "hf_packed_sdpa_loss",
    "hf_padded_loss",
    "make_batch",
    "pangu_fastkd_loss",
]

IGNORE_INDEX = -100
PAD_ID = 0  # any id: padded positions are masked out of attention and carry label -100


@dataclass(frozen=True)
class HFShape:
    """A ``Qwen3Config`` shape and its default batch size T (tokens, padding excluded)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    t: int

    def config(self):  # -> transformers.Qwen3Config
        """The transformers config: random-weight model, no download, attention dropout 0."""
        transformers = require_transformers()
        return transformers.Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=max(4096, self.t),
            attention_dropout=0.0,
        )


def _openpangu_1b_2l() -> HFShape:
    """openPangu-1B's widths (the project's preset) cut to 2 layers, as a Qwen3 (qk-norm, no
    attention biases: Qwen3 has none; the head is tied like openPangu's)."""
    p = ModelConfig.preset("openpangu-1b", 153_376)
    return HFShape(
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_layers=2,
        num_heads=p.num_attention_heads,
        num_kv_heads=p.num_key_value_heads,
        head_dim=p.resolved_head_dim,
        vocab_size=p.vocab_size,
        tie_word_embeddings=p.tie_word_embeddings,
        rope_theta=p.rope_theta,
        rms_norm_eps=p.rms_norm_eps,
        t=4096,
    )


SHAPES = {
    # smoke runs and tests: awkward vocabulary, GQA 4/2
    "tiny": HFShape(64, 160, 2, 4, 2, 16, 503, False, 10_000.0, 1e-6, 96),
    "small": HFShape(512, 1408, 4, 8, 4, 64, 32_000, False, 1_000_000.0, 1e-6, 2048),
    "openpangu-1b-2l": _openpangu_1b_2l(),
}


# ---------------------------------------------------------------------------------------------
# Batch


@dataclass
class HFBatch:
    """The same documents padded and packed.

    Attributes:
        lengths: the ``B`` document lengths (sum T).
        padded_ids: ``[B, Lmax]`` int64, right-padded with ``PAD_ID``.
        padded_mask: ``[B, Lmax]`` int64, 1 on real tokens.
        padded_labels: ``[B, Lmax]`` int64 labels aligned with the ids, -100 on prompts and pads.
        packed_ids: ``[1, T]`` int64 (``DataCollatorWithFlattening``).
        packed_labels: ``[1, T]`` int64, -100 on prompts and each document's first token.
        position_ids: ``[1, T]`` int64, restarting at 0 at each document.
    """

    lengths: list[int]
    padded_ids: Tensor
    padded_mask: Tensor
    padded_labels: Tensor
    packed_ids: Tensor
    packed_labels: Tensor
    position_ids: Tensor

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_supervised(self) -> int:
        """Tokens the loss averages over: supervised labels with a predecessor in their document."""
        return int((self.packed_labels != IGNORE_INDEX).sum())


def make_batch(t: int, n_docs: int, vocab_size: int, seed: int = 0) -> HFBatch:
    """``n_docs`` documents of mixed lengths (about 1:6, ``document_lengths``) summing to ``t``.

    Each document's first 25-50% of tokens are its prompt (unsupervised), the rest its answer.
    """
    transformers = require_transformers()
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    lengths = document_lengths(t, n_docs, seed)  # raises on t < 2 * n_docs
    gen = torch.Generator().manual_seed(seed)
    features = []
    for length in lengths:
        ids = torch.randint(0, vocab_size, (length,), generator=gen)
        prompt = max(1, int(length * (0.25 + 0.25 * torch.rand((), generator=gen).item())))
        labels = ids.clone()
        labels[: min(prompt, length - 1)] = IGNORE_INDEX
        features.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")(features)

    l_max = max(lengths)
    padded_ids = torch.full((len(lengths), l_max), PAD_ID, dtype=torch.long)
    padded_mask = torch.zeros((len(lengths), l_max), dtype=torch.long)
    padded_labels = torch.full((len(lengths), l_max), IGNORE_INDEX, dtype=torch.long)
    for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
        padded_ids[row, :length] = torch.tensor(feature["input_ids"])
        padded_mask[row, :length] = 1
        padded_labels[row, :length] = torch.tensor(feature["labels"])
    return HFBatch(
        lengths=lengths,
        padded_ids=padded_ids,
        padded_mask=padded_mask,
        padded_labels=padded_labels,
        packed_ids=packed["input_ids"],
        packed_labels=packed["labels"],
        position_ids=packed["position_ids"],
    )


# ---------------------------------------------------------------------------------------------
# Models and losses


def hf_padded_loss(model: nn.Module, batch: HFBatch) -> Tensor:
    """Padded batch, sdpa with the padding mask, the model's loss on materialised logits."""
    out = model(
        input_ids=batch.padded_ids,
        attention_mask=batch.padded_mask,
        labels=batch.padded_labels,
        use_cache=False,
    )
    return out.loss


def hf_packed_sdpa_loss(model: nn.Module, batch: HFBatch) -> Tensor:
    """One packed row, sdpa on transformers' block-diagonal mask, the model's loss."""
    # use_cache=False: with a cache (Qwen3Model makes one by default) transformers ignores the
    # position_ids when building the mask and the documents attend to each other.
    out = model(
        input_ids=batch.packed_ids,
        position_ids=batch.position_ids,
        labels=batch.packed_labels,
        use_cache=False,
    )
    return out.loss


def pangu_fastkd_loss(model: nn.Module, batch: HFBatch) -> Tensor:
    """One packed row, the packed-attention kernel, the fused LM-head cross-entropy."""
    return causal_lm_loss(
        model, batch.packed_ids, batch.packed_labels, position_ids=batch.position_ids
    )


LossFn = Callable[[nn.Module, HFBatch], Tensor]
PROVIDERS: dict[str, LossFn] = {
    "hf_padded": hf_padded_loss,
    "hf_packed_sdpa": hf_packed_sdpa_loss,
    "pangu_fastkd": pangu_fastkd_loss,
}
ATTN_IMPLEMENTATION = {
    "hf_padded": "sdpa",
    "hf_packed_sdpa": "sdpa",
    "pangu_fastkd": "pangu_fastkd",
}


def build_model(provider: str, shape: HFShape, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """``Qwen3ForCausalLM`` with random weights (``from_config``, nothing downloaded) in
    ``dtype``, with the provider's attention implementation, in training mode.

    The weights are drawn in float32 from ``torch.manual_seed(seed)`` and then cast, so every
    provider gets the same weights in every dtype.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {tuple(PROVIDERS)}, got {provider!r}")
    if not isinstance(shape, HFShape):
        raise TypeError(f"shape must be an HFShape, got {type(shape).__name__}")
    transformers = require_transformers()
    attn = ATTN_IMPLEMENTATION[provider]
    if attn == "pangu_fastkd":
        register_attention()
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM._from_config(
        shape.config(), attn_implementation=attn, dtype=torch.float32
    )
    return model.to(dtype).train()
