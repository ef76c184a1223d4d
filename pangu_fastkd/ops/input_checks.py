"""Checks every op makes on its arguments before any kernel runs: one device for all tensors,
integers that fit the op schema's int64, finite option values, and the opt-in finiteness check of
the data (the policy is in ``docs/non-finite.md``).

Each check names the argument (and for data, the first bad row), so a caller sees which input is
wrong instead of a kernel error or a silent NaN.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "NonFiniteError",
    "check_finite_rows",
    "check_int64",
    "check_positive_finite",
    "check_real",
    "check_same_device",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class NonFiniteError(FloatingPointError, ValueError):
    """An input or result of an op holds NaN or an infinity where ``check_finite`` asks for
    finite numbers (a ``ValueError`` too, so callers that catch bad input catch it)."""


def check_same_device(op: str, tensors: dict[str, torch.Tensor | None]) -> torch.device:
    """Raise ``ValueError`` unless every given tensor is on one device; returns it.

    A tensor on the ``meta`` device next to real ones would otherwise reach the op's fake
    kernel, which returns uninitialised memory on the real tensors' device.

    Args:
        op: the op's name, for the message.
        tensors: argument name -> tensor (None entries are skipped), the first one decides.
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "every tensor argument must be on one device"
            )
    return first.device


def check_int64(op: str, name: str, value: int) -> int:
    """Raise ``TypeError`` unless ``value`` is an int (not a bool) and ``ValueError`` unless it
    fits int64, the op schema's integer; returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{op}: {name} must fit in int64, got {value}")
    return value


def check_real(op: str, name: str, value: object) -> float:
    """Raise ``TypeError`` unless ``value`` is a real number (an int, a float or a numpy scalar,
    not a bool); returns it as a float.

    The ops hand options to their kernel through ``float()``, which parses a string (``"2.0"``)
    and reads a bool as 0 or 1: without this check such a value ran silently.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def check_positive_finite(op: str, name: str, value: float) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be finite and > 0, got {value}")
    return float(value)


# Elements per slice of a checked tensor: the masks of a slice, not of a whole LM head
# (V x d bools, 235 MB for openPangu's), are what the check holds at a time.
_CHECK_SLICE_ELEMENTS = 1 << 22


def _bad_mask(t: torch.Tensor, allow_neg_inf: bool) -> torch.Tensor:
    """``[rows, -1]`` bool: the NaN or infinite entries of ``t`` (``-inf`` allowed if asked)."""
    wrong = ~torch.isfinite(t)
    if allow_neg_inf:
        wrong &= t != -math.inf
    return wrong.reshape(t.shape[0], -1) if t.dim() else wrong.reshape(1, 1)


def _any_bad(t: torch.Tensor, allow_neg_inf: bool) -> torch.Tensor:
    """0-dim bool: whether ``t`` holds a bad entry, checked a slice of rows at a time."""
    if t.dim() == 0 or t.numel() <= _CHECK_SLICE_ELEMENTS:
        return _bad_mask(t, allow_neg_inf).any()
    rows = max(1, _CHECK_SLICE_ELEMENTS // max(1, t[0].numel()))
    return torch.stack(
        [_bad_mask(part, allow_neg_inf).any() for part in torch.split(t, rows)]
    ).any()


def check_finite_rows(
    op: str, tensors: dict[str, torch.Tensor | None], *, allow_neg_inf: tuple[str, ...] = ()
) -> None:
    """Raise ``NonFiniteError`` naming the first tensor with a NaN or infinity and its first bad
    row (index along dim 0).

    One reduction per tensor and one device-to-host read for all of them; only on failure is
    the row looked up.

    Args:
        op: the op's name, for the message.
        tensors: argument name -> tensor (None skipped); checked in this order.
        allow_neg_inf: names whose ``-inf`` entries are legal (teacher logits of impossible
            tokens).
    """
    present = [(name, t) for name, t in tensors.items() if t is not None and t.numel() > 0]
    if not present:
        return
    flags = torch.stack([_any_bad(t, name in allow_neg_inf) for name, t in present]).cpu()
    for (name, t), flag in zip(present, flags.tolist(), strict=True):
        if flag:
            wrong = _bad_mask(t, name in allow_neg_inf)
            row = int(wrong.any(dim=1).nonzero()[0, 0])
            value = t.reshape(wrong.shape)[row][wrong[row]][0].item()
            where = f"row {row}" if t.dim() else "its value"
            raise NonFiniteError(f"{op}: {name} holds {value} in {where} (check_finite=True)")
