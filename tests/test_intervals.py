"""Wilson and Newcombe (paired) 95% intervals: the score equation at Wilson's bounds, the
closed forms at 0 and n, coverage by simulation, and the gain from pairing."""

from __future__ import annotations

import math
import random

import pytest

from pangu_fastkd.train.intervals import Z_95, paired_difference, wilson_interval


@pytest.mark.parametrize("successes,n", [(1, 10), (5, 10), (81, 263), (999, 1000), (37, 40)])
def test_wilson_bounds_solve_the_score_equation(successes, n):
    # Wilson's interval is the set of p whose score test |x - n p| / sqrt(n p (1 - p)) <= z
    # accepts x: both bounds solve the equation with equality.
    interval = wilson_interval(successes, n)
    for p in (interval.low, interval.high):
        assert (successes - n * p) ** 2 == pytest.approx(Z_95**2 * n * p * (1 - p), rel=1e-9)
    assert interval.low < successes / n < interval.high
    assert interval.value == successes / n


def test_wilson_at_zero_and_n():
    n = 200
    none, every = wilson_interval(0, n), wilson_interval(n, n)
    assert none.low == 0.0 and none.high == pytest.approx(Z_95**2 / (n + Z_95**2))
    assert every.high == 1.0 and every.low == pytest.approx(n / (n + Z_95**2))


def test_wilson_width_at_the_eval_sizes():
    # About +-6 points at 200 problems and 50%, about +-3 at 1,000: why the eval grew.
    at_200, at_1000 = wilson_interval(100, 200), wilson_interval(500, 1000)
    assert 0.13 < at_200.high - at_200.low < 0.14
    assert 0.061 < at_1000.high - at_1000.low < 0.063


@pytest.mark.parametrize("bad", [(-1, 10), (11, 10), (0, 0), (1.0, 10), (True, 10)])
def test_wilson_rejects_bad_counts(bad):
    with pytest.raises((ValueError, TypeError)):
        wilson_interval(*bad)


def _paired_draws(rng: random.Random, n: int, cells: tuple[float, float, float, float]):
    """n problems with P(both right), P(only new), P(only baseline), P(neither) = cells."""
    new, base = [], []
    for _ in range(n):
        u = rng.random()
        if u < cells[0]:
            outcome = (True, True)
        elif u < cells[0] + cells[1]:
            outcome = (True, False)
        elif u < cells[0] + cells[1] + cells[2]:
            outcome = (False, True)
        else:
            outcome = (False, False)
        new.append(outcome[0])
        base.append(outcome[1])
    return new, base


@pytest.mark.parametrize(
    "cells",
    [
        (0.50, 0.15, 0.05, 0.30),  # strongly correlated, true difference +0.10
        (0.20, 0.20, 0.20, 0.40),  # weakly correlated, no difference
        (0.05, 0.10, 0.02, 0.83),  # rare successes, +0.08
    ],
)
def test_paired_interval_covers_the_true_difference(cells):
    rng = random.Random(0)
    truth = cells[1] - cells[2]
    trials = 2000
    covered = 0
    for _ in range(trials):
        new, base = _paired_draws(rng, 200, cells)
        interval = paired_difference(new, base)
        covered += interval.low <= truth <= interval.high
    # Nominal 95%; Newcombe's method 10 stays within a point or two of it.
    assert 0.93 <= covered / trials <= 0.975


def test_pairing_narrows_the_interval_of_correlated_outcomes():
    rng = random.Random(1)
    new, base = _paired_draws(rng, 1000, (0.50, 0.04, 0.02, 0.44))
    paired = paired_difference(new, base)
    # Two independent Wilson intervals combined in quadrature: what ignoring the pairing gives.
    a, b = wilson_interval(sum(new), 1000), wilson_interval(sum(base), 1000)
    unpaired_half = math.hypot((a.high - a.low) / 2, (b.high - b.low) / 2)
    assert (paired.high - paired.low) / 2 < 0.5 * unpaired_half
    assert paired.value == pytest.approx(sum(new) / 1000 - sum(base) / 1000)


def test_paired_difference_edges():
    same = [True, False, True, True]
    interval = paired_difference(same, same)
    assert interval.value == 0.0 and interval.low < 0.0 < interval.high
    assert not interval.excludes_zero()
    all_better = paired_difference([True] * 50, [False] * 50)
    assert all_better.value == 1.0 and all_better.excludes_zero() and all_better.high == 1.0
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([True], [True, False])
    with pytest.raises(ValueError, match="at least 1"):
        paired_difference([], [])
