"""The pass rule and the table's rows: each output's error against plain PyTorch's.

A row passes when, for each output, ``max |ours - exact|`` is at most
``2 x max |plain PyTorch - exact| + FLOOR x max |exact|`` (flash-attention's rule: judged
against what plain PyTorch in the same dtype gets wrong, not against a fixed atol).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# The absolute part of every bound, relative to the largest exact value: what fp32 round-off
# across a different summation order can reach, far below any bf16/fp16 error.
FLOOR = 1e-5


@dataclass
class Row:
    """One line of the table: an (op, case, dtype) and how it went."""

    op: str
    case: str
    dtype: str
    passed: bool = False
    worst: str = ""  # the output with the largest error / allowed ratio
    error: float | None = None
    allowed: float | None = None
    ours_ms: float | None = None
    baseline: str = ""
    baseline_ms: float | None = None
    reference_ms: float | None = None  # attention only: the reference besides the baseline
    note: str = ""
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """Baseline time / our time (above 1: ours is faster), when both were timed."""
        if self.ours_ms and self.baseline_ms:
            return self.baseline_ms / self.ours_ms
        return None


@dataclass(frozen=True)
class Output:
    """One compared output: our error, plain PyTorch's error, both against the exact result."""

    name: str
    error: float
    pytorch_error: float
    scale: float  # max |exact|, for the absolute floor of the bound

    @property
    def allowed(self) -> float:
        """The largest error that passes."""
        return 2 * self.pytorch_error + FLOOR * self.scale


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 on the CPU (0 for empty tensors); NaN when either has one."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def max_abs(t: torch.Tensor) -> float:
    """``max |t|`` (0 for an empty tensor)."""
    return t.detach().abs().max().item() if t.numel() else 0.0


def compare(
    name: str, ours: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype
) -> Output:
    """``ours`` and ``plain`` (plain PyTorch in ``dtype``) against ``exact``, all the same shape.

    Raises:
        ValueError: ``ours`` has another shape than ``exact``.
        TypeError: ``ours`` is not in ``dtype``.
    """
    if tuple(ours.shape) != tuple(exact.shape):
        raise ValueError(f"{name} has shape {tuple(ours.shape)}, expected {tuple(exact.shape)}")
    if ours.dtype != dtype:
        raise TypeError(f"{name} is {ours.dtype}, expected {dtype}")
    return Output(name, max_err(ours, exact), max_err(plain, exact), max_abs(exact))


def judge(row: Row, outputs: Sequence[Output]) -> None:
    """Fill the row's verdict from its outputs; NaN errors fail (NaN <= x is False)."""

    def ratio(o: Output) -> float:
        if math.isnan(o.error):
            return math.inf
        return o.error / o.allowed if o.allowed > 0 else (0.0 if o.error == 0 else math.inf)

    worst = max(outputs, key=ratio)
    row.worst, row.error, row.allowed = worst.name, worst.error, worst.allowed
    row.passed = all(o.error <= o.allowed for o in outputs)
    row.outputs = {
        o.name: {"error": o.error, "pytorch_error": o.pytorch_error, "allowed": o.allowed}
        for o in outputs
    }
