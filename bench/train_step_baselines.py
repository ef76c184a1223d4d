"""One student training step two ways, for bench/bench_train_step.py and its tests.

A step is forward, loss, backward and the AdamW update on one packed batch (documents laid end
to end, ``pangu_fastkd.data.pack_examples`` labels), with the loss
``kd_weight * KL(teacher top-K || student) + (1 - kd_weight) * CE`` on the supervised rows
(forward KL, missing mass as one "tail" bucket, label-conditioned, mean; docs/kd-losses.md).

- ``pangu_fastkd``: ``DecoderLM.hidden_states`` (the packed-attention kernel in every layer), then
  ``fused_linear_sparse_kd`` on the supervised rows: the LM-head logits are never materialised.
- ``pangu_fastkd+ckpt``: the same with activation checkpointing on every layer
  (``DecoderLM.set_activation_checkpointing(1)``, what ``activation_checkpointing = true`` sets):
  each layer keeps only its input for backward and runs its forward again there.
- ``plain``: ``PlainDecoderLM`` below, the same architecture with its attention written the way
  Hugging Face Llama writes it ([1, H, T, D] layout, ``F.scaled_dot_product_attention`` with a
  dense ``[T, T]`` block-diagonal causal mask; the norms, MLP and projections are the model's
  own modules, which compute as Llama's), then ``sparse_kd_reference`` on the supervised rows, which
  materialises the ``[n, V]`` logits ``hidden[rows] @ W.T`` and their log-softmax as users write
  it.

Both models hold the same weights: ``build_model`` initialises a ``DecoderLM`` with
``init_weights`` and, for ``plain``, moves its tensors into a ``PlainDecoderLM`` whose parameter
names are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from packed_attention_baselines import block_causal_mask
from torch import Tensor, nn

from pangu_fastkd.data import PackedBatch, TokenizedExample, pack_examples
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights
from pangu_fastkd.model.modeling import MLP, Attention, RMSNorm, rope_cos_sin
from pangu_fastkd.ops import TopKTarget, fused_linear_sparse_kd, sparse_kd_reference

__all__ = [
    "PROVIDERS",
    "PlainDecoderLM",
    "TrainBatch",
    "build_model",
    "document_lengths",
    "make_optimizer",
    "make_train_batch",
    "pangu_fastkd_loss",
    "plain_loss",
    "random_topk_target",
    "train_step",
]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# The plain-PyTorch model (Hugging Face Llama's way of writing it)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class PlainAttention(Attention):
    """GQA self-attention through one SDPA call with a dense mask over the packed row.

    The projections (and optional q/k RMSNorm) are the model's own ``Attention``: the same
    parameters and the same math in both providers. What this baseline writes the way Hugging
    Face Llama does is the rest: the ``[1, H, T, D]`` layout, RoPE applied in the model dtype and
    one ``scaled_dot_product_attention`` call over the whole row with a dense mask.
    """

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """``x [1, T, hidden]``, ``cos``/``sin [T, D]`` in x's dtype, ``mask [T, T]`` bool."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # [1, T, Hq, D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # [1, T, Hkv, D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, H, T, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # [1, T, Hq*D]
        return self.o_proj(out)


class PlainDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections; the norms and the SwiGLU
    MLP are the model's (``RMSNorm``, ``MLP``), which compute as Hugging Face Llama's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = PlainAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class PlainDecoderLM(nn.Module):
    """The decoder of ``pangu_fastkd.model.DecoderLM`` in plain PyTorch, same parameter names.

    What differs is only how it computes: a batch dimension of 1 and heads before tokens
    (``[1, H, T, D]``), RoPE tables cast to the model dtype and applied in it (HF Llama; the
    project's model rotates in float32), and attention as one SDPA call over the whole packed
    row with a dense ``[T, T]`` block-diagonal causal mask built every step.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            PlainDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head: nn.Linear | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> Tensor:
        """The LM head ``[V, hidden]`` (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``[T, D]``: the model's float32 tables, cast to the model dtype (HF)."""
        cos, sin = rope_cos_sin(positions, self.config.resolved_head_dim, self.config.rope_theta)
        return cos.to(dtype), sin.to(dtype)

    def hidden_states(self, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Final-normed hidden states ``[T, hidden]`` of one packed row.

        Args:
            input_ids: ``[T]`` int64 token ids.
            cu_seqlens: ``[B + 1]`` int32 document boundaries (0, ..., T).
        """
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be [T], got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[0]
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(
                f"cu_seqlens must be [B + 1] from 0 to T = {T}, got {cu_seqlens.tolist()}"
            )
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        positions = torch.cat([torch.arange(n) for n in lengths])  # [T], 0 at each document start
        mask = block_causal_mask(lengths)  # [T, T] bool
        cos, sin = self._rope(positions, self.embed_tokens.weight.dtype)
        x = self.embed_tokens(input_ids)[None]  # [1, T, hidden]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)[0]  # [T, hidden]


# ---------------------------------------------------------------------------------------------
# Batch and teacher target


def document_lengths(t: int, n_docs: int, seed: int) -> list[int]:
    """``n_docs`` mixed lengths (about 1:6 from shortest to longest) summing to ``t``.

    Every document has at least two tokens: one prompt token and one answer token.
    """
    if n_docs < 1 or t < 2 * n_docs:
        raise ValueError(
            f"need n_docs >= 1 and T >= 2 * n_docs (two tokens per document), "
            f"got T = {t}, n_docs = {n_docs}"
        )
    gen = torch.Generator().manual_seed(seed)
    shares = 0.25 + 1.25 * torch.rand(n_docs, generator=gen, dtype=torch.float64)
    spare = t - 2 * n_docs
    lengths = [2 + int(x) for x in (shares / shares.sum() * spare).floor()]
    lengths[-1] += t - sum(lengths)  # the rounding remainder
    return lengths


@dataclass
class TrainBatch:
    """One packed batch and its teacher target, shared by both providers.

    Attributes:
        packed: the ``PackedBatch`` (``input_ids [T]``, ``labels [T]``, ``cu_seqlens [B + 1]``).
        rows: ``[n]`` int64 positions of the supervised tokens (``labels != -100``).
        labels: ``[n]`` int64 labels of those rows.
        target: top-K teacher target of those rows, ``ids [n, K]`` int32, ``logits [n, K]``,
            ``lse [n]``, ``label_logit [n]`` float32 (what the logit cache stores).
    """

    packed: PackedBatch
    rows: Tensor
    labels: Tensor
    target: TopKTarget

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens


def make_train_batch(t: int, n_docs: int, vocab_size: int, top_k: int, seed: int = 0) -> TrainBatch:
    """A packed batch of exactly ``t`` tokens in ``n_docs`` documents, with a top-K target.

    Each document is a prompt (the first 25-50% of its tokens, unsupervised) and an answer
    (supervised) of random token ids; ``pack_examples`` sets the labels, so prompt tokens and
    each document's last token are -100.
    """
    if top_k < 1 or top_k > vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size = {vocab_size}], got {top_k}")
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, length in enumerate(document_lengths(t, n_docs, seed)):
        ids = torch.randint(0, vocab_size, (length,), generator=gen).tolist()
        prompt = max(1, int(length * (0.25 + 0.25 * torch.rand((), generator=gen).item())))
        prompt = min(prompt, length - 1)
        supervised = (False,) * prompt + (True,) * (length - prompt)
        examples.append(TokenizedExample(f"doc{i}", tuple(ids), supervised))
    (packed,) = pack_examples(examples, budget=t)  # sum of lengths == t: one batch
    rows = (packed.labels != IGNORE_INDEX).nonzero().squeeze(1)  # [n]
    labels = packed.labels[rows]
    target = random_topk_target(labels, vocab_size, top_k, seed=seed + 1)
    return TrainBatch(packed=packed, rows=rows, labels=labels, target=target)


def random_topk_target(labels: Tensor, vocab_size: int, top_k: int, seed: int = 0) -> TopKTarget:
    """A valid random top-K target for ``labels [n]``: distinct ids, teacher mass below 1.

    Ids: one random id in each of K vocabulary strata, so they are distinct without an
    ``[n, V]`` permutation. In half of the rows the label replaces the id of its stratum, so the
    label conditioning takes both paths (label inside and outside the top-K). The support holds
    60-95% of the teacher's mass (``lse`` is set so), as a real teacher's top-K does.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be [n], got shape {tuple(labels.shape)}")
    if top_k < 1 or top_k > vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size = {vocab_size}], got {top_k}")
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    stride = vocab_size // top_k
    ids = torch.randint(0, stride, (n, top_k), generator=gen) + torch.arange(top_k) * stride
    stratum = labels.long() // stride  # [n]
    put_label = (torch.rand(n, generator=gen) < 0.5) & (stratum < top_k)
    row_index = put_label.nonzero().squeeze(1)
    ids[row_index, stratum[row_index]] = labels[row_index].long()
    teacher_logits = 2 * torch.randn(n, top_k, generator=gen) + 8  # [n, K]

    label_match = ids == labels.long()[:, None]  # [n, K]
    label_in_topk = label_match.any(1)
    logit_if_in = teacher_logits.masked_fill(~label_match, -math.inf).max(1).values
    label_logit = torch.where(label_in_topk, logit_if_in, teacher_logits.min(1).values - 1)

    extra = label_logit.masked_fill(label_in_topk, -math.inf)[:, None]  # the added label bucket
    support_lse = torch.logsumexp(torch.cat([teacher_logits, extra], 1), dim=1)  # [n]
    mass = 0.6 + 0.35 * torch.rand(n, generator=gen)
    return TopKTarget(
        ids=ids.to(torch.int32),
        logits=teacher_logits,
        lse=support_lse - mass.log(),
        label_logit=label_logit,
    )


# ---------------------------------------------------------------------------------------------
# Models, losses, the step


PROVIDER_NAMES = ("pangu_fastkd", "pangu_fastkd+ckpt", "plain")


def build_model(provider: str, config: ModelConfig, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The provider's model with ``init_weights(seed)`` weights in ``dtype``.

    Both providers get bit-identical weights: the plain model takes over the tensors of an
    initialised ``DecoderLM`` (``load_state_dict(assign=True)``, no copy, tied embeddings
    kept tied).
    """
    if provider not in PROVIDER_NAMES:
        raise ValueError(f"provider must be one of {PROVIDER_NAMES}, got {provider!r}")
    model = DecoderLM(config)
    init_weights(model, seed)
    model.to(dtype)
    if provider == "pangu_fastkd":
        return model
    if provider == "pangu_fastkd+ckpt":
        model.set_activation_checkpointing(1)  # applies in training mode, a new module's mode
        return model
    with torch.device("meta"):
        plain = PlainDecoderLM(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    return plain


def make_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW over every parameter; ``fused=True``, the fastest implementation on CPU.

    Its state has the parameters' dtype (bf16 parameters: bf16 moments, and updates below half
    a bf16 ulp of a weight are lost: the step's cost is what is measured here, not its quality).
    """
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)


def pangu_fastkd_loss(model: nn.Module, batch: TrainBatch, kd_weight: float) -> Tensor:
    """Packed-attention hidden states, then the fused LM-head loss on the supervised rows."""
    packed = batch.packed
    hidden = model.hidden_states(packed.input_ids, packed.cu_seqlens)  # [T, hidden]
    return fused_linear_sparse_kd(
        hidden[batch.rows], model.output_weight, batch.labels, batch.target, kd_weight=kd_weight
    )


def plain_loss(model: nn.Module, batch: TrainBatch, kd_weight: float) -> Tensor:
    """Dense-mask SDPA hidden states, then the materialised-logits loss on the supervised rows."""
    packed = batch.packed
    hidden = model.hidden_states(packed.input_ids, packed.cu_seqlens)  # [T, hidden]
    loss, _stats = sparse_kd_reference(
        hidden[batch.rows], model.output_weight, batch.labels, batch.target, kd_weight=kd_weight
    )
    return loss


LossFn = Callable[[nn.Module, TrainBatch, float], Tensor]
PROVIDERS: dict[str, LossFn] = {
    "pangu_fastkd": pangu_fastkd_loss,
    "pangu_fastkd+ckpt": pangu_fastkd_loss,  # the checkpointing is the model's
    "plain": plain_loss,
}


def train_step(
    provider: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    kd_weight: float,
) -> Tensor:
    """Forward, loss, backward and ``optimizer.step()``; returns the detached scalar loss.

    Gradients are left in ``.grad`` (the caller clears them, ``optimizer.zero_grad()``).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {tuple(PROVIDERS)}, got {provider!r}")
    loss = PROVIDERS[provider](model, batch, kd_weight)
    loss.backward()
    optimizer.step()
    return loss.detach()
