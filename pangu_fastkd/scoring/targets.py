"""What the teacher says about each supervised token, from its full-vocabulary logits.

Per row (one supervised position) the cache keeps, as ``docs/kd-losses.md`` defines them: the
top-K ids and raw logits, the log-partition ``Lambda = logsumexp(t / T_c)`` over the whole
vocabulary, the label token's raw logit and, optionally, ids drawn from the teacher at ``T_c``
with their draw counts (random-sampling KD; weight = count / draws, so no importance correction
is needed when the proposal is the teacher itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowTargets", "rows_to_targets", "sample_counts"]


@dataclass(frozen=True)
class RowTargets:
    """Targets of ``n`` supervised rows.

    Attributes:
        topk_ids: ``[n, K]`` int32, highest logit first.
        topk_logits: ``[n, K]`` float32 raw teacher logits.
        lse: ``[n]`` float32 ``logsumexp(t / T_c)`` over the vocabulary.
        label_logit: ``[n]`` float32 raw logit of the label token.
        sampled_ids: ``[n, draws]`` int32 distinct drawn ids, ``-1`` padded, or None.
        sampled_counts: ``[n, draws]`` int32 how often each id was drawn (0 on padding), or None.
    """

    topk_ids: torch.Tensor
    topk_logits: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor
    sampled_ids: torch.Tensor | None = None
    sampled_counts: torch.Tensor | None = None


def sample_counts(
    probs: torch.Tensor, draws: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws ``draws`` ids per row from ``probs`` with replacement.

    Args:
        probs: ``[n, V]`` float32 probabilities (rows summing to 1), the teacher at ``T_c``.
        draws: samples per row.
        generator: the source of randomness (seeded by the caller for reproducibility).

    Returns:
        ``ids [n, draws]`` int32, the distinct drawn ids in increasing order, ``-1`` padded, and
        ``counts [n, draws]`` int32, their multiplicities (summing to ``draws`` per row).
    """
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)  # [n, draws]
    drawn, _ = drawn.sort(dim=1)
    is_first = torch.ones_like(drawn, dtype=torch.bool)
    is_first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = is_first.long().cumsum(dim=1) - 1  # the output column of each draw's id
    ids = torch.full_like(drawn, -1)
    ids.scatter_(1, slot, drawn)  # every draw of one id writes the same value to its slot
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    return ids.int(), counts.int()


# exp(-80) ~ 1.8e-35 is still a normal float. Clamping the shifted logits there keeps exp() out of
# subnormal results, which made a plain logsumexp over a 152k vocabulary 10x slower than the
# LM-head GEMM itself; the mass it adds (at most V * 1.8e-35) is far below fp32 resolution.
_MIN_SHIFTED_LOGIT = -80.0


def rows_to_targets(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int,
    temperature: float,
    draws: int = 0,
    generator: torch.Generator | None = None,
    overwrite: bool = False,
) -> RowTargets:
    """Reduces full-vocabulary teacher logits to the cached targets.

    Args:
        logits: ``[n, V]`` float32 raw teacher logits of the supervised rows.
        labels: ``[n]`` int64 label token of each row.
        k: how many top logits to keep (``1 <= k <= V``).
        temperature: the cache temperature ``T_c`` of ``lse`` (and of the samples).
        draws: random-sampling draws per row (0: none).
        generator: required when ``draws > 0``.
        overwrite: ``logits`` (float32) may be used as scratch space, saving a [n, V] copy.
    """
    n, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < vocab):
        raise ValueError(f"labels must be token ids in [0, {vocab})")
    if draws > 0 and generator is None:
        raise ValueError("draws > 0 needs a seeded generator")
    top_logits, top_ids = logits.topk(k, dim=1)  # ordering does not depend on the temperature
    label_logit = logits.gather(1, labels.long()[:, None])[:, 0].float()
    # From here on, work in place: scaled logits -> shifted -> exp -> probabilities.
    scaled = logits.float() if overwrite else logits.float().clone()
    if temperature != 1.0:
        scaled.mul_(1.0 / temperature)
    row_max = scaled.amax(dim=1, keepdim=True)  # [n, 1]
    exps = scaled.sub_(row_max).clamp_(min=_MIN_SHIFTED_LOGIT).exp_()
    sums = exps.sum(dim=1, keepdim=True)
    lse = (sums.log() + row_max)[:, 0]
    sampled_ids = sampled_counts = None
    if draws > 0:
        sampled_ids, sampled_counts = sample_counts(exps.div_(sums), draws, generator)
    return RowTargets(
        top_ids.int(), top_logits.float(), lse, label_logit, sampled_ids, sampled_counts
    )
