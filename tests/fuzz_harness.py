"""The fuzz suite's protocol and its child process.

A fuzz module (``fuzz_ops``, ``fuzz_files``) exposes ``CATEGORIES`` (names) and
``make_cases(category, seed, workdir) -> list[Case]``: a deterministic list for a seed, cheap
to build (each case's work happens in its ``run``). A case either must succeed (``expect`` is
None; its ``run`` checks the values it got, e.g. against the PyTorch reference) or must raise
one of the named, documented error types (``expect``), with a message matching ``match``.
Anything else is a failure: another exception type (a traceback a user would see), a silent
acceptance of a bad input, a crash of the process or a hang.

The cases run in a child process (``python tests/fuzz_harness.py <module> <category> <seed>
<workdir> <start>``) because a crash is possible. It prints one line per event, flushed, so
that the parent knows which case was running when the process died::

    COUNT <n>
    START <i> <name>
    PASS <i>
    FAIL <i> <why, one line>
    DONE

Each case runs under ``signal.alarm`` with the default action: a case that hangs (in Python
or in C++) kills the child with SIGALRM, and the parent reports it as a hang of that case.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Seconds one case may take before it counts as a hang.
CASE_TIMEOUT_S = 30


@dataclass(frozen=True)
class Case:
    """One probe.

    Attributes:
        name: unique within its category, saying what the probe does ("ids-out-of-range-3").
        run: does the probe; for an ``expect=None`` case it also checks what it got and raises
            ``AssertionError`` on a wrong value.
        expect: None (must succeed) or the exception types it must raise.
        match: a regular expression the error message must contain (what it must name).
    """

    name: str
    run: Callable[[], None]
    expect: tuple[type[BaseException], ...] | None = None
    match: str | None = None


def outcome(case: Case) -> str:
    """The empty string when the case behaved as it must, else why not (one line)."""
    try:
        case.run()
    except BaseException as err:  # every exception is a verdict here
        text = " ".join(str(err).split())[:400]
        kind = type(err).__name__
        if case.expect is None:
            return f"raised {kind}: {text}"
        if not isinstance(err, case.expect):
            wanted = " or ".join(t.__name__ for t in case.expect)
            return f"raised {kind} (not {wanted}): {text}"
        if case.match is not None and not re.search(case.match, str(err)):
            return f"{kind} message does not match {case.match!r}: {text}"
        return ""
    if case.expect is not None:
        wanted = " or ".join(t.__name__ for t in case.expect)
        return f"silently accepted (expected {wanted})"
    return ""


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child_main(argv: list[str]) -> int:
    """Runs cases ``start..`` of one category, printing the protocol above."""
    module_name, category, seed, workdir, start = argv
    import torch

    torch.set_num_threads(1)
    module = importlib.import_module(module_name)
    cases = module.make_cases(category, int(seed), Path(workdir))
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise SystemExit(f"{module_name}.{category}: case names are not unique")
    _say(f"COUNT {len(cases)}")
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for i in range(int(start), len(cases)):
        _say(f"START {i} {cases[i].name}")
        signal.alarm(CASE_TIMEOUT_S)
        why = outcome(cases[i])
        signal.alarm(0)
        _say(f"FAIL {i} {why}" if why else f"PASS {i}")
    _say("DONE")
    sys.stdout.flush()
    # Skip interpreter teardown: a case's leftovers must not turn into a crash after DONE.
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(child_main(sys.argv[1:]))
