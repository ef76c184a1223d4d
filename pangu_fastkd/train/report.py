"""Run reporting for the trainer: metrics JSONL, a progress bar, the loss plot, the eval table.

What a run directory gets from this module::

    metrics.jsonl   one JSON object per line, appended as training goes (``MetricsLog``)
    curves.png      training loss and per-stage eval results (``plot_run``)
    eval.md         one Markdown row per evaluated stage (``write_eval_table``)

Every metrics record carries ``kind`` (``"train"`` | ``"eval"`` | ``"stage"``), ``stage`` (the
stage's name, unique within a run) and ``step`` (optimizer steps completed *within that stage*,
counting from 1; the plot chains stages into a global step). Other keys are free-form; the plot
reads ``loss`` from train records and ``loss*`` / ``acc*`` (accuracies as fractions) from eval
records. Non-finite floats are written as ``null`` so the file stays strict JSON for any reader.

A killed run leaves at most one torn line at the end of the file: ``read_metrics`` ignores it and
``MetricsLog`` cuts it off before appending. On ``--resume`` the trainer calls
``MetricsLog.truncate_after(stage, step)`` with its checkpoint's position, so the records of the
steps it is about to redo are not in the file twice.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from pangu_fastkd.durable import atomic_write_bytes

__all__ = [
    "EVAL_TABLE_COLUMNS",
    "METRIC_KINDS",
    "MetricsError",
    "MetricsLog",
    "Progress",
    "eval_table",
    "plot_run",
    "read_metrics",
    "write_eval_table",
]

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


# ---------------------------------------------------------------------------------------------
# Eval table

# (row key, header) in column order.
EVAL_TABLE_COLUMNS = (
    ("stage", "stage"),
    ("schedule", "schedule so far"),
    ("loss_reasoning", "eval loss (reasoning)"),
    ("loss_fast", "eval loss (fast)"),
    ("acc_reasoning", "accuracy (reasoning)"),
    ("acc_fast", "accuracy (fast)"),
)
_TEXT_KEYS = ("stage", "schedule")


def eval_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of eval results, one row per evaluated stage in the given order.

    Args:
        rows: dicts with ``stage`` (str, required), ``schedule`` (str: the stages run so far,
            e.g. ``"SFT(R) + SFT(F)"``) and ``loss_reasoning``, ``loss_fast``,
            ``acc_reasoning``, ``acc_fast`` (floats; accuracies as fractions in [0, 1]). A
            missing or None value prints as ``-``; unknown keys are an error (a misspelt key
            would otherwise print as a silent ``-``).

    Returns:
        The table without a trailing newline: columns padded to equal width, text columns
        left-aligned, numbers right-aligned; losses with 3 decimals, accuracies as percentages
        with 1 decimal (``87.5%``).
    """
    if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a sequence of dicts, got {type(rows).__name__}")
    table = [[header for _, header in EVAL_TABLE_COLUMNS]]
    table += [_eval_row_cells(row, i) for i, row in enumerate(rows)]
    widths = [max(len(line[c]) for line in table) for c in range(len(EVAL_TABLE_COLUMNS))]
    right = [key not in _TEXT_KEYS for key, _ in EVAL_TABLE_COLUMNS]

    def fmt(cells: list[str]) -> str:
        padded = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(cells, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if r else (":" + "-" * (w - 1))
        for w, r in zip(widths, right, strict=True)
    ]
    lines = [fmt(table[0]), fmt(rule), *(fmt(cells) for cells in table[1:])]
    return "\n".join(lines)


def _eval_row_cells(row: Any, index: int) -> list[str]:
    where = f"eval_table row {index}"
    if not isinstance(row, dict):
        raise TypeError(f"{where} must be a dict, got {type(row).__name__}")
    known = {key for key, _ in EVAL_TABLE_COLUMNS}
    unknown = sorted(set(row) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; expected only {sorted(known)}")
    stage = row.get("stage")
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"{where}: 'stage' must be a non-empty str, got {stage!r}")
    cells = []
    for key, _ in EVAL_TABLE_COLUMNS:
        value = row.get(key)
        if value is None:
            cells.append("-")
        elif key in _TEXT_KEYS:
            if not isinstance(value, str):
                raise TypeError(f"{where}: {key!r} must be a str, got {type(value).__name__}")
            # A pipe would split the cell and a newline would end the row.
            cells.append(" ".join(value.split()).replace("|", "\\|"))
        else:
            cells.append(_format_metric(key, value, where))
    return cells


def _format_metric(key: str, value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {key!r} must be a number or None, got {type(value).__name__}")
    value = float(value)
    if key.startswith("loss"):
        return f"{value:.3f}"  # nan / inf stay visible: a diverged stage is a result
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{where}: {key!r} must be a fraction in [0, 1], got {value!r} "
            "(pass accuracies as fractions, not percentages)"
        )
    return f"{100.0 * value:.1f}%"


def write_eval_table(path: str | Path, rows: Sequence[dict[str, Any]]) -> str:
    """Write ``eval_table(rows)`` plus a newline to ``path`` atomically; return the table."""
    table = eval_table(rows)
    atomic_write_bytes(Path(path), (table + "\n").encode("utf-8"))
    return table


# ---------------------------------------------------------------------------------------------
# Plot


def plot_run(metrics_path: str | Path, png_path: str | Path) -> None:
    """Plot a run's metrics file to a PNG (1100 x 450 pixels), atomically.

    Left panel: training ``loss`` against the global step, one colour per stage, with a dashed
    line and the stage's name where each stage starts. Stages are chained in file order: a
    stage's global steps continue from the last global step of the stage before it. Right
    panel: the last eval record of each stage, accuracies (``acc*`` keys, in percent, left axis)
    and losses (``loss*`` keys, dashed, right axis). Panels without data say so.

    Uses ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so it opens no window
    and leaves pyplot's global state (backend, current figure) alone.

    Raises:
        FileNotFoundError / MetricsError: from ``read_metrics``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, eval_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    _plot_train_loss(loss_ax, [r for r in records if r["kind"] == "train"])
    _plot_stage_evals(eval_ax, [r for r in records if r["kind"] == "eval"])
    fig.suptitle(Path(metrics_path).resolve().parent.name or str(metrics_path))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(Path(png_path), buffer.getvalue())


def _by_stage(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by stage, stages in order of first appearance (dicts keep it)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["stage"], []).append(record)
    return groups


def _number(value: Any) -> float:
    """A metric value as a float; None and non-numbers (not plottable) as NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_train_loss(ax: Any, train: list[dict[str, Any]]) -> None:
    ax.set_title("training loss")
    if not train:
        _no_data(ax, "no training records yet")
        return
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    colours = colormaps["tab10"]
    offset = 0
    for i, (stage, stage_records) in enumerate(_by_stage(train).items()):
        xs = [offset + r["step"] for r in stage_records]
        ys = [_number(r.get("loss")) for r in stage_records]
        colour = colours(i % colours.N)
        # A marker keeps a one-point stage visible; on long stages markers would be clutter.
        marker = "o" if len(xs) < 30 else None
        ax.plot(xs, ys, color=colour, marker=marker, markersize=3, linewidth=1.2, label=stage)
        start = offset + 0.5
        if i > 0:
            ax.axvline(start, color="0.5", linestyle="--", linewidth=0.8)
        ax.text(
            start,
            0.98,
            f" {stage}",
            transform=ax.get_xaxis_transform(),
            ha="left",
            va="top",
            fontsize=8,
            color=colour,
            in_layout=False,
        )
        offset = max(offset, *xs)
    # From 0 so every stage label sits inside the panel, also for a single point.
    ax.set_xlim(0, offset + max(0.5, 0.02 * offset))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)


def _plot_stage_evals(ax: Any, evals: list[dict[str, Any]]) -> None:
    ax.set_title("eval at stage end")
    last = [stage_records[-1] for stage_records in _by_stage(evals).values()]
    acc_keys = _metric_keys(last, "acc")
    loss_keys = _metric_keys(last, "loss")
    if not acc_keys and not loss_keys:
        _no_data(ax, "no eval records yet")
        return
    from matplotlib import colormaps

    # One colour per series across both y axes: a twin axis would restart the colour cycle.
    colours = colormaps["tab10"]
    xs = list(range(len(last)))
    handles = []
    for i, key in enumerate(acc_keys):
        ys = [100.0 * _number(r.get(key)) for r in last]
        label = _series_label(key, "accuracy")
        handles += ax.plot(xs, ys, marker="o", color=colours(i % colours.N), label=label)
    ax.set_ylabel("accuracy (%)")
    if loss_keys:
        loss_ax = ax.twinx()
        loss_ax.set_ylabel("eval loss")
        for i, key in enumerate(loss_keys, start=len(acc_keys)):
            ys = [_number(r.get(key)) for r in last]
            label = _series_label(key, "eval loss")
            handles += loss_ax.plot(
                xs, ys, marker="s", linestyle="--", color=colours(i % colours.N), label=label
            )
    ax.set_xticks(xs, [r["stage"] for r in last], rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(last) - 0.5)
    ax.grid(True, alpha=0.3)
    # Below the panel: "best" placement cannot see the twin axis' lines and would cover them.
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)


def _metric_keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    """Keys ``prefix`` or ``prefix_*`` holding a number in any record, in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if (key == prefix or key.startswith(prefix + "_")) and not math.isnan(_number(value)):
                keys[key] = None
    return list(keys)


def _series_label(key: str, name: str) -> str:
    _, _, mode = key.partition("_")
    return f"{name} ({mode})" if mode else name


# ---------------------------------------------------------------------------------------------
# Progress bar


class Progress:
    """A dependency-free progress bar for one stage::

        sft_fast  37/400 [#-------------------]  loss 1.234  5,120 tok/s  eta 1:05

    On a TTY the line is redrawn in place (``"\\r"``) at most every ``min_interval`` seconds;
    elsewhere (CI logs, files) a plain line is printed at most every ``min_interval * 20``
    seconds. The final step is always shown. Tokens/s and the eta come from the last ``window``
    updates, so they follow the current speed rather than the average since the start.

    Args:
        total_steps: steps in the stage, at least 1.
        desc: the label at the start of the line (the stage name).
        stream: where to write (default: ``sys.stderr`` when the bar is made); its
            ``isatty()`` picks the mode.
        enabled: False on ranks other than 0: nothing is written.
        min_interval: seconds between two redraws on a TTY.
        clock: seconds as a float, monotonic; injectable for tests.
        initial_step: the step the stage starts (resumes) from, so the first rate is right.
        window: updates the rates are averaged over.
        bar_width: characters between the brackets.
    """

    def __init__(
        self,
        total_steps: int,
        desc: str,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        initial_step: int = 0,
        window: int = 20,
        bar_width: int = 20,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not isinstance(desc, str):
            raise TypeError(f"desc must be a str, got {type(desc).__name__}")
        if not isinstance(min_interval, (int, float)) or not min_interval >= 0:
            raise ValueError(f"min_interval must be a number >= 0, got {min_interval!r}")
        if not isinstance(initial_step, int) or not 0 <= initial_step <= total_steps:
            raise ValueError(
                f"initial_step must be an int in [0, total_steps={total_steps}], got "
                f"{initial_step!r}"
            )
        for name, value in (("window", window), ("bar_width", bar_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.total_steps = total_steps
        self.desc = desc
        self.enabled = bool(enabled)
        self._stream = sys.stderr if stream is None else stream
        self._tty = self.enabled and _isatty(self._stream)
        self._interval = float(min_interval) * (1 if self._tty else 20)
        self._clock = clock
        self._bar_width = bar_width
        # (time, step, tokens of that update); the first entry is the start, with no tokens.
        self._history: deque[tuple[float, int, int]] = deque(maxlen=window + 1)
        self._history.append((clock(), initial_step, 0))
        self._step = initial_step
        self._loss: float | None = None
        self._last_draw: float | None = None
        self._pending = False  # the latest update has not been drawn
        self._drawn_width = 0  # length of the line on screen (TTY), to blank a longer old one
        self._closed = False

    def update(self, step: int, tokens: int, loss: float | None = None) -> None:
        """Record that ``step`` steps are done; ``tokens`` were processed since the last update.

        Raises:
            ValueError: step outside ``[current step, total_steps]``, negative tokens, or the
                bar is closed.
        """
        if self._closed:
            raise ValueError(f"Progress {self.desc!r} is closed")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if not self._step <= step <= self.total_steps:
            raise ValueError(
                f"step must be in [{self._step}, {self.total_steps}] (it never goes back), "
                f"got {step}"
            )
        if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, numbers.Real)):
            raise TypeError(f"loss must be a number or None, got {type(loss).__name__}")
        now = self._clock()
        self._history.append((now, step, int(tokens)))
        self._step = step
        self._loss = None if loss is None else float(loss)
        self._pending = True
        if not self.enabled:
            return
        due = self._last_draw is None or now - self._last_draw >= self._interval
        if due or step == self.total_steps:
            self._draw(now)

    def close(self) -> None:
        """Show the latest state if it was throttled away and end the line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._pending:
            self._draw(self._clock())
        if self._tty and self._drawn_width:
            self._stream.write("\n")
            self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def line(self) -> str:
        """The current progress line, without ``"\\r"`` or newline."""
        width = len(str(self.total_steps))
        filled = self._bar_width * self._step // self.total_steps
        bar = "#" * filled + "-" * (self._bar_width - filled)
        parts = [f"{self.desc} {self._step:>{width}}/{self.total_steps} [{bar}]"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.3f}")
        tokens_per_s, steps_per_s = self._rates()
        parts.append("? tok/s" if tokens_per_s is None else f"{tokens_per_s:,.0f} tok/s")
        remaining = self.total_steps - self._step
        if remaining == 0:
            eta = "0:00"
        elif steps_per_s:
            eta = _format_duration(remaining / steps_per_s)
        else:
            eta = "?"
        parts.append(f"eta {eta}")
        return "  ".join(parts)

    def _rates(self) -> tuple[float | None, float | None]:
        """(tokens/s, steps/s) over the window; None before any time has passed."""
        t_first, step_first, _ = self._history[0]
        t_last, step_last, _ = self._history[-1]
        elapsed = t_last - t_first
        if elapsed <= 0:
            return None, None
        # The oldest entry's tokens were processed before the window began.
        tokens = sum(t for _, _, t in list(self._history)[1:])
        return tokens / elapsed, (step_last - step_first) / elapsed

    def _draw(self, now: float) -> None:
        text = self.line()
        if self._tty:
            self._stream.write("\r" + text + " " * max(0, self._drawn_width - len(text)))
            self._drawn_width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self._last_draw = now
        self._pending = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _format_duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
