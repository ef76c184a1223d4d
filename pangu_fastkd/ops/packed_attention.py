"""Packed-sequence (varlen) causal attention with GQA: the public API.

Many documents of different lengths share one row of ``T`` tokens, delimited by ``cu_seqlens``;
no query attends across a document boundary. Conventions are flash-attn's varlen ones (see
``packed_attention_reference``).

Status: this build runs the PyTorch reference on every device (per-document math attention,
autograd backward). The C++ CPU kernel of issue 3 will take CPU tensors behind the same API.
"""

from __future__ import annotations

import torch

from .packed_attention_reference import check_packed_inputs, packed_attention_reference

__all__ = ["packed_attention"]


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed documents.

    Args:
        q: ``[T, Hq, D]`` queries.
        k: ``[T, Hkv, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (query head ``h`` reads kv
            head ``h // (Hq // Hkv)``).
        v: ``[T, Hkv, D]`` values.
        cu_seqlens: ``[B + 1]`` int32 document boundaries (0, ..., T); see
            ``cu_seqlens_from_lengths`` and ``cu_seqlens_from_position_ids``.
        max_seqlen: the longest document, if the caller knows it (checked, not trusted).
        causal: each query sees only keys at or before it.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        window: sliding window, left size: query ``i`` sees keys ``i - window .. i`` (causal only).
        return_lse: also return the log-sum-exp of the scaled scores.

    Returns:
        ``out [T, Hq, D]`` in q's dtype, and ``lse [Hq, T]`` float32 when ``return_lse``.
    """
    _, longest = check_packed_inputs(q, k, v, cu_seqlens, causal=causal, window=window)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(
            f"max_seqlen={max_seqlen} is shorter than the longest document ({longest})"
        )
    out, lse = packed_attention_reference(
        q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale, window=window
    )
    return (out, lse) if return_lse else out
