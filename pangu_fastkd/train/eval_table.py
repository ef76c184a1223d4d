"""The eval table (``eval.md``): one Markdown row per evaluated stage, beside ``evaluate``.

Accuracies print with their 95% Wilson interval when the row keeps its per-problem outcomes
(``correct_<mode>``, see ``evaluate.outcome_string``): ``25.0% (22.4-27.8)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..durable import atomic_write_bytes
from .evaluate import parse_outcomes
from .intervals import wilson_interval

__all__ = ["EVAL_TABLE_COLUMNS", "eval_table", "write_eval_table"]

# (row key, header) in column order.
EVAL_TABLE_COLUMNS = (
    ("stage", "stage"),
    ("schedule", "schedule so far"),
    ("loss_reasoning", "eval loss (reasoning)"),
    ("loss_fast", "eval loss (fast)"),
    ("acc_reasoning", "accuracy (reasoning)"),
    ("acc_fast", "accuracy (fast)"),
)
_TEXT_KEYS = ("stage", "schedule")
# Keys a row may carry that are not columns: the stage it started from and the per-problem
# outcomes behind each accuracy.
EXTRA_KEYS = ("start", "correct_reasoning", "correct_fast")


def eval_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of eval results, one row per evaluated stage in the given order.

    Args:
        rows: dicts with ``stage`` (str, required), ``schedule`` (str: the stages run so far,
            e.g. ``"SFT(R) + SFT(F)"``) and ``loss_reasoning``, ``loss_fast``,
            ``acc_reasoning``, ``acc_fast`` (floats; accuracies as fractions in [0, 1]),
            optionally ``correct_<mode>`` (per-problem outcomes, which must agree with
            ``acc_<mode>``) and ``start``. A missing or None value prints as ``-``; unknown
            keys are an error (a misspelt key would otherwise print as a silent ``-``).

    Returns:
        The table without a trailing newline: columns padded to equal width, text columns
        left-aligned, numbers right-aligned; losses with 3 decimals, accuracies as percentages
        with 1 decimal (``87.5%``), followed by the 95% Wilson interval when the row has the
        outcomes (``87.5% (80.1-92.4)``).
    """
    if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a sequence of dicts, got {type(rows).__name__}")
    table = [[header for _, header in EVAL_TABLE_COLUMNS]]
    table += [_eval_row_cells(row, i) for i, row in enumerate(rows)]
    widths = [max(len(line[c]) for line in table) for c in range(len(EVAL_TABLE_COLUMNS))]
    right = [key not in _TEXT_KEYS for key, _ in EVAL_TABLE_COLUMNS]

    def fmt(cells: list[str]) -> str:
        padded = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(cells, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if r else (":" + "-" * (w - 1))
        for w, r in zip(widths, right, strict=True)
    ]
    lines = [fmt(table[0]), fmt(rule), *(fmt(cells) for cells in table[1:])]
    return "\n".join(lines)


def _eval_row_cells(row: Any, index: int) -> list[str]:
    where = f"eval_table row {index}"
    if not isinstance(row, dict):
        raise TypeError(f"{where} must be a dict, got {type(row).__name__}")
    known = {key for key, _ in EVAL_TABLE_COLUMNS} | set(EXTRA_KEYS)
    unknown = sorted(set(row) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; expected only {sorted(known)}")
    stage = row.get("stage")
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"{where}: 'stage' must be a non-empty str, got {stage!r}")
    cells = []
    for key, _ in EVAL_TABLE_COLUMNS:
        value = row.get(key)
        if value is None:
            cells.append("-")
        elif key in _TEXT_KEYS:
            if not isinstance(value, str):
                raise TypeError(f"{where}: {key!r} must be a str, got {type(value).__name__}")
            # A pipe would split the cell and a newline would end the row.
            cells.append(" ".join(value.split()).replace("|", "\\|"))
        else:
            cell = _format_metric(key, value, where)
            if key.startswith("acc_") and row.get("correct_" + key[4:]) is not None:
                cell += " " + _interval_text(row["correct_" + key[4:]], float(value), where)
            cells.append(cell)
    return cells


def _interval_text(outcome_text: Any, accuracy: float, where: str) -> str:
    try:
        outcomes = parse_outcomes(outcome_text)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not outcomes:
        raise ValueError(f"{where}: per-problem outcomes are empty")
    right = sum(outcomes)
    if abs(right / len(outcomes) - accuracy) > 1e-9:
        raise ValueError(
            f"{where}: accuracy {accuracy!r} disagrees with its outcomes ({right} of "
            f"{len(outcomes)})"
        )
    interval = wilson_interval(right, len(outcomes))
    return f"({100 * interval.low:.1f}-{100 * interval.high:.1f})"


def _format_metric(key: str, value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {key!r} must be a number or None, got {type(value).__name__}")
    value = float(value)
    if key.startswith("loss"):
        return f"{value:.3f}"  # nan / inf stay visible: a diverged stage is a result
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{where}: {key!r} must be a fraction in [0, 1], got {value!r} "
            "(pass accuracies as fractions, not percentages)"
        )
    return f"{100.0 * value:.1f}%"


def write_eval_table(path: str | Path, rows: Sequence[dict[str, Any]]) -> str:
    """Write ``eval_table(rows)`` plus a newline to ``path`` atomically; return the table."""
    table = eval_table(rows)
    atomic_write_bytes(Path(path), (table + "\n").encode("utf-8"))
    return table
