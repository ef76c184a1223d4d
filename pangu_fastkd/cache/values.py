"""Decoding stored shard rows into KD targets, and the checks every served row passes.

The reader runs these checks on every batch it hands the KD stage and ``verify_cache`` on every
row of the cache, so both refuse the same rows: a shard whose manifest was re-signed (its
checksum is its own sha256, anyone can recompute it) or that changed under its memory map
still never reaches the loss with NaN, +inf, ids outside the vocabulary or repeated in a row.
All checks are vectorised over the whole batch; the first bad row is found afterwards.

Top-K rows: ids in ``[0, V)`` or ``-1`` (empty) and distinct per row; stored log-probs ``v``
finite or ``-inf``, ``-inf`` in every empty slot, their probabilities summing to at most 1;
``lse`` finite; the label's log-prob finite and at most 0; the decoded logits
``T_c * (v + lse)`` finite or ``-inf`` and the label logit finite (a finite ``v`` and ``lse``
can still overflow fp32 together). Sampled rows: ids as above; counts >= 1 for ids and 0 for
empty slots, summing to ``sampled_draws`` per row, so the weights ``count / draws`` are finite,
non-negative and sum to 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ops.sparse_kd_targets import SampledTarget, TopKTarget
from .codec_v2 import decode_v2_ids, decode_v2_topk, v2_topk_names
from .rows import find_bad_id, first_row
from .spec import CacheSpec, decode_ids

__all__ = [
    "SAMPLED_NAMES",
    "decode_sampled",
    "decode_topk",
    "read_topk",
    "sampled_problem",
    "topk_names",
    "topk_problem",
]

SAMPLED_NAMES = ("sampled_ids", "sampled_counts")

Problem = tuple[int, str]  # (first bad row, what is wrong with it)


def topk_names(spec: CacheSpec) -> tuple[str, ...]:
    """The shard tensors holding the top-K rows of a cache of ``spec``."""
    if spec.codec == "v2":
        return v2_topk_names(spec)
    return ("ids", "values", "lse", "label_value")


def read_topk(
    parts: dict[str, torch.Tensor], spec: CacheSpec, *, check: bool = True
) -> tuple[TopKTarget, Problem | None]:
    """Stored top-K rows (``topk_names``) as a ``TopKTarget``, and their first problem (None
    when ``check`` is off or every row passes)."""
    if spec.codec == "v1":
        target = decode_topk(parts, spec)
        if not check:
            return target, None
        return target, topk_problem(target, parts["values"], parts["label_value"], spec)
    target, values, corrupt = decode_v2_topk(parts, spec)
    if not check:
        return target, None
    if corrupt.any():
        return target, (first_row(corrupt), "the id code of the row is corrupt")
    return target, topk_problem(target, values, parts["label_value"], spec)


def decode_topk(parts: dict[str, torch.Tensor], spec: CacheSpec) -> TopKTarget:
    """Stored top-K rows as a ``TopKTarget``: v1's ``ids``, ``values``, ``lse``,
    ``label_value``, or v2's (``codec_v2.py``, unchecked)."""
    if spec.codec == "v2":
        return decode_v2_topk(parts, spec)[0]
    ids = decode_ids(parts["ids"], spec.id_encoding)
    lse = parts["lse"]
    logits = spec.temperature * (parts["values"].to(torch.float32) + lse[:, None])
    label_logit = spec.temperature * (parts["label_value"].to(torch.float32) + lse)
    return TopKTarget(
        ids=ids, logits=logits, lse=lse, label_logit=label_logit, temperature=spec.temperature
    )


def decode_sampled(parts: dict[str, torch.Tensor], spec: CacheSpec) -> SampledTarget:
    """Stored ``sampled_ids``, ``sampled_counts`` rows as a ``SampledTarget``."""
    if spec.codec == "v2":
        ids = decode_v2_ids(parts["sampled_ids"], spec.sampled_k, spec)
    else:
        ids = decode_ids(parts["sampled_ids"], spec.id_encoding)
    weights = parts["sampled_counts"].to(torch.float32) / spec.sampled_draws
    return SampledTarget(ids=ids, weights=weights)


def mass_tolerance(spec: CacheSpec) -> float:
    """How far above 1 a row's stored top-K probabilities may sum."""
    # Rounding each stored log-prob v by a relative eps moves sum_j exp(v_j) by at most
    # eps * sum_j p_j |v_j| <= eps * log(K) (the entropy bound); 1e-3 covers an fp32 Lambda.
    # v2 decodes its values to the stored top-K mass, in fp32.
    eps = torch.finfo(torch.float32 if spec.codec == "v2" else spec.value_torch_dtype).eps
    return 1e-3 + eps * max(1.0, math.log(spec.k))


def _id_problem(ids: torch.Tensor, vocab_size: int, name: str) -> Problem | None:
    problem = find_bad_id(ids, vocab_size)
    if problem is None:
        return None
    row, value, out_of_range = problem
    if out_of_range:
        return row, f"{name} holds id {value} outside [0, {vocab_size})"
    return row, f"{name} holds id {value} twice"


def _first(problems: list[Problem | None]) -> Problem | None:
    found = [p for p in problems if p is not None]
    return min(found, key=lambda problem: problem[0]) if found else None


def _not_neg_inf_or_finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isnan(x) | (x == math.inf)


def _ids_ok(ids: torch.Tensor, vocab_size: int) -> bool:
    """No id outside ``[-1, vocab_size)``, none twice in a row: one sort, then [n] compares.

    numpy sorts short int32 rows about 15x faster than torch on CPU (0.7 ms against 12 ms for
    8192 x 64 ids): the sort is nearly all of the checks' cost, so it is numpy's.
    """
    if ids.shape[1] == 0:
        return True
    ordered = np.sort(ids.numpy(), axis=1)
    if ordered[:, 0].min() < -1:
        return False
    if vocab_size <= np.iinfo(ordered.dtype).max and ordered[:, -1].max() >= vocab_size:
        return False
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    return not bool(repeated.any())


def _topk_ok(
    target: TopKTarget, values: torch.Tensor, label: torch.Tensor, spec: CacheSpec
) -> bool:
    """True only if ``_topk_details`` finds nothing, in as few passes over ``[n, K]`` as can be.

    NaN or +inf in ``values`` makes the row's mass NaN or inf, so the mass test covers them.
    """
    tolerance = mass_tolerance(spec)
    return (
        bool((values.exp().sum(dim=1) <= 1 + tolerance).all())
        and not bool(((target.ids < 0) & (values > -math.inf)).any())
        and bool(torch.isfinite(target.lse).all())
        and bool(((label > -math.inf) & (label <= tolerance)).all())
        and bool((target.logits < math.inf).all())
        and bool(torch.isfinite(target.label_logit).all())
        and _ids_ok(target.ids, spec.vocab_size)
    )


def topk_problem(
    target: TopKTarget, values: torch.Tensor, label_value: torch.Tensor, spec: CacheSpec
) -> Problem | None:
    """The first bad row of a decoded top-K target, or None.

    Args:
        target: ``decode_topk`` of the stored rows.
        values: ``[n, K]`` the stored log-probs (any float dtype).
        label_value: ``[n]`` the stored label log-probs.
        spec: the cache spec.
    """
    if target.ids.shape[0] == 0:
        return None
    values = values.to(torch.float32)
    label = label_value.to(torch.float32)
    if _topk_ok(target, values, label, spec):  # the common case: no row-by-row diagnosis
        return None
    return _topk_details(target, values, label, spec) or (0, "rows fail the value checks")


def _topk_details(
    target: TopKTarget, values: torch.Tensor, label: torch.Tensor, spec: CacheSpec
) -> Problem | None:
    problems = [_id_problem(target.ids, spec.vocab_size, "ids")]
    bad = _not_neg_inf_or_finite(values)
    if bad.any():
        problems.append((first_row(bad), "values hold NaN or +inf"))
    empty_with_value = (target.ids < 0) & (values != -math.inf)
    if empty_with_value.any():
        problems.append((first_row(empty_with_value), "an empty id slot has a finite value"))
    mass = values.exp().sum(dim=1)
    too_much = mass > 1 + mass_tolerance(spec)  # False for NaN: reported above
    if too_much.any():
        row = int(too_much.nonzero()[0, 0])
        problems.append((row, f"top-K probabilities sum to {float(mass[row]):.6g} > 1"))
    finite_lse = torch.isfinite(target.lse)
    if not finite_lse.all():
        problems.append((first_row(~finite_lse), "lse is not finite"))
    finite_label = torch.isfinite(label)
    if not finite_label.all():
        problems.append((first_row(~finite_label), "label value is not finite"))
    elif (label > mass_tolerance(spec)).any():
        problems.append((first_row(label > mass_tolerance(spec)), "label probability above 1"))
    overflow = _not_neg_inf_or_finite(target.logits)
    if overflow.any():
        problems.append((first_row(overflow), "teacher logit T_c * (value + lse) is not finite"))
    label_overflow = ~torch.isfinite(target.label_logit)
    if label_overflow.any():
        problems.append((first_row(label_overflow), "label logit T_c * (value + lse) overflows"))
    return _first(problems)


def sampled_problem(target: SampledTarget, counts: torch.Tensor, spec: CacheSpec) -> Problem | None:
    """The first bad row of a decoded sampled target, or None.

    Args:
        target: ``decode_sampled`` of the stored rows.
        counts: ``[n, Ks]`` the stored draw counts.
        spec: the cache spec.
    """
    if target.ids.shape[0] == 0:
        return None
    counts = counts.to(torch.int64)
    ok = (
        bool(torch.where(target.ids < 0, counts == 0, counts >= 1).all())
        and bool((counts.sum(dim=1) == spec.sampled_draws).all())
        and _ids_ok(target.ids, spec.vocab_size)
    )
    if ok:  # counts in {0} or [1, draws]: the weights are finite and >= 0
        return None
    problems = [_id_problem(target.ids, spec.vocab_size, "sampled_ids")]
    bad = torch.where(target.ids < 0, counts != 0, counts < 1)
    if bad.any():
        problems.append((first_row(bad), "sampled_counts are not >= 1 for ids, 0 for empty"))
    wrong = counts.sum(dim=1) != spec.sampled_draws
    if wrong.any():
        problems.append(
            (int(wrong.nonzero()[0, 0]), f"sampled_counts do not sum to {spec.sampled_draws}")
        )
    weights = target.weights
    bad_weights = ~torch.isfinite(weights) | (weights < 0)
    if bad_weights.any():  # implied by the counts; checked on what the loss actually receives
        problems.append((first_row(bad_weights), "sampled weights are not finite and >= 0"))
    return _first(problems)
