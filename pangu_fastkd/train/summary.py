"""What a run reports after each evaluated stage: ``eval.md`` (the eval table with 95% intervals,
the comparisons and what they say in words) and ``summary.json`` (the same figures for tools).

``summary.json``::

    {"eval_problems": {"reasoning": 1000, "fast": 1000},
     "stages": [{"stage", "schedule", "start", "accuracy": {mode: {value, low, high}},
                 "eval_loss": {mode: float}, "tokens_trained", "supervised_tokens",
                 "seconds"}, ...],
     "comparisons": [Comparison.as_dict(), ...]}

``tokens_trained`` and ``supervised_tokens`` sum the stage's logged training steps (None for rows
that did not train, e.g. ``init``); ``seconds`` is the wall time of the stage's last run (a
resumed stage counts from its resume).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..durable import atomic_write_bytes
from .comparisons import MODES, compare_rows, comparison_findings, comparison_table
from .eval_table import eval_table
from .evaluate import parse_outcomes
from .intervals import wilson_interval

__all__ = ["eval_report", "run_summary", "write_run_report"]


def eval_report(rows: Sequence[dict[str, Any]], compare: Sequence[tuple[str, str]] = ()) -> str:
    """``eval.md``'s text: the eval table, the problem counts, then (when two evaluated rows can
    be compared) the comparison table and its findings."""
    parts = [eval_table(rows)]
    counts = _problem_counts(rows)
    if counts:
        sizes = ", ".join(f"{n:,} {mode}" for mode, n in counts.items())
        parts.append(
            f"Accuracy: exact match of the greedy answer on held-out problems ({sizes}); in "
            "brackets its 95% Wilson interval."
        )
    comparisons = compare_rows(rows, compare)
    if comparisons:
        parts.append(
            "Differences are paired (the same problems), with Newcombe's 95% interval; "
            "'outside the noise' means the interval excludes 0.\n\n" + comparison_table(comparisons)
        )
        findings = comparison_findings(comparisons)
        if findings:
            parts.append("\n".join(f"- {line}" for line in findings))
    return "\n\n".join(parts)


def run_summary(
    rows: Sequence[dict[str, Any]],
    compare: Sequence[tuple[str, str]],
    metrics: Sequence[dict[str, Any]],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """``summary.json``'s content (see the module docstring).

    Args:
        rows: the eval rows, in table order.
        compare: the configured ``(stage, baseline)`` pairs.
        metrics: the run's metrics records (``read_metrics``).
        seconds: wall time per stage name.
    """
    tokens: dict[str, int] = {}
    supervised: dict[str, int] = {}
    for record in metrics:
        if record.get("kind") == "train":
            name = record["stage"]
            tokens[name] = tokens.get(name, 0) + int(record.get("tokens", 0))
            supervised[name] = supervised.get(name, 0) + int(record.get("supervised", 0))
    stages = []
    for row in rows:
        name = row["stage"]
        accuracy = {}
        for mode in MODES:
            text = row.get(f"correct_{mode}")
            if text:
                outcomes = parse_outcomes(text)
                accuracy[mode] = wilson_interval(sum(outcomes), len(outcomes)).as_dict()
        stages.append(
            {
                "stage": name,
                "schedule": row.get("schedule"),
                "start": row.get("start"),
                "accuracy": accuracy,
                "eval_loss": {
                    m: _finite_or_none(row[f"loss_{m}"])
                    for m in MODES
                    if row.get(f"loss_{m}") is not None
                },
                "tokens_trained": tokens.get(name),
                "supervised_tokens": supervised.get(name),
                "seconds": seconds.get(name),
            }
        )
    return {
        "eval_problems": _problem_counts(rows),
        "stages": stages,
        "comparisons": [c.as_dict() for c in compare_rows(rows, compare)],
    }


def write_run_report(
    run_dir: Path,
    rows: Sequence[dict[str, Any]],
    compare: Sequence[tuple[str, str]],
    metrics: Sequence[dict[str, Any]],
    seconds: dict[str, float],
) -> str:
    """Writes ``eval.md`` and ``summary.json`` into ``run_dir`` (atomically); returns
    ``eval.md``'s text."""
    report = eval_report(rows, compare)
    atomic_write_bytes(run_dir / "eval.md", (report + "\n").encode("utf-8"))
    summary = run_summary(rows, compare, metrics, seconds)
    text = json.dumps(summary, indent=1, allow_nan=False)
    atomic_write_bytes(run_dir / "summary.json", (text + "\n").encode("utf-8"))
    return report


def _finite_or_none(value: float) -> float | None:
    # JSON has no NaN: a diverged stage's loss is written as null (eval.md shows the nan).
    return float(value) if math.isfinite(value) else None


def _problem_counts(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        for mode in MODES:
            text = row.get(f"correct_{mode}")
            if text:
                counts.setdefault(mode, len(text))
    return counts
