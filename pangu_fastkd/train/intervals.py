"""95% intervals for eval accuracies and for differences between two stages on the same problems.

An accuracy over n problems is a binomial proportion; its interval is Wilson's score interval,
which keeps its coverage near 0% and 100% and for small n, where the textbook ``p +- 1.96 se``
interval does not. Two stages evaluated on the same problems are *paired*: most problems are
right (or wrong) for both, so the difference of their accuracies is far less noisy than two
independent intervals suggest. Its interval is Newcombe's hybrid score interval for paired
proportions (Newcombe 1998, "Improved confidence intervals for the difference between binomial
proportions based on paired data", method 10): the two Wilson intervals combined with the
correlation of the paired outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Z_95", "Interval", "paired_difference", "wilson_interval"]

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval ``[low, high]`` (fractions, not percent)."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a difference outside the noise)."""
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> Interval:
    """Wilson's score interval for ``successes`` out of ``n``.

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside ``0..n``.
    """
    _check_count("n", n, 1)
    _check_count("successes", successes, 0)
    if successes > n:
        raise ValueError(f"successes ({successes}) cannot exceed n ({n})")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp the rounding error at 0 and 1 (the exact bounds there are 0 and 1).
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(
    correct: Sequence[bool], baseline: Sequence[bool], z: float = Z_95
) -> Interval:
    """Accuracy of ``correct`` minus accuracy of ``baseline`` on the same problems, with
    Newcombe's paired interval.

    Args:
        correct, baseline: one outcome per problem, in the same order (equal lengths >= 1).

    Returns:
        The difference (a fraction in [-1, 1]) and its interval.
    """
    if len(correct) != len(baseline):
        raise ValueError(
            f"paired outcomes need the same problems: {len(correct)} against {len(baseline)}"
        )
    n = len(correct)
    _check_count("number of problems", n, 1)
    both = only_new = only_base = neither = 0
    for new, base in zip(correct, baseline, strict=True):
        if new and base:
            both += 1
        elif new:
            only_new += 1
        elif base:
            only_base += 1
        else:
            neither += 1
    p_new, p_base = (both + only_new) / n, (both + only_base) / n
    new = wilson_interval(both + only_new, n, z)
    base = wilson_interval(both + only_base, n, z)
    margins = (both + only_new) * (neither + only_base) * (both + only_base) * (neither + only_new)
    phi = 0.0 if margins == 0 else (both * neither - only_new * only_base) / math.sqrt(margins)
    down_new, up_new = p_new - new.low, new.high - p_new
    down_base, up_base = p_base - base.low, base.high - p_base
    below = math.sqrt(max(0.0, down_new**2 - 2 * phi * down_new * up_base + up_base**2))
    above = math.sqrt(max(0.0, up_new**2 - 2 * phi * up_new * down_base + down_base**2))
    difference = p_new - p_base
    return Interval(difference, max(-1.0, difference - below), min(1.0, difference + above))


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
