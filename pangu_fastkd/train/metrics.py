"""The trainer's metrics log: ``metrics.jsonl``, one JSON object per line, appended as it goes.

Every record carries ``kind`` (``"train"`` | ``"eval"`` | ``"stage"``), ``stage`` (the stage's
name, unique within a run) and ``step`` (optimizer steps completed *within that stage*, counting
from 1; the plot chains stages into a global step). Other keys are free-form; the plot reads
``loss`` from train records and ``loss*`` / ``acc*`` (accuracies as fractions) from eval
records. Non-finite floats are written as ``null`` so the file stays strict JSON for any reader.

A killed run leaves at most one torn line at the end of the file: ``read_metrics`` ignores it and
``MetricsLog`` cuts it off before appending. On ``--resume`` the trainer calls
``MetricsLog.truncate_after(stage, step)`` with its checkpoint's position, so the records of the
steps it is about to redo are not in the file twice (a stage that starts over, killed before its
first checkpoint, calls it with step 0). A run's other reports: ``plots.plot_run``
(``plot.png``), ``eval_table.write_eval_table`` (``eval.md``), ``progress.Progress``,
``tensorboard_log.StageTensorBoard`` (TensorBoard scalars, a copy of the train records).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, TextIO

from ..durable import atomic_write_bytes

__all__ = ["METRIC_KINDS", "MetricsError", "MetricsLog", "read_metrics"]

METRIC_KINDS = ("train", "eval", "stage")


class MetricsError(ValueError):
    """A metrics file that cannot be read; the message starts with ``<file>:<line>:``."""


# ---------------------------------------------------------------------------------------------
# Metrics JSONL


class MetricsLog:
    """Append-only JSONL metrics of one run, written by rank 0.

    Each ``log`` writes one line and flushes it, so a crash loses at most the record being
    written; ``fsync`` runs every ``fsync_every`` records and on ``close`` (an fsync per step
    would cost more than a small model's step on a network filesystem).

    Args:
        path: the ``.jsonl`` file; appended to when it exists. Its directory must exist.
        enabled: False on ranks other than 0: every method is then a no-op and no file is
            touched, so callers need no rank checks.
        fsync_every: records between two fsyncs, at least 1.

    Raises:
        MetricsError: the existing file is corrupt (only checked when its last line is torn).
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, fsync_every: int = 20) -> None:
        if isinstance(fsync_every, bool) or not isinstance(fsync_every, int) or fsync_every < 1:
            raise ValueError(f"fsync_every must be an int >= 1, got {fsync_every!r}")
        self.path = Path(path)
        self.enabled = bool(enabled)
        self._fsync_every = fsync_every
        self._unsynced = 0
        self._file: TextIO | None = None
        self._closed = False
        if self.enabled:
            self._drop_torn_tail()
            self._file = self.path.open("a", encoding="utf-8", newline="")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record: a dict with ``kind``, ``stage`` and ``step`` and any JSON values.

        Numbers may be Python or numpy scalars; tensors must be converted first (``.item()``),
        because an implicit device sync belongs in the trainer, not here.

        Raises:
            TypeError / ValueError: the record or one of its values is not loggable (the message
                names the key).
        """
        self._check_open()
        line = _encode_record(record) + "\n"
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(line)
        self._file.flush()
        self._unsynced += 1
        if self._unsynced >= self._fsync_every:
            self._sync()

    def truncate_after(self, stage: str, step: int) -> None:
        """Forget everything logged after step ``step`` of stage ``stage`` (a resume point).

        The cut falls at the first record that is either a record of ``stage`` with a step
        greater than ``step`` or a record of another stage that follows ``stage``'s first
        record; that record and all after it are dropped. A train record of ``stage`` beyond
        ``step`` thus drops everything written after it, and a checkpoint taken at the end of a
        stage drops the records of the stages that ran after it. When ``stage`` has no records
        nothing is dropped. The file is rewritten atomically; logging continues after the cut.
        """
        self._check_open()
        _check_stage_step(stage, step, "truncate_after")
        if not self.enabled:
            return
        assert self._file is not None
        self._sync()
        self._file.close()
        self._file = None
        records = read_metrics(self.path) if self.path.exists() else []
        kept = records[: _resume_cut(records, stage, step)]
        atomic_write_bytes(self.path, "".join(_encode_record(r) + "\n" for r in kept).encode())
        self._file = self.path.open("a", encoding="utf-8", newline="")

    def close(self) -> None:
        """Flush, fsync and close the file. Closing twice is allowed."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"MetricsLog for {self.path} is closed")

    def _sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._unsynced = 0

    def _drop_torn_tail(self) -> None:
        # Appending after a torn line would glue the next record onto it and turn a tolerated
        # torn tail into corruption in the middle of the file.
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
        records = read_metrics(self.path)
        atomic_write_bytes(self.path, "".join(_encode_record(r) + "\n" for r in records).encode())


def _resume_cut(records: list[dict[str, Any]], stage: str, step: int) -> int:
    """Index of the first record to drop when resuming after ``step`` of ``stage``."""
    seen_stage = False
    for i, record in enumerate(records):
        if record["stage"] == stage:
            seen_stage = True
            if record["step"] > step:
                return i
        elif seen_stage:
            return i
    return len(records)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics file, in file order.

    A last line without a trailing newline that is not valid JSON is the torn write of a killed
    run and is ignored. Blank lines are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MetricsError: ``"<file>:<line>: <what is wrong>"`` for any other bad line (invalid JSON
            or UTF-8, not an object, a missing or invalid ``kind`` / ``stage`` / ``step``).
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    # A file ending with "\n" splits into a final empty piece; anything else there is a line that
    # was cut off mid-write.
    tail = lines.pop()
    records: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, start=1):
        if raw.strip():
            records.append(_parse_line(raw, f"{path}:{lineno}"))
    if tail.strip():
        try:
            record = json.loads(tail.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return records  # torn by a kill: the record was never completely written
        records.append(_validate_record(record, f"{path}:{len(lines) + 1}"))
    return records


def _parse_line(raw: bytes, where: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MetricsError(f"{where}: not valid UTF-8 ({err.reason})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise MetricsError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    return _validate_record(record, where)


def _validate_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise MetricsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("kind", "stage", "step"):
        if key not in record:
            raise MetricsError(f"{where}: missing field {key!r}")
    try:
        _check_kind(record["kind"])
        _check_stage_step(record["stage"], record["step"], "record")
    except (TypeError, ValueError) as err:
        raise MetricsError(f"{where}: {err}") from None
    return record


def _check_kind(kind: Any) -> None:
    if kind not in METRIC_KINDS:
        raise ValueError(
            f"record kind must be one of {', '.join(map(repr, METRIC_KINDS))}, got {kind!r}"
        )


def _check_stage_step(stage: Any, step: Any, what: str) -> None:
    if not isinstance(stage, str) or not stage:
        raise TypeError(f"{what}: stage must be a non-empty str, got {stage!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"{what}: step must be an int >= 0, got {step!r}")


def _encode_record(record: Any) -> str:
    if not isinstance(record, dict):
        raise TypeError(f"a metrics record must be a dict, got {type(record).__name__}")
    for key in ("kind", "stage", "step"):
        if key not in record:
            raise ValueError(f"metrics record is missing key {key!r} (has {sorted(record)})")
    _check_kind(record["kind"])
    _check_stage_step(record["stage"], record["step"], "metrics record")
    return json.dumps(_to_json(record, "record"), ensure_ascii=False, allow_nan=False)


def _to_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; non-finite floats become None (strict JSON has no NaN)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key {key!r} that is not a str")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    hint = " (log tensor.item())" if hasattr(value, "item") else ""
    raise TypeError(f"{where} is a {type(value).__name__}, not a JSON value{hint}")
