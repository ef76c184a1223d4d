"""Packed-sequence causal attention: input checks and the PyTorch reference.

Conventions follow flash-attn's varlen API: ``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``, documents
laid end to end and delimited by ``cu_seqlens [B + 1]`` (int32, starts at 0, non-decreasing, ends
at T; ``data.boundaries`` builds and checks them); query head ``h`` reads kv head
``h // (Hq // Hkv)``; the default scale is ``1 / sqrt(D)``; the log-sum-exp is ``[Hq, T]``
float32. A sliding window of left size ``w`` lets query ``i`` see keys ``i - w .. i`` of its own
document.

The reference runs per document in float32 (float64 for float64 inputs), materialising each
document's ``L x L`` scores: slow, and the oracle of the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ..data.boundaries import check_cu_seqlens
from .input_checks import check_int64

__all__ = [
    "check_packed_inputs",
    "check_qkv",
    "packed_attention_reference",
    "reference_on_bounds",
]


def check_packed_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
) -> list[int]:
    """Raise a clear error for inputs the op does not take; returns the boundaries as host ints."""
    check_qkv(q, k, v, causal=causal, window=window)
    return check_cu_seqlens(cu_seqlens, q.shape[0])


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None
) -> int:
    """The checks that read only shapes and dtypes (no device read-back); returns ``Hq // Hkv``."""
    # A non-bool causal would be read by truthiness: causal=None silently meant full attention.
    if not isinstance(causal, bool):
        raise TypeError(f"packed_attention: causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        # Only an int: a float was truncated (1.5 -> 1), a bool read as 0 or 1, NaN failed in
        # int() and an int beyond int64 raised a RuntimeError of the op's schema.
        check_int64("packed_attention", "window", window)
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
    # Zero query heads would make the GQA group size 0 (a division by zero in the kernel).
    if Hq == 0 or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a positive multiple of kv heads ({Hkv})"
        )
    if D == 0:
        raise ValueError("the head dim must be >= 1, got 0")
    if window is not None:
        if not causal:
            raise ValueError("window (a left window size) needs causal=True")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
    return Hq // Hkv


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
    bounds = check_packed_inputs(q, k, v, cu_seqlens, causal=causal, window=window)
    return reference_on_bounds(
        q, k, v, bounds, causal=causal, softmax_scale=softmax_scale, window=window
    )


def reference_on_bounds(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Sequence[int],
    *,
    causal: bool,
    softmax_scale: float | None,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``packed_attention_reference`` on inputs already checked, the boundaries as host ints."""
    group = q.shape[1] // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
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
