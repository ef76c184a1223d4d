"""The ranges of the numeric fields of the config tables, declared next to each field.

A table declares ``lr: float = number(1e-3, above=0)``; its ``validate`` calls
``check_numbers(self, where)``, which refuses, naming the field's config path (``stages.2.
train.optim.lr``): a bool or a float where an int belongs, an int outside int64 (torch takes no
other), NaN and infinities, and values outside the declared range. Declaring the range with the
field means a new numeric field cannot be added without one (``tests/test_config_hardening.py``
checks that every int and float field of every table has a declaration).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .overrides import ConfigError, show_value

__all__ = ["INT64_MAX", "INT64_MIN", "Range", "check_numbers", "number", "range_of"]

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
_RANGE_KEY = "pangu_fastkd.range"


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take: ``at_least <= v``, ``above < v``, ``v <= at_most``,
    ``v < below`` (None: no such bound), with ``note`` saying what special values mean."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    note: str = ""

    def holds(self, value: float) -> bool:
        """Whether ``value`` (finite) is in the range."""
        return not (
            (self.at_least is not None and value < self.at_least)
            or (self.above is not None and value <= self.above)
            or (self.at_most is not None and value > self.at_most)
            or (self.below is not None and value >= self.below)
        )

    def describe(self) -> str:
        """The range in words, e.g. ``in [0, 1)``, ``> 0`` or ``>= 1 (0: all)``."""
        low = (f"[{_num(self.at_least)}" if self.at_least is not None else None) or (
            f"({_num(self.above)}" if self.above is not None else None
        )
        high = (f"{_num(self.at_most)}]" if self.at_most is not None else None) or (
            f"{_num(self.below)})" if self.below is not None else None
        )
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = (">= " if low[0] == "[" else "> ") + low[1:]
        elif high:
            text = ("<= " if high[-1] == "]" else "< ") + high[:-1]
        else:
            text = "a number"
        return f"{text} {self.note}" if self.note else text


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def number(
    default: float,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    note: str = "",
) -> Any:
    """A dataclass field with ``default`` whose values must lie in the given range."""
    declared = Range(at_least, above, at_most, below, note)
    return dataclasses.field(default=default, metadata={_RANGE_KEY: declared})


def range_of(field: dataclasses.Field) -> Range | None:
    """The range declared for a field by ``number``, or None."""
    return field.metadata.get(_RANGE_KEY)


def check_numbers(table: Any, where: str) -> None:
    """Raises ``ConfigError`` naming ``<where>.<field>`` for the first numeric field of the
    dataclass ``table`` that is of the wrong type, not finite, beyond int64 or out of range.

    ``where`` is the table's config path ("" for the top level)."""
    for field in dataclasses.fields(table):
        declared = range_of(field)
        if declared is None:
            continue
        value = getattr(table, field.name)
        path = f"{where}.{field.name}" if where else field.name
        is_int = field.type == "int"
        if isinstance(value, bool) or not isinstance(value, int if is_int else int | float):
            kind = "an int" if is_int else "a number"
            raise ConfigError(f"{path} must be {kind}, got {show_value(value)}")
        if not is_int and not _finite(value):
            raise ConfigError(f"{path} must be a finite number, got {show_value(value)}")
        if not declared.holds(value):
            raise ConfigError(f"{path} must be {declared.describe()}, got {show_value(value)}")
        # torch takes ints as int64 and fails on others with "expected 'int', found 'int'".
        if is_int and not INT64_MIN <= value <= INT64_MAX:
            raise ConfigError(
                f"{path} must be within int64 (-2**63 to 2**63 - 1), got {show_value(value)}"
            )


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the largest float
        return False
