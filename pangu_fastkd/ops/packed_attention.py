"""Packed-sequence (varlen) causal attention with GQA: the public API.

Many documents of different lengths share one row of ``T`` tokens, delimited by ``cu_seqlens``;
no query attends across a document boundary. Conventions are flash-attn's varlen ones (see
``packed_attention_reference``).

Dispatch: CPU tensors go to the C++ kernel ``torch.ops.pangu_fastkd.packed_attention_fwd`` (and
``_bwd`` for autograd); other devices, or a build without the extension, use the reference.
"""

from __future__ import annotations

import math

import torch

from .._native import native_available
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
    if native_available() and all(t.device.type in ("cpu", "meta") for t in (q, k, v)):
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
        window_code = -1 if window is None else int(window)
        out, lse = torch.ops.pangu_fastkd.packed_attention_fwd(
            q, k, v, cu_seqlens, float(scale), bool(causal), window_code
        )
    else:
        out, lse = packed_attention_reference(
            q, k, v, cu_seqlens, causal=causal, softmax_scale=softmax_scale, window=window
        )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the C++ ops.


def _register() -> None:
    @torch.library.register_fake("pangu_fastkd::packed_attention_fwd")
    def _fwd_fake(q, k, v, cu_seqlens, scale, causal, window):
        torch._check(q.dim() == 3 and k.dim() == 3, lambda: "q and k must be [T, H, D]")
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)

    @torch.library.register_fake("pangu_fastkd::packed_attention_bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, scale, causal, window):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, scale, causal, window = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.options = (scale, causal, window)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None, None
        dq, dk, dv = torch.ops.pangu_fastkd.packed_attention_bwd(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.options
        )
        return dq, dk, dv, None, None, None, None

    torch.library.register_autograd(
        "pangu_fastkd::packed_attention_fwd", backward, setup_context=setup_context
    )


if native_available():
    _register()
