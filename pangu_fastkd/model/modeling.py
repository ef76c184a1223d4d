"""A Llama-family decoder (openPangu-Embedded, Llama, Qwen2/3) over packed rows.

One row of ``T`` tokens holds many documents end to end; attention never crosses a document
boundary (``ops.packed_attention``) and RoPE positions restart at 0 in each document, so a packed
row computes exactly what the documents would compute one by one.

Data flow, top to bottom::

    input_ids [T] -> embed_tokens -> x [T, hidden]
    for each layer:  x = x + o_proj(attention(rope(q, k), v))   (RMSNorm before, GQA)
                     x = x + down_proj(silu(gate_proj(x)) * up_proj(x))   (RMSNorm before)
    norm(x) [T, hidden]  -> the training loss takes these with ``output_weight``
    logits = norm(x) @ output_weight.T [T, V]

Parameter names are Hugging Face Llama's without the ``model.`` prefix (see ``checkpoint``).

Activation checkpointing (``DecoderLM.set_activation_checkpointing``): a checkpointed layer keeps
only its input ``x [T, hidden]`` for backward and runs its forward again there
(``torch.utils.checkpoint``, non-reentrant), instead of keeping every intermediate (q, k, v, the
attention's output and lse, the MLP's ``[T, intermediate]`` products).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..data.boundaries import resolve_documents
from ..ops.packed_attention import attend_documents
from .config import ModelConfig
from .generation import decode_with_kv_cache
from .sampling import Generation, GenerationConfig, check_prompts

__all__ = [
    "Attend",
    "DecoderLM",
    "apply_rope",
    "init_weights",
    "rope_cos_sin",
]

# attend(layer_index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]: how a layer's
# queries meet keys. Training uses packed attention; generation also reads and writes a KV cache.
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# RMSNorm and RoPE


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the input dtype: Hugging Face Llama's order, so bf16
        # checkpoints round the same way they do there.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """RoPE tables of Hugging Face Llama ("rotate_half" layout), in float32.

    Channel ``i`` and ``i + head_dim / 2`` rotate together by ``position * theta^(-2i/head_dim)``.

    Args:
        positions: ``[T]`` integer positions (restarting at 0 in each document).
        head_dim: even per-head width ``D``.
        theta: the RoPE base.

    Returns:
        ``(cos, sin)``, each ``[T, D]`` float32.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponents.float() / head_dim))  # [D/2], computed as HF does
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [T, H, D]`` by the ``[T, D]`` float32 tables; the math runs in float32."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)  # rotate_half
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Layers


class Attention(nn.Module):
    """q/k/v projections (optional bias and q/k RMSNorm), RoPE, and the output projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        hidden, q_width = config.hidden_size, self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=config.o_proj_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [T, hidden]`` -> rotated ``q [T, Hq, D]``, rotated ``k`` and ``v [T, Hkv, D]``."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention block and pre-norm MLP block, each with a residual connection.

    Attributes:
        activation_checkpointing: recompute this layer's activations in backward (training with
            gradients only); ``DecoderLM.set_activation_checkpointing`` sets it.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.activation_checkpointing = False

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attend: Callable[[Tensor, Tensor, Tensor], Tensor],
    ) -> Tensor:
        """``x [T, hidden]`` -> ``[T, hidden]``; ``cos``/``sin`` ``[T, D]`` float32 RoPE tables;
        ``attend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]``."""
        if not (self.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return self._block(x, cos, sin, attend)
        # Checkpointed inside forward, not around the module call, so that module hooks (FSDP2's
        # all-gather and reshard) stay outside the recomputed region and do not run again in
        # backward. Non-reentrant: it takes the packed-attention op's saved tensors through
        # saved-tensor hooks, replays autocast as the forward had it, and works under DDP and
        # FSDP2. The layer draws no random numbers (no dropout), so the recompute is the same
        # computation; preserve_rng_state stays on for whoever adds one.
        return checkpoint(self._block, x, cos, sin, attend, use_reentrant=False)

    def _block(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attend: Callable[[Tensor, Tensor, Tensor], Tensor],
    ) -> Tensor:
        T = x.shape[0]
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        x = x + self.self_attn.o_proj(attend(q, k, v).reshape(T, -1))  # [T, Hq, D] -> [T, Hq*D]
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# The model


class DecoderLM(nn.Module):
    """Decoder-only language model over packed rows.

    Attributes:
        config: the ``ModelConfig``.
        embed_tokens: ``[V, hidden]`` token embedding.
        layers: the decoder layers.
        norm: the final RMSNorm.
        lm_head: ``[V, hidden]`` LM head, or None when tied to ``embed_tokens``.
        backend: ``"embedded"``, the loader's name for this backend.
        output_bias: None (the head has no bias), as the ``CausalLM`` protocol asks.
        logit_softcap: None (no softcap).
    """

    backend = "embedded"
    output_bias: Tensor | None = None
    logit_softcap: float | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
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

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute the activations of every ``every``-th layer (0, every, 2 * every, ...) in
        backward instead of keeping them; 0 turns it off, 1 checkpoints every layer.

        Applies in training mode with gradients enabled only; eval, scoring and generation run
        the layers as they are. Call it before ``fully_shard``/DDP or after: the layers read the
        flag at each forward.

        Raises:
            ValueError: ``every`` is not an int >= 0.
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: off, 1: every layer), got {every!r}")
        for index, layer in enumerate(self.layers):
            layer.activation_checkpointing = every > 0 and index % every == 0

    def hidden_states(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Final-normed hidden states of one packed row.

        Args:
            input_ids: ``[T]`` int64 (or int32) token ids, ``T >= 1``.
            cu_seqlens: ``[B + 1]`` int32 document boundaries (0, ..., T).
            position_ids: ``[T]`` (or ``[1, T]``) positions restarting at 0 in each document, the
                layout of Hugging Face's ``DataCollatorWithFlattening``. Give at most one of
                ``cu_seqlens`` and ``position_ids``; neither means one document.

        Returns:
            ``[T, hidden]`` in the model's dtype. The training loss is
            ``ops.fused_linear_sparse_kd(hidden, model.output_weight, labels, target)``.
        """
        input_ids = self._check_input_ids(input_ids)
        limit = self.config.max_position_embeddings
        # One check for all layers: every layer's attention trusts these documents.
        documents = resolve_documents(input_ids, cu_seqlens, position_ids, max_positions=limit)

        def attend(_layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return attend_documents(q, k, v, documents)

        return self.run_decoder(input_ids, documents.positions, attend)

    def run_decoder(self, input_ids: Tensor, positions: Tensor, attend: Attend) -> Tensor:
        """The layers with a caller-chosen attention; ``hidden_states`` and generation use it.

        Args:
            input_ids: ``[T]`` token ids (already checked).
            positions: ``[T]`` int64 RoPE positions.
            attend: ``attend(layer_index, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])`` returns
                ``[T, Hq, D]``.

        Returns:
            Final-normed hidden states ``[T, hidden]``.
        """
        cos, sin = rope_cos_sin(positions, self.config.resolved_head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)  # [T, hidden]
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, functools.partial(attend, index))
        return self.norm(x)

    def forward(
        self,
        input_ids: Tensor,
        cu_seqlens: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[T, V]`` float32 of one packed row; arguments as ``hidden_states``."""
        hidden = self.hidden_states(input_ids, cu_seqlens, position_ids)
        return F.linear(hidden, self.output_weight).float()

    def weights_fingerprint(self) -> str:
        """sha256 (hex) over the config fingerprint and every tensor's name, dtype, shape, bytes.

        Stable across processes and machines for the same weights in the same dtype; used as
        provenance of caches and rollouts.
        """
        digest = hashlib.sha256(self.config.fingerprint().encode("utf-8"))
        hash_tensors(digest, self.state_dict())
        return digest.hexdigest()

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, batch_size: int = 16
    ) -> list[Generation]:
        """Continue every prompt, ``batch_size`` prompts at a time, with a KV cache.

        Args:
            prompts: non-empty token-id lists, ids in ``[0, vocab_size)``.
            config: sampling options.
            batch_size: prompts per prefill/decode batch; greedy results do not depend on it.

        Returns:
            One ``Generation`` per prompt, in order.

        Raises:
            ValueError: an empty prompt, an id outside the vocabulary, or a prompt whose length
                plus ``max_new_tokens`` exceeds ``max_position_embeddings``.
        """
        checked = check_prompts(
            prompts,
            config,
            batch_size,
            vocab_size=self.config.vocab_size,
            max_positions=self.config.max_position_embeddings,
        )
        return decode_with_kv_cache(self, checked, config, batch_size)

    def _check_input_ids(self, input_ids: Tensor) -> Tensor:
        return check_packed_input_ids(input_ids, self.config.vocab_size)


def hash_tensors(digest: hashlib._Hash, tensors: dict[str, Tensor]) -> None:
    """Feeds every tensor's name, dtype, shape and bytes, in name order, into ``digest``.

    The weights part of a model's fingerprint (``DecoderLM`` and ``hf.HFCausalLM``): stable across
    processes and machines for the same weights in the same dtype.
    """
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)


def check_packed_input_ids(input_ids: Tensor, vocab_size: int) -> Tensor:
    """``input_ids`` checked to be one non-empty packed row ``[T]`` of ids in ``[0, vocab_size)``.

    Raises:
        TypeError: not an int64/int32 tensor.
        ValueError: not one non-empty row, or an id outside the vocabulary.
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(
            f"input_ids must be one non-empty packed row [T], got shape {tuple(input_ids.shape)}"
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must be in [0, {vocab_size}), got values in [{low}, {high}]")
    return input_ids


@torch.no_grad()
def init_weights(model: DecoderLM, seed: int) -> None:
    """Deterministic initialisation for training from scratch.

    Linear and embedding weights ~ N(0, 0.02); the projections that write into the residual
    stream (``o_proj``, ``down_proj``) ~ N(0, 0.02 / sqrt(2 * num_layers)) so the residual's
    variance does not grow with depth (GPT-2); biases 0; RMSNorm weights 1. Values are drawn in
    float32 on the CPU from one generator in parameter order, so the result does not depend on
    the model's device or dtype.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(f"model must be a DecoderLM, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    std = 0.02
    residual_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape)
        elif name.endswith(".bias"):
            value = torch.zeros(param.shape)
        else:
            scale = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            value = torch.randn(param.shape, generator=generator) * scale
        param.copy_(value)
