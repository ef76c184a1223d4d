"""``packed_attention_fwd`` / ``_bwd`` on a backend against the reference + autograd, and timing.

The forward row checks (out, lse), the fwd+bwd row the gradients of q, k and v from our backward
on our forward's outputs; timed against ``torch_npu.npu_fusion_attention`` in TND layout (the
project's own fallback) where the backend has it, and the reference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from ..data.boundaries import cu_seqlens_from_lengths
from ..ops.packed_attention_reference import packed_attention_reference
from .cases import AttentionCase
from .compare import Row, compare, judge
from .errors import first_line
from .op_backends import Backend
from .timing import Timer, time_baseline

Attention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _attention_inputs(
    case: AttentionCase, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k/v [T, Hkv, D], grad_out [T, Hq, D] in ``dtype``; cu_seqlens [B + 1]."""
    g = torch.Generator().manual_seed(case.seed)
    t = sum(case.lengths)
    q = torch.randn(t, case.hq, case.d, generator=g).to(dtype)
    k = torch.randn(t, case.hkv, case.d, generator=g).to(dtype)
    v = torch.randn(t, case.hkv, case.d, generator=g).to(dtype)
    grad_out = torch.randn(t, case.hq, case.d, generator=g).to(dtype)
    return q, k, v, grad_out, cu_seqlens_from_lengths(case.lengths)


def _plain_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention with every product and the softmax in the inputs' dtype.

    ``packed_attention_reference`` computes in float32 whatever the inputs, so it cannot stand
    for "plain PyTorch in bf16"; this is the baseline of tests/test_ascend_host_attention.py.
    Returns ``out [T, Hq, D]`` in the inputs' dtype and ``lse [Hq, T]`` float32.
    """
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for start, end in itertools.pairwise(cu.tolist()):
        qd = q[start:end].transpose(0, 1)  # [Hq, L, D]
        kd = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qd @ kd.transpose(1, 2)) * scale  # [Hq, L, L]
        future = torch.ones(end - start, end - start, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
        outs.append((torch.softmax(scores, dim=-1) @ vd).transpose(0, 1))
        lses.append(torch.logsumexp(scores, dim=-1).float())
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``packed_attention_reference``'s ``(out [T, Hq, D], lse [Hq, T])``, causal."""
    return packed_attention_reference(q, k, v, cu, softmax_scale=scale)


def _with_grads(
    fn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, ...]:
    """(out, lse, grad_q, grad_k, grad_v) of ``fn`` by autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, cu, scale)
    out.backward(grad_out)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check_attention(
    backend: Backend, case: AttentionCase, dtype: torch.dtype, fwd: Row, bwd: Row
) -> list[torch.Tensor]:
    """Forward (out, lse) into ``fwd``, then our backward on our forward's outputs into ``bwd``.

    A forward that raises fails both rows (the backward has nothing to run on). Returns the
    device tensors ``[q, k, v, grad_out, cu_seqlens]`` for timing, or ``[]`` when the forward
    failed.
    """
    q, k, v, grad_out, cu = _attention_inputs(case, dtype)
    scale = 1.0 / math.sqrt(case.d)
    exact = _with_grads(_reference_attention, q.double(), k.double(), v.double(),
                        grad_out.double(), cu, scale)  # fmt: skip
    plain = _with_grads(_plain_attention, q, k, v, grad_out, cu, scale)
    dq, dk, dv, dgrad, dcu = (backend.to_device(t) for t in (q, k, v, grad_out, cu))
    try:
        out, lse = backend.packed_attention_fwd(dq, dk, dv, dcu, scale, True, -1)
        backend.synchronize()
        judge(
            fwd,
            [
                compare("out", out.cpu(), exact[0], plain[0], dtype),
                compare("lse", lse.cpu(), exact[1], plain[1], torch.float32),
            ],
        )
    except Exception as exc:
        fwd.note = bwd.note = first_line(exc)
        fwd.passed = bwd.passed = False
        bwd.note = f"forward failed: {bwd.note}"
        return []
    grads = backend.packed_attention_bwd(dgrad, dq, dk, dv, out, lse, dcu, scale, True, -1)
    backend.synchronize()
    names = ("grad_q", "grad_k", "grad_v")
    judge(
        bwd,
        [
            compare(name, g.cpu(), e, p, dtype)
            for name, g, e, p in zip(names, grads, exact[2:], plain[2:], strict=True)
        ],
    )
    return [dq, dk, dv, dgrad, dcu]


def time_attention(
    backend: Backend,
    case: AttentionCase,
    device_tensors: list[torch.Tensor],
    timer: Timer,
    fwd: Row,
    bwd: Row,
) -> None:
    """Our forward and forward + backward times, and the baselines', into ``fwd`` and ``bwd``."""
    q, k, v, grad_out, cu = device_tensors
    scale = 1.0 / math.sqrt(case.d)

    def ours_fwd() -> None:
        backend.packed_attention_fwd(q, k, v, cu, scale, True, -1)

    def ours_fwd_bwd() -> None:
        o, s = backend.packed_attention_fwd(q, k, v, cu, scale, True, -1)
        backend.packed_attention_bwd(grad_out, q, k, v, o, s, cu, scale, True, -1)

    fwd.ours_ms, bwd.ours_ms = timer(ours_fwd), timer(ours_fwd_bwd)

    def reference(backward: bool) -> Callable[[], None]:
        def call() -> None:
            if backward:
                _with_grads(_reference_attention, q, k, v, grad_out, cu, scale)
            else:
                _reference_attention(q, k, v, cu, scale)

        return call

    def fusion(backward: bool) -> Callable[[], None]:
        def call() -> None:
            if backward:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                backend.fusion_attention(qg, kg, vg, cu, scale).backward(grad_out)
            else:
                backend.fusion_attention(q, k, v, cu, scale)

        return call

    for row, backward in ((fwd, False), (bwd, True)):
        ref_ms = time_baseline(timer, reference(backward), row, "reference")
        if backend.has_fusion_attention():
            row.baseline = "npu_fusion_attention"
            row.baseline_ms = time_baseline(timer, fusion(backward), row, row.baseline)
            row.reference_ms = ref_ms
        else:
            row.baseline, row.baseline_ms = "reference", ref_ms
