"""Readable PyTorch reference of the fused sparse-KD / cross-entropy loss.

It materialises the full ``[N, V]`` logits and lets autograd take the gradients, so it is slow and
memory-hungry, and obviously right: it is the oracle of the tests and the fallback for devices
that have no kernel. The definitions it implements are in ``docs/kd-losses.md``.

The LM-head matmul runs in the input dtype (as plain PyTorch would) and everything after it in
float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from .sparse_kd_targets import SampledTarget, TopKTarget

EPS = 1e-12
_LOG_EPS = math.log(EPS)


def validate_target(
    target: TopKTarget | SampledTarget,
    labels: torch.Tensor,
    vocab_size: int,
    supervised: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the first bad row of a sparse target (data checks only)."""
    ids = target.ids.long()
    valid = ids >= 0
    bad = ((ids < -1) | (ids >= vocab_size)).any(dim=1)
    _raise_first(bad, f"target ids must lie in [0, {vocab_size}) or be -1")
    sorted_ids = ids.sort(dim=1).values
    dup = ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any(dim=1)
    _raise_first(dup, "target ids must be distinct within a row")
    if isinstance(target, TopKTarget):
        t = target.logits.float()
        _raise_first(
            ((t.isnan() | (t == math.inf)) & valid).any(dim=1),
            "teacher logits must be finite or -inf",
        )
        _raise_first(~target.lse.float().isfinite(), "teacher lse must be finite")
        lab = target.label_logit.float()
        _raise_first(lab.isnan() | (lab == math.inf), "teacher label_logit must be finite or -inf")
    else:
        w = target.weights.float()
        _raise_first(
            ((w < 0) | ~w.isfinite()).any(dim=1) & supervised,
            "sampled weights must be >= 0 and finite",
        )
        total = torch.where(valid, w, torch.zeros_like(w)).sum(dim=1)
        _raise_first(
            ((total - 1).abs() > 1e-3) & supervised, "sampled weights must sum to 1 (within 1e-3)"
        )


def _raise_first(bad_rows: torch.Tensor, message: str) -> None:
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"{message} (row {row})")


def _divergence(
    divergence: str,
    beta: float,
    p: torch.Tensor,
    logp: torch.Tensor,
    q: torch.Tensor,
    logq: torch.Tensor,
) -> torch.Tensor:
    """Divergence between bucket distributions ``[n, B]`` (masked buckets have p = q = 0)."""
    if divergence == "forward_kl":
        # Terms with p = 0 contribute 0; `where` on both factors keeps their gradient finite.
        has_p = p > 0
        safe_logp = torch.where(has_p, logp, torch.zeros_like(logp))
        safe_logq = torch.where(has_p, logq, torch.zeros_like(logq))
        return (p * (safe_logp - safe_logq)).sum(dim=1)
    logp_floor = logp.clamp(min=_LOG_EPS)
    logq_floor = logq.clamp(min=_LOG_EPS)
    if divergence == "reverse_kl":
        return (q * (logq_floor - logp_floor)).sum(dim=1)
    m = beta * p + (1 - beta) * q
    logm_floor = m.clamp(min=EPS).log()
    kl_pm = torch.where(p > 0, p * (logp_floor - logm_floor), torch.zeros_like(p)).sum(dim=1)
    kl_qm = (q * (logq_floor - logm_floor)).sum(dim=1)
    return beta * kl_pm + (1 - beta) * kl_qm


def sparse_kd_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget | SampledTarget | None = None,
    *,
    bias: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "tail",
    include_label: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss and per-token statistics; arguments as ``fused_linear_sparse_kd``.

    Args:
        hidden: ``[N, d]`` student hidden states.
        weight: ``[V, d]`` LM head.
        labels: ``[N]`` label ids, ``ignore_index`` for unsupervised positions.
        target: sparse teacher target with ``[N, K]`` fields, or None when ``kd_weight == 0``.

    Returns:
        ``(loss, stats)``: the reduced scalar loss (float32, or float64 for float64 inputs) and
        a ``[N, 6]`` statistics matrix (see ``KDStats``), differentiable through autograd.
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    N, V = hidden.shape[0], weight.shape[0]
    labels = labels.long()
    supervised = labels != ignore_index
    if bool(((labels < 0) | (labels >= V))[supervised].any()):
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
    if target is not None and kd_weight > 0:
        validate_target(target, labels, V, supervised)

    rows = supervised.nonzero().squeeze(1)
    y = labels[rows]
    z = hidden[rows] @ weight.T  # [n, V] in the input dtype, like plain PyTorch
    if bias is not None:
        z = z + bias
    z = z.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    T = temperature
    logq_all = torch.log_softmax(z / T, dim=1)  # [n, V]
    lse1 = torch.logsumexp(z, dim=1)  # [n]
    ce = lse1 - z.gather(1, y[:, None]).squeeze(1)
    n = rows.numel()
    zeros = torch.zeros(n, dtype=acc)
    D, Q_S, P_S = zeros, zeros, zeros

    if kd_weight > 0:
        if target is None:
            raise ValueError("kd_weight > 0 needs a teacher target")
        ids = target.ids[rows].long()
        valid = ids >= 0
        if isinstance(target, TopKTarget):
            t = target.logits[rows].to(acc)
            if include_label:
                label_in = ((ids == y[:, None]) & valid).any(dim=1)
                ids = torch.cat([ids, y[:, None]], dim=1)
                t = torch.cat([t, target.label_logit[rows].to(acc)[:, None]], dim=1)
                valid = torch.cat([valid, ~label_in[:, None]], dim=1)
        else:
            w = target.weights[rows].to(acc)
        if bool((~valid.any(dim=1)).any()):
            row = int(rows[(~valid.any(dim=1)).nonzero()[0, 0]])
            raise ValueError(f"supervised row {row} has an empty teacher support")
        safe_ids = ids.clamp(min=0)
        logq_s = logq_all.gather(1, safe_ids).masked_fill(~valid, -math.inf)  # [n, K']
        q_s = logq_s.exp()
        Q_S = q_s.sum(dim=1)

        if isinstance(target, SampledTarget):
            w = torch.where(valid, w, torch.zeros_like(w))
            D = -(w * torch.where(valid, logq_s, torch.zeros_like(logq_s))).sum(dim=1)
            P_S = w.sum(dim=1)
        elif missing_mass == "tail":
            if abs(T - target.temperature) > 1e-6:
                raise ValueError(
                    f"missing_mass='tail' needs temperature == cache temperature "
                    f"({T} != {target.temperature}); use missing_mass='renorm'"
                )
            lam = target.lse[rows].to(acc)
            logp_s = (t / T - lam[:, None]).masked_fill(~valid, -math.inf)
            p_s = logp_s.exp()
            P_S = p_s.sum(dim=1)
            p_rest = (1 - P_S).clamp(min=0)
            # q(rest) summed over the tokens outside the support: exact, no cancellation.
            # scatter_add, not scatter_: an invalid slot may share its id with a valid one
            # (the label column when the label is already in the top-K).
            hits = torch.zeros_like(logq_all).scatter_add_(1, safe_ids, valid.to(acc))
            in_support = hits > 0
            logq_rest = torch.logsumexp(logq_all.masked_fill(in_support, -math.inf), dim=1)
            p = torch.cat([p_s, p_rest[:, None]], dim=1)
            logp = torch.cat([logp_s, p_rest.log()[:, None]], dim=1)
            q = torch.cat([q_s, logq_rest.exp()[:, None]], dim=1)
            logq = torch.cat([logq_s, logq_rest[:, None]], dim=1)
            D = _divergence(divergence, beta, p, logp, q, logq)
        else:  # renorm: the teacher is renormalised over the support
            logp = torch.log_softmax((t / T).masked_fill(~valid, -math.inf), dim=1)
            P_S = torch.ones_like(Q_S)
            logq = logq_s
            if divergence != "forward_kl":
                logq = logq_s - torch.logsumexp(logq_s, dim=1, keepdim=True)
            logq = logq.masked_fill(~valid, -math.inf)
            D = _divergence(divergence, beta, logp.exp(), logp, logq.exp(), logq)

    loss_rows = kd_weight * T * T * D + (1 - kd_weight) * ce + z_loss * lse1 * lse1
    total = loss_rows.sum()
    if num_items is not None:
        total = total / num_items
    elif reduction == "mean":
        total = total / max(n, 1)

    correct = (z.argmax(dim=1) == y).to(acc)
    stats = torch.zeros(N, 6, dtype=torch.float32)
    row_stats = torch.stack([D, ce, Q_S, P_S, lse1, correct], dim=1).float()
    stats = stats.index_copy(0, rows, row_stats)
    return total, stats
