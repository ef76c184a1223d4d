"""Baselines of the fused linear sparse-KD loss, for bench/bench_sparse_kd.py and its tests.

Every provider takes the same inputs, ``(hidden [N, d], weight [V, d], labels [N], target)``,
and returns a scalar loss whose ``.backward()`` fills ``hidden.grad`` and ``weight.grad``. All
compute the kernel's default configuration (docs/kd-losses.md): forward KL over the top-K support
plus the label token, the missing teacher mass as one "rest" bucket (``missing_mass='tail'``),
temperature 1, mean over supervised positions, ``kd_weight * KL + (1 - kd_weight) * CE``.

- ``naive_torch``: what a user writes: the full ``[N, V]`` logits, log-softmax, gather.
- ``chunked_torch``: Liger-Kernel's chunked-loss pattern in plain PyTorch: row chunks, per-chunk
  gradients with ``torch.func.grad_and_value``, fp32 accumulators, a backward that only scales.
- ``fused_kernel``: the C++ kernel behind ``fused_linear_sparse_kd``.
- ``gemm_floor``: not a loss, the three GEMMs any implementation has to do (the time floor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pangu_fastkd import build_info
from pangu_fastkd.ops import TopKTarget, fused_linear_sparse_kd

__all__ = [
    "PROVIDERS",
    "SparseKDInputs",
    "chunked_torch",
    "fused_kernel",
    "gemm_floor",
    "make_inputs",
    "naive_torch",
    "sparse_kd_row_losses",
]

IGNORE_INDEX = -100
# Floor of q(rest) inside the log: only reached when the student puts all its mass on the support.
_EPS = 1e-12


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic runs in fp32 (fp64 for fp64 inputs), as in the kernel and the reference."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class SparseKDInputs:
    """One benchmark problem; ``hidden`` and ``weight`` are leaves that require grad.

    Attributes:
        hidden: ``[N, d]`` student hidden states.
        weight: ``[V, d]`` LM-head weight.
        labels: ``[N]`` int64 label ids, ``IGNORE_INDEX`` on unsupervised positions.
        target: top-K teacher target with ``[N, K]`` ids (int32) and logits (fp32).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    target: TopKTarget

    def input_bytes(self) -> int:
        """Bytes of every input tensor (what exists before the loss is called)."""
        tensors = [self.hidden, self.weight, self.labels, self.target.ids, self.target.logits]
        tensors += [self.target.lse, self.target.label_logit]
        return sum(t.numel() * t.element_size() for t in tensors)

    def grad_bytes(self) -> int:
        """Bytes of grad_hidden and grad_weight in the input dtype, which every provider returns."""
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_inputs(
    n_rows: int,
    vocab: int,
    hidden_size: int,
    top_k: int,
    dtype: torch.dtype,
    *,
    ignored_fraction: float = 0.0,
    seed: int = 0,
) -> SparseKDInputs:
    """A random problem with a valid top-K target (distinct ids, teacher mass below 1).

    Half of the labels are the teacher's top-1 token, the others random, so the label
    conditioning takes both paths. Logits come out with unit scale, like a trained LM head.
    """
    if top_k > vocab:
        raise ValueError(f"top_k must be at most vocab = {vocab}, got {top_k}")
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / math.sqrt(hidden_size)).to(dtype)

    # Distinct ids without an [N, V] permutation: one random id in each of K vocabulary strata.
    stride = vocab // top_k
    offsets = torch.randint(0, stride, (n_rows, top_k), generator=gen)
    ids = offsets + torch.arange(top_k) * stride  # [N, K]
    teacher_logits = (2 * torch.randn(n_rows, top_k, generator=gen) + 8).sort(1, True).values

    random_labels = torch.randint(0, vocab, (n_rows,), generator=gen)
    use_top1 = torch.rand(n_rows, generator=gen) < 0.5
    labels = torch.where(use_top1, ids[:, 0], random_labels)  # [N]
    label_match = ids == labels[:, None]  # [N, K]
    label_in_topk = label_match.any(1)
    logit_if_in_topk = teacher_logits.masked_fill(~label_match, -math.inf).max(1).values
    label_logit = torch.where(label_in_topk, logit_if_in_topk, teacher_logits[:, -1] - 1)  # [N]

    # lse such that the support (top-K plus a missing label) holds 60-95% of the teacher's mass.
    extra = label_logit.masked_fill(label_in_topk, -math.inf)[:, None]
    support_lse = torch.logsumexp(torch.cat([teacher_logits, extra], 1), dim=1)  # [N]
    mass = 0.6 + 0.35 * torch.rand(n_rows, generator=gen)
    lse = support_lse - mass.log()

    ignored = torch.rand(n_rows, generator=gen) < ignored_fraction
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    target = TopKTarget(
        ids=ids.to(torch.int32), logits=teacher_logits, lse=lse, label_logit=label_logit
    )
    return SparseKDInputs(hidden.requires_grad_(), weight.requires_grad_(), labels, target)


# ---------------------------------------------------------------------------------------------
# The loss of a block of rows, shared by the naive and the chunked baseline


def sparse_kd_row_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    kd_weight: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-row ``kd_weight * KL_tail + (1 - kd_weight) * CE`` from full student logits.

    Args:
        logits: ``[n, V]`` student logits in the accumulation dtype (fp32, or fp64).
        labels: ``[n]`` label ids, ``ignore_index`` on unsupervised rows.
        target: top-K target whose fields are ``[n, K]`` / ``[n]`` (the same rows as ``logits``).
        kd_weight: weight of the distillation term.

    Returns:
        ``[n]`` losses, zero on unsupervised rows.
    """
    acc = logits.dtype
    supervised = labels != ignore_index
    safe_labels = labels.long().masked_fill(~supervised, 0)[:, None]  # [n, 1]
    logq = torch.log_softmax(logits, dim=1)  # [n, V]
    cross_entropy = -logq.gather(1, safe_labels).squeeze(1)  # [n]

    # Support = the teacher's ids, plus the label when the teacher's top-K misses it.
    ids = target.ids.long()  # [n, K]
    valid = ids >= 0
    label_missing = ~((ids == safe_labels) & valid).any(1, keepdim=True)  # [n, 1]
    support_ids = torch.cat([ids.clamp(min=0), safe_labels], 1)  # [n, K + 1]
    support_valid = torch.cat([valid, label_missing], 1)
    teacher = torch.cat([target.logits, target.label_logit[:, None]], 1).to(acc)

    logq_s = logq.gather(1, support_ids)  # [n, K + 1]
    logp_s = teacher - target.lse.to(acc)[:, None]
    p_s = torch.where(support_valid, logp_s.exp(), 0.0)
    q_s = torch.where(support_valid, logq_s.exp(), 0.0)
    # The rest bucket: the teacher's exact missing mass against the student's 1 - Q_S.
    p_rest = (1 - p_s.sum(1)).clamp(min=0)  # [n]
    q_rest = (1 - q_s.sum(1)).clamp(min=_EPS)
    # `where` rather than a product with 0: 0 * log 0 would be NaN.
    kl_support = torch.where(p_s > 0, p_s * (logp_s - logq_s), 0.0).sum(1)
    kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.log() - q_rest.log()), 0.0)
    row_loss = kd_weight * (kl_support + kl_rest) + (1 - kd_weight) * cross_entropy
    return torch.where(supervised, row_loss, 0.0)


def _num_supervised(labels: torch.Tensor, ignore_index: int) -> int:
    return max(int((labels != ignore_index).sum()), 1)


# ---------------------------------------------------------------------------------------------
# (a) naive PyTorch


def naive_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    *,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The full ``[N, V]`` logits in the input dtype, then the loss in fp32; autograd backward.

    Shapes: ``hidden [N, d]``, ``weight [V, d]``, ``labels [N]``, target fields ``[N, K]``.
    """
    logits = (hidden @ weight.T).to(_acc_dtype(hidden.dtype))  # [N, V]
    row_loss = sparse_kd_row_losses(logits, labels, target, kd_weight, ignore_index)
    return row_loss.sum() / _num_supervised(labels, ignore_index)


# ---------------------------------------------------------------------------------------------
# (b) chunked PyTorch, in the style of Liger-Kernel's LigerFusedLinearDistillationBase


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """The kernel's rule: as many rows as fit the logits budget, a multiple of 16, at least 16."""
    budget = build_info().get("chunk_budget_bytes", 128 << 20)
    rows = budget // (vocab * torch.empty((), dtype=dtype).element_size())
    return max(16, rows // 16 * 16)


def _chunk_loss(
    hidden_chunk: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    kd_weight: float,
    ignore_index: int,
    n_supervised: int,
) -> torch.Tensor:
    """This chunk's share of the mean loss; ``hidden_chunk [c, d]``, target rows ``[c, K]``."""
    logits = (hidden_chunk @ weight.T).to(_acc_dtype(hidden_chunk.dtype))  # [c, V]
    row_loss = sparse_kd_row_losses(logits, labels, target, kd_weight, ignore_index)  # [c]
    return row_loss.sum() / n_supervised


def _slice_target(target: TopKTarget, start: int, stop: int) -> TopKTarget:
    return TopKTarget(
        ids=target.ids[start:stop],
        logits=target.logits[start:stop],
        lse=target.lse[start:stop],
        label_logit=target.label_logit[start:stop],
        temperature=target.temperature,
    )


class ChunkedSparseKDFunction(torch.autograd.Function):
    """Loss and gradients computed chunk by chunk in forward; backward only scales them."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        target: TopKTarget,
        kd_weight: float,
        ignore_index: int,
        chunk_rows: int,
    ) -> torch.Tensor:
        n_rows = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        n_supervised = _num_supervised(labels, ignore_index)
        # fp32 accumulators: grad_W sums over chunks; grad_H is written once per row but kept in
        # fp32 too so that both gradients are rounded to the input dtype exactly once.
        grad_hidden = torch.zeros(hidden.shape, dtype=acc)  # [N, d]
        grad_weight = torch.zeros(weight.shape, dtype=acc)  # [V, d]
        loss = torch.zeros((), dtype=acc)
        chunk_grad_and_loss = torch.func.grad_and_value(_chunk_loss, argnums=(0, 1))
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            (grad_h, grad_w), chunk_loss = chunk_grad_and_loss(
                hidden[start:stop],
                weight,
                labels[start:stop],
                _slice_target(target, start, stop),
                kd_weight,
                ignore_index,
                n_supervised,
            )
            grad_hidden[start:stop] = grad_h
            grad_weight.add_(grad_w)
            loss.add_(chunk_loss)
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # As Liger: when the loss is the last op (grad_output == 1) skip the multiply, which would
        # allocate another [V, d] tensor.
        if grad_output.item() != 1.0:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    *,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Chunked loss in pure PyTorch; ``chunk_rows`` defaults to the kernel's chunk size.

    Shapes: ``hidden [N, d]``, ``weight [V, d]``, ``labels [N]``, target fields ``[N, K]``.
    """
    rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.dtype)
    return ChunkedSparseKDFunction.apply(
        hidden, weight, labels, target, kd_weight, ignore_index, rows
    )


# ---------------------------------------------------------------------------------------------
# (c) the kernel


def fused_kernel(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    *,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``fused_linear_sparse_kd`` in its default configuration (forward KL, tail, label, T=1)."""
    return fused_linear_sparse_kd(
        hidden, weight, labels, target, kd_weight=kd_weight, ignore_index=ignore_index
    )


def fused_kernel_checked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    *,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The kernel with ``check_finite=True``, as the trainer runs it: the cost of checking the
    inputs (hidden, weight) and the loss is the difference to ``fused_kernel``."""
    return fused_linear_sparse_kd(
        hidden,
        weight,
        labels,
        target,
        kd_weight=kd_weight,
        ignore_index=ignore_index,
        check_finite=True,
    )


# ---------------------------------------------------------------------------------------------
# (d) the GEMM floor


class GemmFloorFunction(torch.autograd.Function):
    """The three GEMMs of the LM head alone: ``L = H W^T``, ``grad_H = L W``, ``grad_W = L^T H``.

    ``L`` plays the role of d(loss)/d(logits); its ``[N, V]`` buffer has the input dtype (fp32 for
    fp32, bf16 for bf16, as the kernel's). Done in forward, like the loss ops, and returned as is
    by backward. The "loss" is a constant zero.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.T  # [N, V]
        grad_hidden = logits @ weight  # [N, d]
        grad_weight = logits.T @ hidden  # [V, d]
        ctx.save_for_backward(grad_hidden, grad_weight)
        return torch.zeros((), dtype=_acc_dtype(hidden.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden, grad_weight


def gemm_floor(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget,
    *,
    kd_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Time floor at the same shapes; ``labels``, ``target`` and ``kd_weight`` are unused."""
    del labels, target, kd_weight, ignore_index
    return GemmFloorFunction.apply(hidden, weight)


Provider = Callable[..., torch.Tensor]
PROVIDERS: dict[str, Provider] = {
    "naive": naive_torch,
    "chunked": chunked_torch,
    "kernel": fused_kernel,
    "kernel_checked": fused_kernel_checked,
    "floor": gemm_floor,
}
