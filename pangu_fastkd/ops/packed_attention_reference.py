"""Packed-sequence causal attention: cu_seqlens helpers, input checks and the PyTorch reference.

Conventions follow flash-attn's varlen API: ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``, documents
laid end to end and delimited by ``cu_seqlens [B + 1]`` (int32, starts at 0, non-decreasing, ends
at T); query head ``h`` reads kv head ``h // (Hq // Hkv)``; the default scale is ``1 / sqrt(D)``;
the log-sum-exp is ``[Hq, T]`` float32. A sliding window of left size ``w`` lets query ``i`` see
keys ``i - w .. i`` of its own document.

The reference runs per document in float32 (float64 for float64 inputs), materialising each
document's ``L x L`` scores: slow, and the oracle of the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_packed_inputs",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "packed_attention_reference",
]


def cu_seqlens_from_lengths(lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Cumulative document boundaries from document lengths.

    Args:
        lengths: ``[B]`` non-negative document lengths.

    Returns:
        ``[B + 1]`` int32 ``cu_seqlens`` starting at 0.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64).flatten()
    if bool((lengths < 0).any()):
        raise ValueError(f"document lengths must be >= 0, got {lengths.tolist()}")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=cu[1:])
    if int(cu[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(f"total length {int(cu[-1])} does not fit cu_seqlens' int32")
    return cu.to(torch.int32)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a packed row whose positions restart at 0 for each document.

    This is the layout Hugging Face's ``DataCollatorWithFlattening`` produces.

    Args:
        position_ids: ``[T]`` or ``[1, T]`` integer positions, 0 at the first token of each document
            and increasing by 1 inside it.

    Returns:
        ``[B + 1]`` int32 ``cu_seqlens``.
    """
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.is_floating_point():
        raise ValueError(
            f"position_ids must be an integer [T] or [1, T] tensor, got {position_ids.dtype} "
            f"of shape {tuple(position_ids.shape)}"
        )
    pos = position_ids.long().cpu()
    T = pos.numel()
    if T == 0:
        return torch.zeros(1, dtype=torch.int32)
    if int(pos[0]) != 0:
        raise ValueError(f"position_ids must start at 0, got {int(pos[0])}")
    starts = (pos == 0).nonzero().squeeze(1)
    inside = pos[1:] != 0
    if bool((pos[1:][inside] != pos[:-1][inside] + 1).any()):
        bad = int(((pos[1:] != pos[:-1] + 1) & inside).nonzero()[0, 0]) + 1
        raise ValueError(f"position_ids must count up by 1 inside a document (index {bad})")
    return torch.cat([starts, torch.tensor([T])]).to(torch.int32)


def check_packed_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
) -> tuple[int, int]:
    """Raise a clear error for inputs the op does not take; returns ``(Hq // Hkv, max length)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    T, Hq, D = q.shape
    if k.shape[0] != T:
        raise ValueError(f"k and v must have T = {T} tokens like q, got {k.shape[0]}")
    if k.shape[2] != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {k.shape[2]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.long().cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    if int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {int(cu[-1])}")
    if window is not None:
        if not causal:
            raise ValueError("window (a left window size) needs causal=True")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
    return Hq // Hkv, int((cu[1:] - cu[:-1]).max())


def packed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document math attention.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``; cu_seqlens: ``[B + 1]`` int32.
        causal: mask keys after the query; window: left window size (needs causal).

    Returns:
        ``(out [T, Hq, D] in q's dtype, lse [Hq, T] float32)``, differentiable through autograd.
    """
    group, _ = check_packed_inputs(q, k, v, cu_seqlens, causal=causal, window=window)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for start, end in itertools.pairwise(bounds):
        L = end - start
        qd = q[start:end].to(acc).transpose(0, 1)  # [Hq, L, D]
        kd = k[start:end].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        vd = v[start:end].to(acc).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qd @ kd.transpose(1, 2)) * scale  # [Hq, L, L]
        # On q's device: an NPU falls back to this reference, and a CPU mask would not mix.
        i = torch.arange(L, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        allowed = torch.ones(L, L, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= j >= i - window
        scores = scores.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(scores, dim=2)  # [Hq, L]
        probs = torch.exp(scores - lse[:, :, None])
        outs.append((probs @ vd).transpose(0, 1))  # [L, Hq, D]
        lses.append(lse)
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape, dtype=acc)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=acc)
    return out.to(q.dtype), lse.float()
