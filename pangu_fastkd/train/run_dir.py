"""The run directory's records: the resolved config a resume must match, ``init.json`` and each
stage's ``done.json``, all written atomically by rank 0.

Every record is sealed by its own checksum (``integrity.seal``), so an edited or torn record is
refused by name instead of steering a resume. ``config.json`` stays plain JSON (users read it
and ``--resume`` builds the run from it); ``run.json`` seals its digest, so a ``config.json``
edited since the run started is found.

A stage with ``done.json`` is finished and skipped on resume. The record holds the stage's eval
row when it has one, so a resumed run's table is whole without evaluating again, and the sha256
of every file later stages read (``StageOutputs``), checked before the resume trusts them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..distributed import DistributedContext
from ..durable import atomic_write_text
from .integrity import (
    IntegrityError,
    canonical_digest,
    digest_files,
    files_under,
    read_sealed,
    seal,
    verify_files,
)

__all__ = [
    "DONE_NAME",
    "EXECUTION_KEYS",
    "RunDirError",
    "StageOutputs",
    "finished_record",
    "is_execution_key",
    "prepare_run_dir",
    "read_record",
    "write_finished_record",
    "write_record",
]

DONE_NAME = "done.json"
RUN_RECORD = "run.json"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (it holds another run, or nothing to resume, or
    a record that fails its checks)."""


@dataclass(frozen=True)
class StageOutputs:
    """The files of a finished stage that later stages and a resume read, relative to its
    directory: ``files`` one by one, ``model_dirs`` as whole model directories (a config and
    its weights, no file left out)."""

    files: tuple[str, ...] = ()
    model_dirs: tuple[str, ...] = ()

    def digests(self, root: Path) -> dict[str, str]:
        """``{relative path: sha256}`` of every output file under ``root``."""
        relatives = [*self.files, *(f for d in self.model_dirs for f in files_under(root, d))]
        return digest_files(root, relatives)

    def verify(self, root: Path, recorded: Any, source: Path) -> None:
        """Raises ``IntegrityError`` naming the first output file that is unrecorded, missing
        or damaged."""
        verify_files(root, recorded, source, required=self.files, model_dirs=self.model_dirs)


def write_record(path: Path, data: dict[str, Any]) -> None:
    """``data`` sealed by its checksum, as indented, key-sorted JSON at ``path``, atomically."""
    atomic_write_text(path, json.dumps(seal(data), indent=1, sort_keys=True))


def read_record(path: Path) -> dict[str, Any]:
    """A record written by ``write_record``, its checksum checked.

    Raises:
        IntegrityError: the file is unreadable, not JSON, or edited; the message names it.
    """
    return read_sealed(path)


def write_finished_record(directory: Path, outputs: StageOutputs, record: dict[str, Any]) -> None:
    """``done.json`` in ``directory``: ``record`` with the sha256 of ``outputs``. Written last,
    once the outputs are complete."""
    write_record(directory / DONE_NAME, {**record, "files": outputs.digests(directory)})


def finished_record(directory: Path, outputs: StageOutputs, what: str) -> dict[str, Any] | None:
    """The verified ``done.json`` of ``what`` (a stage or teacher) in ``directory``, or None when
    it has not finished.

    Raises:
        RunDirError: the record or one of the outputs it vouches for is unreadable, edited,
            missing or damaged; the message names the file and says how to run ``what`` again.
    """
    done = directory / DONE_NAME
    if not done.exists():
        return None
    try:
        record = read_record(done)
        outputs.verify(directory, record.get("files"), done)
    except IntegrityError as err:
        raise RunDirError(
            f"{what} is marked finished ({done}) but cannot be trusted: {err}. Delete "
            f"{directory} to run it again (and the stages after it that used it)"
        ) from None
    return record


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
            or a run with another config (with ``resume``), or a ``config.json`` that is
            unreadable or was edited since the run started.
    """
    saved = run_dir / "config.json"
    digest = canonical_digest(_identity(json.loads(json.dumps(resolved))))
    if context.is_main:
        has_run = saved.exists() or (run_dir / "stages").exists()
        if resume:
            if not saved.exists():
                raise RunDirError(f"--resume: {run_dir} holds no run to resume")
            if _identity(_read_json(saved)) != _identity(json.loads(json.dumps(resolved))):
                raise RunDirError(
                    f"--resume: the configuration differs from the one {run_dir} was "
                    "started with (config.json there); resume with the same config"
                )
            _check_started_with(run_dir / RUN_RECORD, digest, saved)
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
        # run.json first: a kill before config.json leaves no run to resume, not an unsealed one.
        write_record(run_dir / RUN_RECORD, {"config_sha256": digest})
        atomic_write_text(saved, json.dumps(resolved, indent=1, sort_keys=True))
    context.barrier()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path} cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} must hold a JSON object")
    return data


def _check_started_with(record_path: Path, digest: str, config_path: Path) -> None:
    """Refuses a resume whose config is not the one the run was started with."""
    try:
        started = read_record(record_path).get("config_sha256")
    except IntegrityError as err:
        raise RunDirError(f"--resume: {err}") from None
    if started != digest:
        raise RunDirError(
            f"--resume: {config_path} was edited since the run started (its digest is not "
            f"the one {record_path} records); put it back or start a new run"
        )


# Settings of how a run executes, not of what it computes: a resume may change them (on
# another machine, say, with the run directory moved, or with TensorBoard turned on). With
# another thread count the resumed run is not bitwise equal to an uninterrupted one, since
# reductions split differently; [logging] changes only what is written about the steps.
EXECUTION_KEYS = ("threads", "run_dir", "logging")


def is_execution_key(path: str) -> bool:
    """Whether the config path ``path`` (``logging.tensorboard``, ``threads``) is a setting a
    resume may change."""
    return path.split(".", 1)[0] in EXECUTION_KEYS


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
