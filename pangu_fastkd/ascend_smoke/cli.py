"""``python -m pangu_fastkd.ascend_smoke``: the flags, the run, the exit status."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..durable import atomic_write_text
from .environment import environment
from .errors import BackendUnavailableError
from .op_backends import Backend, NpuBackend
from .report import PROG, environment_lines, jsonable, markdown_table
from .runner import run_grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The kit's flags (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Check and time pangu_fastkd's Ascend C kernels on an NPU.",
    )
    parser.add_argument("--quick", action="store_true", help="the small grid only")
    parser.add_argument("--no-timing", action="store_true", help="correctness only")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--device", default="npu:0", help="the NPU to run on (default npu:0)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, backend: Backend | None = None) -> int:
    """The command line; ``backend`` replaces the NPU one (tests pass a ``TwinBackend``).

    Returns:
        0 when every row passes, 1 when one fails, 2 when the kit cannot run here.
    """
    args = parse_args(argv)
    if backend is None:
        try:
            backend = NpuBackend(args.device)
        except BackendUnavailableError as exc:
            print(f"{PROG}: cannot run: {exc}", file=sys.stderr)
            return 2
    env = environment(backend)
    print("\n".join(environment_lines(env)), flush=True)
    print(flush=True)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = run_grid(
        backend,
        quick=args.quick,
        timing=not args.no_timing,
        reps=args.reps,
        warmup=args.warmup,
        progress=progress,
    )
    print(markdown_table(rows), flush=True)
    passed = bool(rows) and all(r.passed for r in rows)
    if args.json:
        record = {
            "environment": env,
            "options": {"quick": args.quick, "timing": not args.no_timing, "reps": args.reps},
            "passed": passed,
            "rows": [{**asdict(r), "speedup": r.speedup} for r in rows],
        }
        # Atomic: a run killed while writing leaves the previous report, never half a file.
        atomic_write_text(Path(args.json), json.dumps(jsonable(record), indent=2, allow_nan=False))
    return 0 if passed else 1
