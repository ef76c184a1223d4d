"""Median times of an op call on a backend, and baselines that may fail without failing a row."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from .compare import Row
from .errors import first_line
from .op_backends import Backend


class Timer:
    """Median milliseconds of ``reps`` calls after ``warmup``, each ended by a device sync.

    The sync after each call is what makes the time the kernel's: NPU launches are asynchronous.
    """

    def __init__(self, backend: Backend, reps: int, warmup: int) -> None:
        self.backend, self.reps, self.warmup = backend, reps, warmup

    def __call__(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        self.backend.synchronize()
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            fn()
            self.backend.synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)


def time_baseline(timer: Timer, fn: Callable[[], Any], row: Row, what: str) -> float | None:
    """A baseline's time, or None with a note: a failing baseline does not fail our kernel."""
    try:
        return timer(fn)
    except Exception as exc:
        row.note = "; ".join(filter(None, [row.note, f"{what}: {first_line(exc)}"]))
        return None
