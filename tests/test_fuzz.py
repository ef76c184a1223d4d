"""The fuzz suite: seeded probes of both ops, the logit cache's reader and ``verify``, the data
readers and the config loader, as a hostile or careless user would try them.

Every probe must give the documented result (checked against the reference where it
succeeds) or raise a named error: ``ValueError`` and ``TypeError`` with a message naming the
argument, ``NonFiniteError``, ``CacheError``, ``ConfigError``, ``RecordError``. A crash, a hang,
another exception type or a bad input accepted silently fails the test, naming the case.

Each category runs in a child process (``fuzz_harness.py``); after a crash the parent starts a
new child at the next case, so one run reports every failing case. The seed is fixed for CI;
``PANGU_FUZZ_SEED=<n>`` draws other cases and ``PANGU_FUZZ_SCALE=<x>`` multiplies their number.
The count of cases run is printed at the end of the session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import fuzz_files
import fuzz_ops
import pytest
from fuzz_harness import CASE_TIMEOUT_S

TESTS = Path(__file__).resolve().parent
HARNESS = TESTS / "fuzz_harness.py"
SEED = int(os.environ.get("PANGU_FUZZ_SEED", "0"))
# A whole category's child, restarts included: far above the few seconds each one takes.
CATEGORY_TIMEOUT_S = 900

CATEGORIES = [("fuzz_ops", c) for c in fuzz_ops.CATEGORIES] + [
    ("fuzz_files", c) for c in fuzz_files.CATEGORIES
]

# category -> cases run, filled in by the tests and printed by conftest.py's summary hook.
COUNTS: dict[str, int] = {}


@dataclass
class Report:
    """What the children of one category reported."""

    count: int | None = None
    passed: int = 0
    failures: list[str] = field(default_factory=list)


def _parse(stdout: str, report: Report, names: dict[int, str]) -> tuple[bool, int | None]:
    """Reads one child's lines into ``report``; returns (finished, index of the case running
    when the output stopped)."""
    running = None
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "COUNT":
            report.count = int(rest)
        elif word == "START":
            index, _, name = rest.partition(" ")
            running = int(index)
            names[running] = name
        elif word == "PASS":
            report.passed += 1
            running = None
        elif word == "FAIL":
            index, _, why = rest.partition(" ")
            report.failures.append(f"{names[int(index)]}: {why}")
            running = None
        elif word == "DONE":
            return True, None
    return False, running


def _death(returncode: int) -> str:
    if returncode == -signal.SIGALRM:
        return f"hang (no result after {CASE_TIMEOUT_S} s)"
    if returncode < 0:
        return f"crash ({signal.Signals(-returncode).name})"
    return f"the child exited with status {returncode} mid-case"


def run_category(module: str, category: str, workdir: Path) -> Report:
    """All cases of ``category``, restarting the child after the case that killed it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    report, names, start = Report(), {}, 0
    while True:
        command = [sys.executable, str(HARNESS), module, category, str(SEED), str(workdir)]
        child = subprocess.run(
            [*command, str(start)],
            capture_output=True,
            text=True,
            timeout=CATEGORY_TIMEOUT_S,
            env=env,
        )
        finished, running = _parse(child.stdout, report, names)
        if finished:
            return report
        tail = " | ".join(child.stderr.strip().splitlines()[-3:])
        if running is None:
            report.failures.append(f"(no case running) child died: {_death(child.returncode)}")
            report.failures.append(f"stderr: {tail}")
            return report
        report.failures.append(f"{names[running]}: {_death(child.returncode)}; stderr: {tail}")
        start = running + 1
        if report.count is not None and start >= report.count:
            return report


@pytest.mark.parametrize("module,category", CATEGORIES, ids=[c for _, c in CATEGORIES])
def test_fuzz(module: str, category: str, tmp_path: Path) -> None:
    report = run_category(module, category, tmp_path)
    assert report.count, f"{category}: no cases"
    COUNTS[category] = report.count
    assert not report.failures, (
        f"{category}: {len(report.failures)} of {report.count} cases failed:\n"
        + "\n".join(report.failures[:40])
    )
    assert report.passed == report.count
