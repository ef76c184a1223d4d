"""The run directory's records: the resolved config a resume must match, ``init.json`` and each
stage's ``done.json``, all written atomically by rank 0.

A stage with ``done.json`` is finished and skipped on resume; the record holds the stage's eval
row when it has one, so a resumed run's table is whole without evaluating again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..distributed import DistributedContext
from ..durable import atomic_write_text

__all__ = ["RunDirError", "prepare_run_dir", "read_record", "write_record"]


class RunDirError(ValueError):
    """The run directory cannot be used as asked (it holds another run, or nothing to resume)."""


def write_record(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented, key-sorted JSON at ``path``, atomically."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def read_record(path: Path) -> dict[str, Any]:
    """A record written by ``write_record``."""
    return json.loads(path.read_text())


def prepare_run_dir(
    run_dir: Path,
    resolved: dict[str, Any],
    context: DistributedContext,
    *,
    resume: bool,
    overwrite: bool,
) -> None:
    """Makes ``run_dir`` ready for the run whose resolved config is ``resolved``.

    A new run needs an empty (or absent) directory; ``overwrite`` empties it but keeps the
    teachers trained there; ``resume`` needs the same config as the run it continues.

    Raises:
        RunDirError: ``run_dir`` holds another run (without ``overwrite``), or nothing to resume,
            or a run with another config (with ``resume``).
    """
    saved = run_dir / "config.json"
    if context.is_main:
        has_run = saved.exists() or (run_dir / "stages").exists()
        if resume:
            if not saved.exists():
                raise RunDirError(f"--resume: {run_dir} holds no run to resume")
            if _identity(json.loads(saved.read_text())) != _identity(
                json.loads(json.dumps(resolved))
            ):
                raise RunDirError(
                    f"--resume: the configuration differs from the one {run_dir} was "
                    "started with (config.json there); resume with the same config"
                )
        elif has_run and not overwrite:
            raise RunDirError(
                f"{run_dir} already holds a run: pass --resume to continue it, "
                "--overwrite to start over, or another --run-dir"
            )
        elif has_run:
            for child in run_dir.iterdir():
                if child.name != "teachers":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_record(saved, resolved)
    context.barrier()


# Settings of how a run executes, not of what it computes: a resume may change them (on
# another machine, say). With another thread count the resumed run is not bitwise equal to an
# uninterrupted one, since reductions split differently.
_EXECUTION_KEYS = ("threads",)


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _EXECUTION_KEYS}
