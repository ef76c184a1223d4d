"""What the kit prints and writes: the environment section, the table, the strict-JSON record."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .compare import Row

PROG = "pangu_fastkd.ascend_smoke"


def environment_lines(env: Mapping[str, Any]) -> list[str]:
    """The markdown heading and one bullet per environment fact, ``npu-smi info`` fenced last."""
    lines = [f"## {PROG}", ""]
    skip = {"npu_smi", "build_info"}
    lines.append(f"- build_info: `{env['build_info']}`")
    lines += [f"- {key}: {value}" for key, value in env.items() if key not in skip]
    if "npu_smi" in env:
        lines += ["", "npu-smi info:", "```", env["npu_smi"], "```"]
    return lines


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Row]) -> str:
    """The pass/fail table, one row per (op, case, dtype), then the overall verdict line."""
    header = (
        "| op | case | dtype | result | worst | max error | allowed | ours (ms) | baseline "
        "| baseline (ms) | speedup | reference (ms) | note |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        cells = (
            r.op, r.case, r.dtype, "PASS" if r.passed else "**FAIL**", r.worst,
            _fmt(r.error, ".2e"), _fmt(r.allowed, ".2e"), _fmt(r.ours_ms, ".3f"), r.baseline,
            _fmt(r.baseline_ms, ".3f"), speedup, _fmt(r.reference_ms, ".3f"),
            r.note.replace("|", "\\|"),
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    failed = sum(not r.passed for r in rows)
    if rows and not failed:
        lines += ["", f"PASS: all {len(rows)} rows passed"]
    else:
        lines += ["", f"FAIL: {failed} of {len(rows)} rows failed"]
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    """``x`` with NaN and infinities as strings (strict JSON has neither) and odd types as str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)
