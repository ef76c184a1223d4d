"""Stage against baseline on the same held-out problems: the accuracy difference, its paired 95%
interval, and a sentence saying whether it is outside the noise.

Two kinds of pairs: every trained stage against the stage it started from (what the stage
bought), and the pairs a config names in ``eval.compare`` (e.g. KD against the same-compute SFT
control, or the teacher against the student).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .evaluate import parse_outcomes
from .intervals import Interval, paired_difference, wilson_interval

__all__ = [
    "Comparison",
    "compare_rows",
    "comparison_findings",
    "comparison_table",
]

MODES = ("reasoning", "fast")


@dataclass(frozen=True)
class Comparison:
    """``stage`` against ``baseline`` in one eval mode.

    Attributes:
        stage, baseline: eval row names.
        mode: ``"reasoning"`` or ``"fast"``.
        accuracy, baseline_accuracy: Wilson intervals of the two accuracies.
        difference: accuracy of ``stage`` minus that of ``baseline``, with Newcombe's paired
            interval.
        configured: named in ``eval.compare`` (else: a stage against the one it started from).
    """

    stage: str
    baseline: str
    mode: str
    accuracy: Interval
    baseline_accuracy: Interval
    difference: Interval
    configured: bool

    @property
    def outside_noise(self) -> bool:
        return self.difference.excludes_zero()

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "baseline": self.baseline,
            "mode": self.mode,
            "accuracy": self.accuracy.as_dict(),
            "baseline_accuracy": self.baseline_accuracy.as_dict(),
            "difference": self.difference.as_dict(),
            "outside_noise": self.outside_noise,
            "configured": self.configured,
        }


def compare_rows(
    rows: Sequence[dict[str, Any]], configured: Sequence[tuple[str, str]] = ()
) -> list[Comparison]:
    """The comparisons the eval rows support, configured pairs first.

    Args:
        rows: eval rows (``stage``, optional ``start`` and ``correct_<mode>``); a row without
            outcomes in a mode, or a pair with a row not evaluated yet, gives no comparison.
        configured: ``(stage, baseline)`` pairs from ``eval.compare``.

    Raises:
        ValueError: two rows of a pair were evaluated on different numbers of problems.
    """
    by_name = {row["stage"]: row for row in rows}
    pairs = [(stage, baseline, True) for stage, baseline in configured]
    pairs += [(row["stage"], row["start"], False) for row in rows if row.get("start")]
    seen: set[tuple[str, str]] = set()
    out = []
    for stage, baseline, is_configured in pairs:
        if (stage, baseline) in seen or stage not in by_name or baseline not in by_name:
            continue
        seen.add((stage, baseline))
        for mode in MODES:
            new, base = (
                by_name[stage].get(f"correct_{mode}"),
                by_name[baseline].get(f"correct_{mode}"),
            )
            if new is None or base is None:
                continue
            new, base = parse_outcomes(new), parse_outcomes(base)
            if len(new) != len(base):
                raise ValueError(
                    f"{stage} and {baseline} were evaluated on {len(new)} and {len(base)} "
                    f"{mode} problems; a paired comparison needs the same problems"
                )
            out.append(
                Comparison(
                    stage,
                    baseline,
                    mode,
                    wilson_interval(sum(new), len(new)),
                    wilson_interval(sum(base), len(base)),
                    paired_difference(new, base),
                    is_configured,
                )
            )
    return out


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def comparison_table(comparisons: Sequence[Comparison]) -> str:
    """Markdown table: stage, baseline, mode, both accuracies, the difference in points with
    its 95% interval, and whether it is outside the noise."""
    lines = [
        "| stage | baseline | mode | accuracy | baseline accuracy | difference (points) "
        "| 95% CI (points) | outside the noise |",
        "| :-- | :-- | :-- | --: | --: | --: | --: | :-- |",
    ]
    for c in comparisons:
        lines.append(
            f"| {c.stage} | {c.baseline} | {c.mode} | {100 * c.accuracy.value:.1f}% "
            f"| {100 * c.baseline_accuracy.value:.1f}% | {_points(c.difference.value)} "
            f"| {_points(c.difference.low)} to {_points(c.difference.high)} "
            f"| {'yes' if c.outside_noise else 'no'} |"
        )
    return "\n".join(lines)


def comparison_findings(comparisons: Sequence[Comparison]) -> list[str]:
    """One sentence per configured comparison, then one naming the stages whose gain over
    their start is outside the noise."""
    sentences = []
    for c in comparisons:
        if not c.configured:
            continue
        diff = c.difference
        verdict = (
            f"outside the noise: {c.stage if diff.value > 0 else c.baseline} is better"
            if c.outside_noise
            else "within the noise: the two cannot be told apart on these problems"
        )
        sentences.append(
            f"{c.stage} against {c.baseline} ({c.mode} mode): {_points(diff.value)} points "
            f"(95% CI {_points(diff.low)} to {_points(diff.high)}), {verdict}."
        )
    gains = [
        f"{c.stage} ({c.mode})"
        for c in comparisons
        if not c.configured and c.outside_noise and c.difference.value > 0
    ]
    losses = [
        f"{c.stage} ({c.mode})"
        for c in comparisons
        if not c.configured and c.outside_noise and c.difference.value < 0
    ]
    if gains:
        sentences.append(
            "Gains over the stage started from, outside the noise: " + ", ".join(gains) + "."
        )
    if losses:
        sentences.append("Losses outside the noise: " + ", ".join(losses) + ".")
    return sentences
