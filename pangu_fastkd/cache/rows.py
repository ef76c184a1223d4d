"""Checking and encoding what the scorer hands over for one sequence, before any of it is stored.

``encode_sequence`` turns one ``SequenceScores`` into the rows a shard stores (v1: ids in the
cache's id encoding, log-probs ``t / T_c - Lambda`` in the value dtype; v2: ``codec_v2.py``),
after checking shapes, dtypes, id ranges, repeats, finite values and that no row's
probabilities add up to more than 1. The errors name the sequence, the tensor and the row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .codec_v2 import encode_v2_ids, encode_v2_topk
from .spec import CacheSpec, encode_ids

__all__ = ["MASS_TOLERANCE", "SequenceScores", "encode_sequence", "find_bad_id", "first_row"]

# The top-K probabilities exp(t / T_c - Lambda) of a row may exceed 1 by this much (rounding of
# an fp32 Lambda); more means Lambda is not the log-partition of these logits at T_c.
MASS_TOLERANCE = 1e-3


@dataclass
class SequenceScores:
    """What the scorer hands over for one sequence (``n`` = its supervised tokens).

    Attributes:
        seq_index: position of the sequence in the cache order.
        topk_ids: ``[n, K]`` integer token ids, distinct per row, ``-1`` = empty slot.
        topk_logits: ``[n, K]`` float raw teacher logits, finite or ``-inf`` (empty slots are
            ignored and stored as ``-inf``).
        lse: ``[n]`` float, ``Lambda = logsumexp_u(t_u / T_c)`` over the full vocabulary.
        label_logit: ``[n]`` float, the label token's raw teacher logit (finite).
        sampled_ids: ``[n, Ks]`` integer ids drawn from the teacher at T_c, distinct per row,
            ``-1`` = empty slot; required exactly when ``spec.sampled_k > 0``.
        sampled_counts: ``[n, Ks]`` integer draws of each id (>= 1, 0 for empty slots), each row
            summing to ``spec.sampled_draws``.
    """

    seq_index: int
    topk_ids: torch.Tensor
    topk_logits: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor
    sampled_ids: torch.Tensor | None = None
    sampled_counts: torch.Tensor | None = None


def _as_tensor(where: str, name: str, value: Any, *, floating: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be a floating tensor, got {value.dtype}")
    if not floating and (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    ):
        raise TypeError(f"{where}: {name} must be an integer tensor, got {value.dtype}")
    return value.detach().cpu()


def _check_shape(where: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        expected = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{where}: {name} must have shape {expected}, got {list(tensor.shape)}")


def first_row(mask: torch.Tensor) -> int:
    """The first row of ``mask`` (``[n, ...]`` bool, some entry True) holding a True entry."""
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()[0, 0])


def find_bad_id(ids: torch.Tensor, vocab_size: int) -> tuple[int, int, bool] | None:
    """The first bad id of ``[n, K]`` integer ``ids`` (``-1`` = empty slot), or None.

    Returns ``(row, id, out_of_range)``: an id outside ``[-1, vocab_size)`` if a row holds one
    (``out_of_range`` True), else an id repeated within its row. Shared by the writer, which
    refuses such rows, and ``verify_cache``, which finds them in a written cache.
    """
    # Compare in the ids' own dtype without letting the bound wrap: torch casts a Python int
    # to the tensor's dtype, so ``int32_ids >= 2**31`` would compare against -2**31.
    bad = ids < -1
    if vocab_size <= torch.iinfo(ids.dtype).max:
        bad |= ids >= vocab_size
    if bad.any():
        row = first_row(bad)
        return row, int(ids[row][bad[row]][0]), True
    ordered = ids.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = first_row(repeated)
        return row, int(ordered[row, 1:][repeated[row]][0]), False
    return None


def _widen_ids(where: str, name: str, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` as int64 without wrapping: a uint64 id of 2**64 - 1 must not become -1 (empty)."""
    if ids.dtype == torch.uint64:
        # torch has no comparisons for uint64; the high bit is the sign bit of the same bytes.
        high = ids.view(torch.int64) < 0
        if high.any():
            row = first_row(high)
            value = int(ids[row].view(torch.int64)[high[row]][0]) + (1 << 64)
            raise ValueError(
                f"{where}: {name} row {row} holds id {value}, expected -1 (empty) or "
                "0 <= id < vocab_size"
            )
        return ids.view(torch.int64)
    return ids.to(torch.int64)  # every other integer dtype fits int64 exactly


def _check_ids(where: str, name: str, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``ids`` as int64 after checking the range and that no row repeats an id."""
    ids = _widen_ids(where, name, ids)
    problem = find_bad_id(ids, vocab_size)
    if problem is None:
        return ids
    row, value, out_of_range = problem
    if out_of_range:
        raise ValueError(
            f"{where}: {name} row {row} holds id {value}, expected -1 (empty) or "
            f"0 <= id < vocab_size ({vocab_size})"
        )
    raise ValueError(f"{where}: {name} row {row} holds id {value} more than once")


def _log_probs(
    where: str, name: str, logits: torch.Tensor, lse: torch.Tensor, spec: CacheSpec
) -> torch.Tensor:
    """``logits / T_c - lse`` (fp32, ``[n, K]`` or ``[n]``) after checking the logits and that
    the probabilities of a row add up to at most 1."""
    bad = torch.isnan(logits) | (logits == math.inf)
    if bad.any():
        raise ValueError(f"{where}: {name} row {first_row(bad)} holds NaN or +inf")
    values = logits / spec.temperature - (lse if logits.dim() == 1 else lse[:, None])
    mass = values.exp() if logits.dim() == 1 else values.exp().sum(dim=1)
    too_much = mass > 1 + MASS_TOLERANCE
    if too_much.any():
        row = int(too_much.nonzero()[0, 0])
        raise ValueError(
            f"{where}: probabilities exp({name} / T_c - lse) of row {row} sum to "
            f"{float(mass[row]):.6g} > 1: lse is not the log-partition of these logits at "
            f"T_c = {spec.temperature}"
        )
    return values


def _stored_log_probs(
    values: torch.Tensor, label_value: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, K]`` top-K and ``[n]`` label log-probs (fp32) in ``dtype``: rounded to nearest,
    except in the rows where that would lift their mass above 1, which are rounded toward -inf.

    Rounding to nearest lets bf16 push a row whose top-K (or top-K and label) mass is close to 1
    above it (1.0017 for a one-hot teacher's top-16 was seen), which the loss refuses
    mid-training. Rounding every row down would bias all of them (at openPangu's width it moved
    a near-teacher student's KD loss by 2%), so only those rows are.
    """
    stored, label = values.to(dtype), label_value.to(dtype)
    if dtype == torch.float32:
        return stored, label
    mass = stored.to(torch.float32).exp().sum(dim=1)
    with_label = mass + label.to(torch.float32).exp()
    exact_with_label = values.exp().sum(dim=1) + label_value.exp()
    lifted = (mass > 1) | ((with_label > 1) & (exact_with_label <= 1))
    if not lifted.any():
        return stored, label
    down = stored.new_tensor(-math.inf)
    stored_down = torch.where(
        stored.to(torch.float32) > values, torch.nextafter(stored, down), stored
    )
    label_down = torch.where(
        label.to(torch.float32) > label_value, torch.nextafter(label, down), label
    )
    stored = torch.where(lifted[:, None], stored_down, stored)
    return stored, torch.where(lifted, label_down, label)


def encode_sequence(scores: SequenceScores, spec: CacheSpec, where: str) -> dict[str, Any]:
    """Check one sequence's scores and return its shard rows (stored dtypes) and row count."""
    ids = _as_tensor(where, "topk_ids", scores.topk_ids, floating=False)
    if ids.dim() != 2:
        raise ValueError(f"{where}: topk_ids must be [n, K], got shape {list(ids.shape)}")
    n = ids.shape[0]
    _check_shape(where, "topk_ids", ids, (n, spec.k))
    logits = _as_tensor(where, "topk_logits", scores.topk_logits, floating=True)
    _check_shape(where, "topk_logits", logits, (n, spec.k))
    lse = _as_tensor(where, "lse", scores.lse, floating=True)
    _check_shape(where, "lse", lse, (n,))
    label_logit = _as_tensor(where, "label_logit", scores.label_logit, floating=True)
    _check_shape(where, "label_logit", label_logit, (n,))

    lse = lse.to(torch.float32)
    for name, tensor in (("lse", lse), ("label_logit", label_logit)):
        if not torch.isfinite(tensor).all():
            row = int((~torch.isfinite(tensor)).nonzero()[0, 0])
            raise ValueError(f"{where}: {name}[{row}] is {float(tensor[row])}, must be finite")
    ids = _check_ids(where, "topk_ids", ids, spec.vocab_size)
    empty = ids < 0
    # Empty slots carry no logit: whatever the scorer put there is replaced by -inf.
    logits = logits.to(torch.float32).masked_fill(empty, -math.inf)
    values = _log_probs(where, "topk_logits", logits, lse, spec)
    label_value = _log_probs(where, "label_logit", label_logit.to(torch.float32), lse, spec)
    if spec.codec == "v2":
        rows = encode_v2_topk(ids, values, lse, label_value, spec)
    else:
        # fp16 tops out at -65504: keep the label's log-prob finite (the loss requires it).
        value_min = torch.finfo(spec.value_torch_dtype).min
        label_value = label_value.clamp(min=value_min)
        stored, stored_label = _stored_log_probs(values, label_value, spec.value_torch_dtype)
        rows = {
            "ids": encode_ids(ids, spec.id_encoding),
            "values": stored,
            "lse": lse.contiguous(),
            "label_value": stored_label,
        }
    rows.update(_encode_sampled(scores, spec, where, n))
    return {"rows": rows, "num_tokens": n}


def _encode_sampled(
    scores: SequenceScores, spec: CacheSpec, where: str, n: int
) -> dict[str, torch.Tensor]:
    given = (scores.sampled_ids is not None, scores.sampled_counts is not None)
    if spec.sampled_k == 0:
        if any(given):
            raise ValueError(f"{where}: sampled targets given, but the spec has sampled_k = 0")
        return {}
    if not all(given):
        raise ValueError(
            f"{where}: sampled_ids and sampled_counts are required (spec.sampled_k = "
            f"{spec.sampled_k})"
        )
    ids = _as_tensor(where, "sampled_ids", scores.sampled_ids, floating=False)
    _check_shape(where, "sampled_ids", ids, (n, spec.sampled_k))
    counts = _as_tensor(where, "sampled_counts", scores.sampled_counts, floating=False)
    _check_shape(where, "sampled_counts", counts, (n, spec.sampled_k))
    ids = _check_ids(where, "sampled_ids", ids, spec.vocab_size)
    counts = _widen_ids(where, "sampled_counts", counts)
    bad = torch.where(ids < 0, counts != 0, counts < 1)
    if bad.any():
        row = first_row(bad)
        raise ValueError(
            f"{where}: sampled_counts row {row} must be >= 1 for every id and 0 for empty "
            f"slots, got counts {counts[row].tolist()} for ids {ids[row].tolist()}"
        )
    wrong_sum = counts.sum(dim=1) != spec.sampled_draws
    if wrong_sum.any():
        row = int(wrong_sum.nonzero()[0, 0])
        raise ValueError(
            f"{where}: sampled_counts row {row} sums to {int(counts[row].sum())}, expected "
            f"sampled_draws = {spec.sampled_draws}"
        )
    return {
        "sampled_ids": encode_v2_ids(ids, spec)
        if spec.codec == "v2"
        else encode_ids(ids, spec.id_encoding),
        "sampled_counts": counts.to(spec.counts_dtype),
    }
