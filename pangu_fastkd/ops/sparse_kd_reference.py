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

from .sparse_kd_targets import (
    DIVERGENCES,
    MISSING_MASS_MODES,
    REDUCTIONS,
    SampledTarget,
    TopKTarget,
    choice_code,
)

EPS = 1e-12
_LOG_EPS = math.log(EPS)


def check_options(
    target: TopKTarget | SampledTarget | None,
    *,
    kd_weight: float,
    divergence: str,
    missing_mass: str,
    include_label: bool | None,
    reduction: str,
    num_items: float | int | torch.Tensor | None,
    softcap: float | None,
) -> tuple[bool, float | None]:
    """Checks the options that do not depend on tensor data, for the kernel and the reference.

    Returns:
        ``(include_label, num_items)`` resolved: the label default of the target kind, and
        ``num_items`` as a float (a tensor count is read once).
    """
    choice_code("divergence", divergence, DIVERGENCES)
    choice_code("missing_mass", missing_mass, MISSING_MASS_MODES)
    choice_code("reduction", reduction, REDUCTIONS)
    if target is not None and not isinstance(target, TopKTarget | SampledTarget):
        kind = type(target).__name__
        raise TypeError(f"target must be a TopKTarget, a SampledTarget or None, got {kind}")
    if kd_weight > 0 and target is None:
        raise ValueError(
            "kd_weight > 0 needs a teacher target; use kd_weight=0 for plain cross-entropy"
        )
    sampled = isinstance(target, SampledTarget)
    if include_label is None:
        include_label = not sampled
    if sampled and include_label:
        raise ValueError(
            "include_label applies to top-K targets only (sampled targets carry no label logit)"
        )
    if sampled and divergence != "forward_kl":
        raise ValueError("sampled targets support only divergence='forward_kl'")
    if isinstance(num_items, torch.Tensor):
        num_items = float(num_items.item())
    if num_items is not None and not (num_items > 0 and math.isfinite(num_items)):
        raise ValueError(f"num_items must be finite and > 0, got {num_items}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be finite and > 0, or None, got {softcap}")
    return bool(include_label), num_items


def validate_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    target: TopKTarget | SampledTarget | None,
    options: dict[str, float],
) -> None:
    """Shape, dtype and option checks; the C++ kernel makes the same ones in csrc."""
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, d], got shape {tuple(weight.shape)}")
    N, V = hidden.shape[0], weight.shape[0]
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight is [V, d] with d = {weight.shape[1]} but hidden has d = {hidden.shape[1]}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != (N,):
        raise ValueError(f"labels must be [N] = [{N}], got shape {tuple(labels.shape)}")
    if bias is not None:
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.shape != (V,):
            raise ValueError(f"bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
    for name in ("kd_weight", "beta"):
        if not 0 <= options[name] <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {options[name]}")
    if not (options["temperature"] > 0 and math.isfinite(options["temperature"])):
        raise ValueError(f"temperature must be > 0, got {options['temperature']}")
    if not (options["z_loss"] >= 0 and math.isfinite(options["z_loss"])):
        raise ValueError(f"z_loss must be finite and >= 0, got {options['z_loss']}")
    if target is None or options["kd_weight"] == 0:
        return
    ids = target.ids
    if ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"target ids must be [N, K] with N = {N}, got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("target ids must have K >= 1 columns, got K = 0")
    if ids.is_floating_point():
        raise TypeError(f"target ids must be an integer tensor, got {ids.dtype}")
    if isinstance(target, TopKTarget):
        values = {"teacher logits": target.logits}
    else:
        values = {"sample_weights": target.weights}
    for name, t in values.items():
        if t.shape != ids.shape:
            raise ValueError(
                f"{name} must match ids' shape {tuple(ids.shape)}, got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if isinstance(target, TopKTarget):
        for name, t in (("teacher lse", target.lse), ("label_logit", target.label_logit)):
            if t.shape != (N,):
                raise ValueError(f"{name} must be [N] = [{N}], got shape {tuple(t.shape)}")


def validate_target(
    target: TopKTarget | SampledTarget,
    vocab_size: int,
    supervised: torch.Tensor,
    labels: torch.Tensor,
) -> None:
    """Raise ``ValueError`` naming the first bad supervised row of a sparse target."""
    ids = target.ids.long()
    valid = ids >= 0
    out_of_range = ((ids < -1) | (ids >= vocab_size)).any(dim=1)
    _raise_first(out_of_range & supervised, f"target ids must lie in [0, {vocab_size}) or be -1")
    sorted_ids = ids.sort(dim=1).values
    dup = ((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)).any(dim=1)
    _raise_first(dup & supervised, "target ids must be distinct within a row")
    if isinstance(target, TopKTarget):
        t = target.logits.float()
        bad_logit = ((t.isnan() | (t == math.inf)) & valid).any(dim=1)
        _raise_first(bad_logit & supervised, "teacher logits must be finite or -inf")
        _raise_first(~target.lse.float().isfinite() & supervised, "teacher lse must be finite")
        lab = target.label_logit.float()
        bad_label = (lab.isnan() | (lab == math.inf)) & supervised
        _raise_first(bad_label, "teacher label_logit must be finite or -inf")
        _raise_first(_topk_mass_exceeds_one(target, labels) & supervised, _MASS_MESSAGE)
    else:
        w = target.weights.float()
        bad_w = (((w < 0) | ~w.isfinite()) & valid).any(dim=1)
        _raise_first(bad_w & supervised, "sampled weights must be >= 0 and finite")
        total = torch.where(valid, w, torch.zeros_like(w)).sum(dim=1)
        bad_sum = ((total - 1).abs() > 1e-3) & supervised
        _raise_first(bad_sum, "sampled weights must sum to 1 (within 1e-3)")


_MASS_MESSAGE = (
    "the teacher logits (top-K and label) hold probability > 1 under their lse: "
    "logits and lse do not belong together"
)


def _topk_mass_exceeds_one(target: TopKTarget, labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the top-K logits (and the label's, when outside them) hold more than
    ``1 + 1e-3`` of the teacher's probability at ``T_c`` under the row's lse, which a true
    log-partition over the whole vocabulary cannot allow."""
    ids = target.ids.long()
    valid = ids >= 0
    lam = target.lse.float()[:, None]
    log_p = (target.logits.float() / target.temperature - lam).masked_fill(~valid, -math.inf)
    log_mass = log_p.logsumexp(dim=1)
    label_seen = (ids == labels[:, None]).any(dim=1)
    log_label = target.label_logit.float() / target.temperature - lam[:, 0]
    log_mass = torch.where(label_seen, log_mass, torch.logaddexp(log_mass, log_label))
    return log_mass > math.log1p(1e-3)


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
    include_label: bool | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | int | torch.Tensor | None = None,
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
    include_label, num_items = check_options(
        target,
        kd_weight=kd_weight,
        divergence=divergence,
        missing_mass=missing_mass,
        include_label=include_label,
        reduction=reduction,
        num_items=num_items,
        softcap=softcap,
    )
    options = {"kd_weight": kd_weight, "beta": beta, "temperature": temperature, "z_loss": z_loss}
    validate_inputs(hidden, weight, labels, bias, target, options)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    N, V = hidden.shape[0], weight.shape[0]
    labels = labels.long()
    supervised = labels != ignore_index
    if bool(((labels < 0) | (labels >= V))[supervised].any()):
        raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
    if target is not None and kd_weight > 0:
        validate_target(target, V, supervised, labels)

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
    zeros = z.new_zeros(n)  # on the inputs' device, like every tensor made here
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
            # q(rest) summed over the tokens outside the support: exact, no cancellation.
            # scatter_add, not scatter_: an invalid slot may share its id with a valid one
            # (the label column when the label is already in the top-K).
            hits = torch.zeros_like(logq_all).scatter_add_(1, safe_ids, valid.to(acc))
            in_support = hits > 0
            # An empty rest bucket (the support covers the vocabulary) holds no teacher mass.
            rest_empty = in_support.all(dim=1)
            p_rest = torch.where(rest_empty, torch.zeros_like(P_S), (1 - P_S).clamp(min=0))
            logq_rest = torch.logsumexp(logq_all.masked_fill(in_support, -math.inf), dim=1)
            p = torch.cat([p_s, p_rest[:, None]], dim=1)
            logp = torch.cat([logp_s, p_rest.log()[:, None]], dim=1)
            q = torch.cat([q_s, logq_rest.exp()[:, None]], dim=1)
            logq = torch.cat([logq_s, logq_rest[:, None]], dim=1)
            D = _divergence(divergence, beta, p, logp, q, logq)
        else:  # renorm: the teacher is renormalised over the support
            scaled = (t / T).masked_fill(~valid, -math.inf)
            no_finite = scaled.amax(dim=1) == -math.inf
            if bool(no_finite.any()):
                row = int(rows[no_finite.nonzero()[0, 0]])
                raise ValueError(
                    f"row {row} has no finite teacher logit on its support; "
                    "missing_mass='renorm' needs one"
                )
            logp = torch.log_softmax(scaled, dim=1)
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
        # Over no supervised row this is 0 / 0 = NaN, as torch.nn.functional.cross_entropy.
        total = total / n

    correct = (z.argmax(dim=1) == y).to(acc)
    stats = torch.zeros(N, 6, dtype=torch.float32, device=hidden.device)
    row_stats = torch.stack([D, ce, Q_S, P_S, lse1, correct], dim=1).float()
    stats = stats.index_copy(0, rows, row_stats)
    return total, stats
