"""Packed-sequence (varlen) causal attention with GQA: the public API.

Many documents of different lengths share one row of ``T`` tokens, delimited by ``cu_seqlens``;
no query attends across a document boundary. Conventions are flash-attn's varlen ones (see
``packed_attention_reference``).

Dispatch (``attention_route``): CPU tensors go to the C++ kernel
``torch.ops.pangu_fastkd.packed_attention_fwd`` (and ``_bwd`` for autograd). ``npu`` tensors go to
the same op when the build has its Ascend C kernel, else to ``torch_npu.npu_fusion_attention`` in
TND layout, else (a sliding window, which that fallback is not wired for) to the reference. Other
devices, or a build without the extension, use the reference. Nothing on the NPU paths has been
run on Ascend hardware yet (docs/ascend.md).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Sequence
from typing import Literal

import torch

from .._native import native_available, npu_kernel_available
from ..data.boundaries import PackedDocuments
from .input_checks import (
    check_finite_rows,
    check_int64,
    check_positive_finite,
    check_same_device,
)
from .packed_attention_reference import check_packed_inputs, check_qkv, reference_on_bounds

__all__ = ["attend_documents", "attention_route", "packed_attention"]

AttentionRoute = Literal["cpu_kernel", "npu_kernel", "npu_fusion_attention", "reference"]
# npu_fusion_attention's causal modes take a compressed 2048 x 2048 mask (True = masked), whatever
# the sequence lengths (torch_npu docs, sparse_mode 2/3/4).
_NPU_CAUSAL_MASK_SIZE = 2048


def _device_type(t: torch.Tensor) -> str:
    """The tensor's device type (one function, so tests can pretend tensors are on the NPU)."""
    return t.device.type


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
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed documents.

    Args:
        q: ``[T, Hq, D]`` queries.
        k: ``[T, Hkv, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (query head ``h`` reads kv
            head ``h // (Hq // Hkv)``).
        v: ``[T, Hkv, D]`` values.
        cu_seqlens: ``[B + 1]`` int32 document boundaries (0, ..., T); see
            ``data.boundaries.cu_seqlens_from_lengths`` and ``cu_seqlens_from_position_ids``.
        max_seqlen: the longest document, if the caller knows it (checked, not trusted).
        causal: each query sees only keys at or before it.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        window: sliding window, left size: query ``i`` sees keys ``i - window .. i`` (causal only).
        return_lse: also return the log-sum-exp of the scaled scores.
        check_finite: raise ``NonFiniteError`` naming the tensor and its first bad token when
            q, k or v hold NaN or an infinity, or the output does (the scores overflowed); see
            ``docs/non-finite.md``.

    Returns:
        ``out [T, Hq, D]`` in q's dtype, and ``lse [Hq, T]`` float32 (float64 for float64
        inputs) when ``return_lse``.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices, boundaries or options.
        NonFiniteError: with ``check_finite``, as above.
    """
    _check_devices(q, k, v, cu_seqlens)
    scale = _checked_scale(q, softmax_scale)
    if check_finite:
        check_finite_rows("packed_attention", {"q": q, "k": k, "v": v})
    bounds = check_packed_inputs(q, k, v, cu_seqlens, causal=causal, window=window)
    longest = max(end - start for start, end in itertools.pairwise(bounds))
    if max_seqlen is not None:
        # An int: a NaN compared False with the longest document and passed unchecked.
        check_int64("packed_attention", "max_seqlen", max_seqlen)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(
            f"max_seqlen={max_seqlen} is shorter than the longest document ({longest})"
        )
    result = _attend(q, k, v, cu_seqlens, bounds, causal, scale, window, return_lse)
    if check_finite:
        out = result[0] if return_lse else result
        check_finite_rows("packed_attention (its output)", {"out": out})
    return result


def _check_devices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> None:
    """q, k and v on one device; cu_seqlens there or on the CPU, never on ``meta`` (its values
    are read)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"packed_attention: {name} must be a tensor, got {type(t).__name__}")
    check_same_device("packed_attention", {"q": q, "k": k, "v": v})
    if cu.device.type == "meta" or (cu.device != q.device and cu.device.type != "cpu"):
        raise ValueError(
            f"packed_attention: cu_seqlens is on {cu.device}; it must be on q's device "
            f"({q.device}) or the CPU, with values"
        )


def _checked_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    """``softmax_scale``, checked finite and > 0, or ``1 / sqrt(D)``."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 3 and q.shape[-1] > 0 else 1.0
    return check_positive_finite("packed_attention", "softmax_scale", softmax_scale)


def attend_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: PackedDocuments,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """``packed_attention`` over boundaries a model checked once for all its layers.

    The model path: ``documents`` comes from ``data.boundaries.resolve_documents`` and is
    trusted, so a layer reads nothing back from the device (only shapes are checked here).

    Args:
        q, k, v: as ``packed_attention``, on ``documents.cu_seqlens``' device.
        documents: the row's checked boundaries; ``documents.total`` must be ``T``.

    Returns:
        ``out [T, Hq, D]`` in q's dtype.
    """
    check_qkv(q, k, v, causal=causal, window=window)
    if q.shape[0] != documents.total:
        raise ValueError(f"q has {q.shape[0]} tokens, the documents cover {documents.total}")
    return _attend(
        q,
        k,
        v,
        documents.cu_seqlens,
        documents.bounds,
        causal,
        _checked_scale(q, softmax_scale),
        window,
        False,
    )


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bounds: Sequence[int],
    causal: bool,
    softmax_scale: float | None,
    window: int | None,
    return_lse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The dispatch of checked inputs; ``bounds`` are ``cu_seqlens`` as host ints."""
    route = attention_route(q, k, v, causal=causal, window=window)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    if route in ("cpu_kernel", "npu_kernel"):
        # The dispatcher picks the CPU or the NPU (PrivateUse1) kernel of the op by device.
        window_code = -1 if window is None else int(window)
        out, lse = torch.ops.pangu_fastkd.packed_attention_fwd(
            q, k, v, cu_seqlens, float(scale), bool(causal), window_code
        )
    elif route == "npu_fusion_attention":
        out, lse = _npu_fusion_attention(q, k, v, bounds, float(scale), causal, return_lse)
    else:
        out, lse = reference_on_bounds(
            q, k, v, bounds, causal=causal, softmax_scale=softmax_scale, window=window
        )
    return (out, lse) if return_lse else out


def attention_route(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
) -> AttentionRoute:
    """Which implementation ``packed_attention`` runs for these tensors.

    Args:
        q, k, v: the attention inputs (their devices, dtype and head size matter).
        causal: the Ascend C kernel is causal only.
        window: the sliding window; neither the Ascend C kernel nor the
            ``npu_fusion_attention`` fallback takes one.

    Returns:
        ``"cpu_kernel"`` (C++), ``"npu_kernel"`` (Ascend C), ``"npu_fusion_attention"``
        (torch_npu's fused op) or ``"reference"`` (plain PyTorch).
    """
    devices = {_device_type(t) for t in (q, k, v)}
    if native_available() and devices <= {"cpu", "meta"}:
        return "cpu_kernel"
    if devices == {"npu"}:
        if npu_kernel_available("packed_attention_fwd") and _ascend_kernel_takes(q, causal, window):
            return "npu_kernel"
        torch_npu = sys.modules.get("torch_npu")  # imported by whoever made the npu tensors
        if window is None and hasattr(torch_npu, "npu_fusion_attention"):
            return "npu_fusion_attention"
    return "reference"


def _ascend_kernel_takes(q: torch.Tensor, causal: bool, window: int | None) -> bool:
    """Whether the Ascend C kernel covers this call: causal, no window, fp32/bf16/fp16, D % 16 == 0.

    The kernel's tiling moves whole 32-byte blocks of a head row and the cube takes float, bf16
    and fp16 here (forward and backward); anything else goes to ``npu_fusion_attention`` or the
    reference instead of failing inside the op.
    """
    head_dim = q.shape[-1]
    return (
        causal
        and window is None
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and head_dim % 16 == 0
        and 16 <= head_dim <= 512
    )


@functools.cache
def _npu_causal_mask(device: torch.device) -> torch.Tensor:
    """The ``[2048, 2048]`` bool upper triangle (True = masked) sparse_mode 3 takes, made once
    per device: it is 4 MB, and building and copying it on every call costs a host-to-device
    transfer per attention layer."""
    mask = torch.ones(_NPU_CAUSAL_MASK_SIZE, _NPU_CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(mask, diagonal=1)


def _npu_fusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: Sequence[int],
    scale: float,
    causal: bool,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``torch_npu.npu_fusion_attention`` in TND layout: out ``[T, Hq, D]``, lse ``[Hq, T]``.

    TND takes the packed ``[T, N, D]`` tensors as they are, with the documents given by their
    cumulative ends (``bounds[1:]``, host ints, so nothing is read back here); GQA is native
    (``head_num`` is the query head count, k/v carry fewer heads). sparse_mode 3 is causal aligned
    to the bottom right, which for square per-document blocks is plain causal. Autograd is
    torch_npu's.
    """
    torch_npu = sys.modules["torch_npu"]
    ends = [int(e) for e in bounds[1:]]
    options: dict = {"scale": scale, "actual_seq_qlen": ends, "actual_seq_kvlen": ends}
    if causal:
        options.update(sparse_mode=3, atten_mask=_npu_causal_mask(q.device))
    else:
        options.update(sparse_mode=0)
    result = torch_npu.npu_fusion_attention(q, k, v, q.shape[1], "TND", **options)
    out = result[0]
    if not return_lse:
        return out, None
    # softmax_max and softmax_sum are [T, Hq, 8] (the value repeated 8 times); lse = max + log(sum).
    softmax_max, softmax_sum = result[1], result[2]
    lse = softmax_max[..., 0].float() + torch.log(softmax_sum[..., 0].float())
    return out, lse.transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the C++ ops.


def _check_fake_devices(*tensors: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Every tensor argument of the op on one device, ``cu_seqlens`` there or on the CPU (the
    fake kernel's check)."""
    device = tensors[0].device
    for t in (*tensors, cu_seqlens):
        other = t.device
        torch._check_value(
            other == device or (t is cu_seqlens and other.type == "cpu"),
            lambda other=other: (
                f"packed_attention: tensor arguments on {device} and {other}; "
                "every tensor argument must be on one device"
            ),
        )


def _register() -> None:
    @torch.library.register_fake("pangu_fastkd::packed_attention_fwd")
    def _fwd_fake(q, k, v, cu_seqlens, scale, causal, window):
        # Reached with a meta tensor among real ones too: refuse it rather than hand out
        # uninitialised memory (or a meta output) for real inputs.
        _check_fake_devices(q, k, v, cu_seqlens=cu_seqlens)
        torch._check(q.dim() == 3 and k.dim() == 3, lambda: "q and k must be [T, H, D]")
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)

    @torch.library.register_fake("pangu_fastkd::packed_attention_bwd")
    def _bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens, scale, causal, window):
        _check_fake_devices(grad_out, q, k, v, out, lse, cu_seqlens=cu_seqlens)
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
