"""``attn_implementation="pangu_fastkd"``: transformers attention on our packed-attention op.

``register_attention()`` adds two entries under one name:

- to ``transformers.AttentionInterface``, ``packed_attention_forward``, which runs
  ``pangu_fastkd.ops.packed_attention`` on the documents of a packed batch;
- to ``transformers.masking_utils.AttentionMaskInterface``, ``packed_attention_mask``, which
  builds no ``T x T`` mask: document boundaries travel as ``position_ids`` or ``cu_seq_lens_*``
  kwargs, the way ``DataCollatorWithFlattening`` produces them.

This is a training / scoring implementation: full-sequence forward passes without padding.
Generation with a KV cache (decoding, where the query is shorter than the keys) is refused;
generate with ``"sdpa"`` or ``"eager"`` (``model.set_attn_implementation("sdpa")``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.boundaries import PackedDocuments, cu_seqlens_from_position_ids
from ..ops.packed_attention import attend_documents, packed_attention
from ._require import require_transformers

__all__ = [
    "DOCUMENTS_KWARG",
    "packed_attention_forward",
    "packed_attention_mask",
    "register_attention",
]

DEFAULT_NAME = "pangu_fastkd"
# The kwarg through which ``HFCausalLM`` hands every layer the boundaries it checked once for
# the whole forward (a ``PackedDocuments``), so no layer re-checks or reads them back.
DOCUMENTS_KWARG = "pangu_fastkd_documents"

# kwargs some architectures pass to their attention function that change the math; we do not
# implement them, so they must fail loudly instead of being dropped.
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit softcapping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "additive position bias",
}


def register_attention(name: str = DEFAULT_NAME) -> None:
    """Register ``packed_attention_forward`` and ``packed_attention_mask`` under ``name``.

    Idempotent. Afterwards ``from_config(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` selects them. Refuses to replace another library's
    function under the same name (e.g. ``"sdpa"``).
    """
    transformers = require_transformers()
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    for interface, fn in (
        (transformers.AttentionInterface, packed_attention_forward),
        (AttentionMaskInterface, packed_attention_mask),
    ):
        existing = interface._global_mapping.get(name)
        # Compared by module, not identity, so a reloaded pangu_fastkd can re-register.
        if existing is not None and getattr(existing, "__module__", None) != __name__:
            raise ValueError(
                f"{interface.__name__} already has {name!r} -> {existing!r} from "
                f"{getattr(existing, '__module__', '?')}; choose another name"
            )
        interface.register(name, fn)


def packed_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    *,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function: ``None`` (no mask) unless there are padded tokens.

    Args:
        batch_size, q_length, kv_length: sizes transformers computed for the mask.
        attention_mask: the user's 2D ``[B, kv_length]`` padding mask (bool), if any.
        use_vmap: transformers sets it when the model overlays custom mask functions (e.g. image
            tokens attending bidirectionally), which this implementation cannot express.

    Returns:
        ``None``, or the 2D ``[B, kv_length]`` bool padding mask when it masks something, so that
        ``packed_attention_forward`` can refuse it with a clear message.
    """
    if use_vmap:
        raise ValueError(
            "pangu_fastkd attention supports plain causal (or sliding-window) masks only; this "
            "model overlays a custom mask function (or_mask_function/and_mask_function)"
        )
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one layer over the documents of a packed batch.

    Documents come from, in this order: a ``PackedDocuments`` under ``DOCUMENTS_KWARG``
    (``HFCausalLM``'s, already checked, trusted); else ``cu_seq_lens_q``/``cu_seq_lens_k``
    (+ ``max_length_q``) kwargs (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``);
    else ``position_ids`` restarting at 0 at each document start (packing needs ``B == 1``; with
    ``B > 1`` each row must be one document); else each row is one document.

    Args:
        module: the attention layer (read for ``is_causal``).
        query: ``[B, Hq, L, D]``.
        key: ``[B, Hkv, L, D]``; ``Hq`` a multiple of ``Hkv``.
        value: ``[B, Hkv, L, D]``.
        attention_mask: must be ``None`` (see ``packed_attention_mask``): padding is refused.
        scaling: softmax scale, default ``1 / sqrt(D)``.
        dropout: attention dropout probability; only 0 is supported.
        **kwargs: ``position_ids [1 or B, L]``, ``cu_seq_lens_q/k [docs + 1]``,
            ``max_length_q/k``, ``sliding_window`` (HF's: a query sees itself and the
            ``sliding_window - 1`` keys before it), ``is_causal``.

    Returns:
        ``(out [B, L, Hq, D], None)``: transformers' layout; no attention weights.
    """
    if dropout and dropout > 0.0:
        raise ValueError(
            f"pangu_fastkd attention does not implement attention dropout (got dropout={dropout}); "
            "set the config's attention_dropout to 0 or use another attn_implementation"
        )
    for kwarg, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(kwarg) is not None:
            raise ValueError(f"pangu_fastkd attention does not support {what} ({kwarg}=...)")
    chunk = getattr(getattr(module, "config", None), "attention_chunk_size", None)
    if chunk is not None:
        # Llama4-style chunked attention restricts keys to the query's chunk: a mask this kernel
        # does not draw, and ignoring it would silently change the model.
        raise ValueError(
            f"pangu_fastkd attention does not support chunked attention (attention_chunk_size="
            f"{chunk}); use another attn_implementation for this model"
        )
    if attention_mask is not None:
        raise ValueError(
            "pangu_fastkd attention got an attention_mask with padded tokens (shape "
            f"{tuple(attention_mask.shape)}); it takes unpadded packed batches: flatten the "
            "sequences (DataCollatorWithFlattening) and pass position_ids or cu_seq_lens_* instead"
        )
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query, key and value must be [B, H, L, D], got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    B, Hq, L, D = query.shape
    if key.shape[2] != L:
        raise ValueError(
            f"pangu_fastkd attention needs as many keys as queries, got query length {L} and key "
            f"length {key.shape[2]} (KV-cache decoding); generate with attn_implementation='sdpa'"
        )

    window = _window(kwargs.get("sliding_window"), L)
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))

    # [B, H, L, D] -> [B * L, H, D]: rows laid end to end, so a row boundary is a document one.
    q = query.transpose(1, 2).reshape(B * L, Hq, D)
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], value.shape[3])
    documents = kwargs.get(DOCUMENTS_KWARG)
    if isinstance(documents, PackedDocuments):
        if B != 1:
            raise ValueError(f"{DOCUMENTS_KWARG} describes one packed row, got a batch of {B}")
        out = attend_documents(
            q, k, v, documents, causal=causal, softmax_scale=scaling, window=window
        )
    else:
        cu_seqlens, max_seqlen = _documents(B, L, query.device, kwargs)
        out = packed_attention(
            q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scaling, window=window
        )
    return out.view(B, L, Hq, v.shape[2]), None


def _documents(
    B: int, L: int, device: torch.device, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, int | None]:
    """``(cu_seqlens [docs + 1] int32, max_seqlen or None)`` over the ``B * L`` flattened tokens."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        return _documents_from_cu_seq_lens(B, L, device, kwargs)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return _documents_from_position_ids(B, L, device, position_ids), None
    # No boundaries given: each row is one document.
    return torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device), L


def _documents_from_cu_seq_lens(
    B: int, L: int, device: torch.device, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, int | None]:
    """Boundaries from flash-attention varlen kwargs; q and k must describe the same documents."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:
        cu_q = cu_k
    if cu_k is not None and (cu_k.shape != cu_q.shape or not torch.equal(cu_k, cu_q)):
        raise ValueError(
            "pangu_fastkd attention is self-attention over the same documents: cu_seq_lens_k must "
            f"equal cu_seq_lens_q, got {cu_q.tolist()} and {cu_k.tolist()}"
        )
    if B != 1:
        raise ValueError(f"cu_seq_lens_* describe one packed row, so the batch must be 1, got {B}")
    if cu_q.dim() != 1 or cu_q.is_floating_point():
        raise ValueError(
            f"cu_seq_lens_q must be a 1D integer tensor, got {cu_q.dtype} {tuple(cu_q.shape)}"
        )
    if cu_q.numel() < 2 or int(cu_q[0]) != 0 or int(cu_q[-1]) != L:
        raise ValueError(
            f"cu_seq_lens_q must run from 0 to the sequence length {L}, got {cu_q.tolist()}"
        )
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    lengths = [int(m) for m in (max_q, max_k) if m is not None]
    if len(set(lengths)) > 1:
        raise ValueError(f"max_length_q ({max_q}) and max_length_k ({max_k}) must be equal")
    # packed_attention checks the boundaries are non-decreasing and max_seqlen covers them.
    return cu_q.to(device=device, dtype=torch.int32), (lengths[0] if lengths else None)


def _documents_from_position_ids(
    B: int, L: int, device: torch.device, position_ids: torch.Tensor
) -> torch.Tensor:
    """Boundaries where positions restart at 0; with ``B > 1`` every row must be one document."""
    if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
        raise ValueError(
            f"position_ids must be [1, {L}] or [{B}, {L}], got shape {tuple(position_ids.shape)}"
        )
    if B == 1:
        return cu_seqlens_from_position_ids(position_ids).to(device)
    # transformers passes [1, L] arange positions for an ordinary unpadded batch.
    row = torch.arange(L, device=position_ids.device)
    if not bool((position_ids == row).all()):
        raise ValueError(
            f"packing documents needs batch size 1 (got {B} rows whose position_ids are not "
            "0..L-1): flatten the batch into one row (DataCollatorWithFlattening)"
        )
    return torch.arange(0, B * L + 1, L, dtype=torch.int32, device=device)


def _window(sliding_window: int | None, L: int) -> int | None:
    """HF's ``sliding_window`` (keys seen, counting the query itself) as our left ``window``."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        raise ValueError(f"sliding_window must be an int or None, got {sliding_window!r}")
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
    # A window at least as long as the row masks nothing; skip it (the kernel's full path).
    return None if sliding_window >= L else sliding_window - 1
