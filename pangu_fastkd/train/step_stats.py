"""Per-row statistics of one optimizer step, as sums and counts that add over micro-batches
and ranks.

Each key holds the sum of its per-row values and the number of rows summed. Micro-batches add
to them; the step sends ``flat()`` inside its one all-reduce (with the loss and the bad-gradient
flag, so logging costs no extra collective) and reads the global means back with
``from_flat``. A mean is then over every row of the step on every rank, the way the loss is
normalised by the global count of supervised tokens.
"""

from __future__ import annotations

import torch

from .kd_health import HEALTH_KEYS

__all__ = ["STEP_STAT_KEYS", "StepStats"]

# The order of the flat tensor: the same on every rank, whatever each rank has added.
# hard_loss: CE_i at temperature 1; soft_loss: D_i before kd_weight * T^2 (docs/kd-losses.md).
STEP_STAT_KEYS = ("hard_loss", "soft_loss", *HEALTH_KEYS)


class StepStats:
    """Sums and row counts of the ``STEP_STAT_KEYS`` statistics, in float64 on the CPU (where
    the step's all-reduce runs)."""

    def __init__(self) -> None:
        # Row 0 the sums, row 1 the counts. float64: a step's sums of thousands of small values
        # keep their digits, and the all-reduce carries them in the dtype of the loss.
        self.totals = torch.zeros(2, len(STEP_STAT_KEYS), dtype=torch.float64)

    def add(self, key: str, values: torch.Tensor) -> None:
        """Adds per-row ``values`` (``[n]``, any float dtype) to ``key``'s sum and ``n`` to its
        count."""
        i = STEP_STAT_KEYS.index(key)
        self.totals[0, i] += values.detach().double().sum().cpu()
        self.totals[1, i] += values.numel()

    def clear(self) -> None:
        self.totals.zero_()

    def flat(self) -> torch.Tensor:
        """``[2 * len(STEP_STAT_KEYS)]`` float64: the sums, then the counts."""
        return self.totals.flatten()

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> StepStats:
        """The statistics ``flat()`` gave (after an all-reduce: summed over ranks)."""
        stats = cls()
        stats.totals.copy_(flat.reshape(stats.totals.shape))
        return stats

    def means(self) -> dict[str, float]:
        """``{key: sum / count}`` of the keys with at least one row, in ``STEP_STAT_KEYS`` order.
        A non-finite mean stays as it is (``metrics.jsonl`` writes it as null)."""
        sums, counts = self.totals.tolist()
        return {
            key: total / count
            for key, total, count in zip(STEP_STAT_KEYS, sums, counts, strict=True)
            if count > 0
        }
