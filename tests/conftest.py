"""Session hooks of the test suite."""

from __future__ import annotations

import sys


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Prints how many fuzz cases ran, per category (``test_fuzz.py``)."""
    fuzz = sys.modules.get("test_fuzz")
    counts = getattr(fuzz, "COUNTS", None)
    if not counts:
        return
    parts = ", ".join(f"{category} {n}" for category, n in sorted(counts.items()))
    terminalreporter.write_line(f"fuzz: {sum(counts.values())} cases ({parts})")
