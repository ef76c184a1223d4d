"""Tests of run reporting: metrics JSONL (torn tails, resume truncation), the eval table, the
plot and the progress bar (with an injected clock)."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
import torch

from pangu_fastkd.train.eval_table import eval_table, write_eval_table
from pangu_fastkd.train.kd_health import HEALTH_KEYS
from pangu_fastkd.train.metrics import MetricsError, MetricsLog, read_metrics
from pangu_fastkd.train.plots import RUN_PLOT_PIXELS, plot_run
from pangu_fastkd.train.progress import Progress

# ---------------------------------------------------------------------------------------------
# Helpers


def train(stage: str, step: int, loss: float | None = None) -> dict:
    return {
        "kind": "train",
        "stage": stage,
        "step": step,
        "loss": 3.0 / step if loss is None else loss,
    }


def evaluation(stage: str, step: int, **metrics: float) -> dict:
    return {"kind": "eval", "stage": stage, "step": step, **metrics}


def write_records(path, records: list[dict]) -> None:
    with MetricsLog(path) as log:
        for record in records:
            log.log(record)


def three_stage_run() -> list[dict]:
    """A: steps 1..5 with an eval and a stage-end record; B: steps 1..4; C: steps 1..2."""
    records = [train("A", s) for s in range(1, 6)]
    records += [evaluation("A", 5, loss_reasoning=1.5, acc_reasoning=0.25)]
    records += [{"kind": "stage", "stage": "A", "step": 5, "event": "end"}]
    records += [train("B", s) for s in range(1, 5)]
    records += [evaluation("B", 4, loss_fast=1.25, acc_fast=0.5)]
    records += [train("C", s) for s in range(1, 3)]
    return records


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# MetricsLog and read_metrics


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        train("SFT(R)", 1, 2.5),
        {"kind": "train", "stage": "SFT(R)", "step": 2, "loss": 2.25, "lr": 1e-4, "tokens": 4096},
        evaluation("SFT(R)", 2, acc_fast=0.5, per_mode={"fast": [1, 2]}, note="é ü 中"),
        {"kind": "stage", "stage": "SFT(R)", "step": 2, "event": "end"},
    ]
    write_records(path, records)
    assert read_metrics(path) == records
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 5  # one object per line, newline-terminated
    assert all(json.loads(line)["kind"] for line in lines[:-1])


def test_numpy_scalars_and_non_finite_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(
        path,
        [
            {
                "kind": "train",
                "stage": "s",
                "step": 1,
                "n": np.int64(7),
                "loss": np.float32(0.5),
                "nan": math.nan,
                "inf": [math.inf, 1.0],
            }
        ],
    )
    (record,) = read_metrics(path)
    assert record["n"] == 7 and type(record["n"]) is int
    assert record["loss"] == 0.5
    # Strict JSON has no NaN: non-finite values are written as null.
    assert record["nan"] is None and record["inf"] == [None, 1.0]
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_each_record_is_flushed_and_reopening_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.log(train("A", 1))
    assert read_metrics(path) == [train("A", 1)]  # visible before close
    log.close()
    log.close()  # idempotent
    with MetricsLog(path) as again:
        again.log(train("A", 2))
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_fsync_every_n_records_and_on_close(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    log = MetricsLog(tmp_path / "metrics.jsonl", fsync_every=3)
    for step in range(1, 8):
        log.log(train("A", step))
    assert len(synced) == 2  # after records 3 and 6
    log.close()
    assert len(synced) == 3


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [train("A", 1), train("A", 2)])
    complete = path.read_bytes()
    torn = json.dumps(train("A", 3)).encode()[:17]
    path.write_bytes(complete + torn)
    assert read_metrics(path) == [train("A", 1), train("A", 2)]
    # Cut inside a multi-byte character: invalid UTF-8 at the end is a torn line too.
    path.write_bytes(complete + '{"kind": "train", "stage": "中'.encode()[:-1])
    assert len(read_metrics(path)) == 2
    # A complete record that only misses its newline is kept.
    path.write_bytes(complete + json.dumps(train("A", 3)).encode())
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_appending_after_a_torn_line_drops_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [train("A", 1)])
    path.write_bytes(path.read_bytes() + b'{"kind": "tra')
    with MetricsLog(path) as log:  # resumed after a kill
        log.log(train("A", 2))
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert path.read_bytes().endswith(b"}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"kind": "train", "stage": "A", "step": 2', r"metrics\.jsonl:2: invalid JSON"),
        ("[1, 2]", r"metrics\.jsonl:2: expected a JSON object, got list"),
        ('{"kind": "train", "stage": "A"}', r"metrics\.jsonl:2: missing field 'step'"),
        ('{"kind": "loss", "stage": "A", "step": 2}', r"metrics\.jsonl:2: record kind .* 'loss'"),
        ('{"kind": "eval", "stage": "", "step": 2}', r"metrics\.jsonl:2: .*stage must be"),
        ('{"kind": "eval", "stage": "A", "step": -1}', r"metrics\.jsonl:2: .*step must be"),
    ],
)
def test_corruption_in_the_middle_raises_naming_the_line(tmp_path, bad_line, message):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps(train("A", 1)), json.dumps(train("A", 3))]
    path.write_text(f"{good[0]}\n{bad_line}\n{good[1]}\n", encoding="utf-8")
    with pytest.raises(MetricsError, match=message):
        read_metrics(path)


def test_complete_bad_last_line_is_corruption_not_a_torn_write(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train("A", 1)) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_metrics(path)
    # A complete JSON object without its newline is not torn either: it is validated.
    path.write_text(json.dumps(train("A", 1)) + '\n{"kind": "x", "stage": "A", "step": 1}')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2: record kind"):
        read_metrics(path)


def test_bad_utf8_in_the_middle_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "train", "stage": "\xff", "step": 1}\n' + b"{}\n")
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:1: not valid UTF-8"):
        read_metrics(path)


@pytest.mark.parametrize(
    "stage, step, kept",
    [
        # Mid-stage B: B's later steps, B's eval and all of C go.
        ("B", 2, ["A"] * 7 + ["B"] * 2),
        # Mid-stage A: A's later steps and everything written after them go.
        ("A", 3, ["A"] * 3),
        # End of stage A: A is kept whole (eval and stage-end record), later stages go.
        ("A", 5, ["A"] * 7),
        # End of the last stage: nothing to drop.
        ("C", 2, ["A"] * 7 + ["B"] * 5 + ["C"] * 2),
        # Step 0 of B: every B record (steps start at 1) and C go.
        ("B", 0, ["A"] * 7),
        # A stage that never logged anything cannot be placed: nothing is dropped.
        ("D", 1, ["A"] * 7 + ["B"] * 5 + ["C"] * 2),
    ],
)
def test_truncate_after(tmp_path, stage, step, kept):
    path = tmp_path / "metrics.jsonl"
    records = three_stage_run()
    write_records(path, records)
    with MetricsLog(path) as log:
        log.truncate_after(stage, step)
        after = read_metrics(path)
        assert [r["stage"] for r in after] == kept
        assert after == records[: len(kept)]
        log.log(train(stage, step + 1))  # training continues after the cut
    assert read_metrics(path) == [*records[: len(kept)], train(stage, step + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_truncate_after_drops_a_torn_tail_and_rejects_bad_arguments(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.log(train("A", step))
    with path.open("a") as f:
        f.write('{"kind": "tr')  # a record cut off mid-write, as a kill would leave it
    log.truncate_after("A", 2)
    assert path.read_text(encoding="utf-8") == "".join(
        json.dumps(train("A", s)) + "\n" for s in (1, 2)
    )
    with pytest.raises(TypeError, match="step must be an int >= 0"):
        log.truncate_after("A", -1)
    with pytest.raises(TypeError, match="stage must be a non-empty str"):
        log.truncate_after("", 1)
    log.close()
    with pytest.raises(ValueError, match="is closed"):
        log.truncate_after("A", 1)


def test_disabled_log_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=False)
    log.log(train("A", 1))
    log.truncate_after("A", 0)
    log.close()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    # Records are still checked, so a bad record fails on every rank, not only on rank 0.
    with pytest.raises(ValueError, match="missing key 'kind'"):
        MetricsLog(path, enabled=False).log({"stage": "A", "step": 1})


@pytest.mark.parametrize(
    "record, error, message",
    [
        ([("kind", "train")], TypeError, "must be a dict, got list"),
        ({"stage": "A", "step": 1}, ValueError, "missing key 'kind'"),
        ({"kind": "metric", "stage": "A", "step": 1}, ValueError, "kind must be one of"),
        ({"kind": "train", "stage": None, "step": 1}, TypeError, "stage must be a non-empty str"),
        ({"kind": "train", "stage": "A", "step": True}, TypeError, "step must be an int >= 0"),
        ({"kind": "train", "stage": "A", "step": 1.0}, TypeError, "step must be an int >= 0"),
        (
            {"kind": "train", "stage": "A", "step": 1, "loss": torch.tensor(1.0)},
            TypeError,
            r"record\['loss'\] is a Tensor.*tensor\.item\(\)",
        ),
        (
            {"kind": "train", "stage": "A", "step": 1, "extra": {1: 2}},
            TypeError,
            r"record\['extra'\] has a key 1 that is not a str",
        ),
        (
            {"kind": "train", "stage": "A", "step": 1, "x": [object()]},
            TypeError,
            r"record\['x'\]\[0\] is a object",
        ),
    ],
)
def test_log_rejects_bad_records(tmp_path, record, error, message):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log, pytest.raises(error, match=message):
        log.log(record)
    assert path.read_text() == ""  # nothing half-written


def test_log_after_close_and_bad_fsync_every(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.close()
    with pytest.raises(ValueError, match=r"MetricsLog for .*m\.jsonl is closed"):
        log.log(train("A", 1))
    with pytest.raises(ValueError, match="fsync_every must be an int >= 1, got 0"):
        MetricsLog(tmp_path / "m.jsonl", fsync_every=0)


# ---------------------------------------------------------------------------------------------
# Eval table

EXPECTED_TABLE = """\
| stage  | schedule so far | eval loss (reasoning) | eval loss (fast) | accuracy (reasoning) | accuracy (fast) |
| :----- | :-------------- | --------------------: | ---------------: | -------------------: | --------------: |
| SFT(R) | SFT(R)          |                 1.235 |                - |                87.5% |               - |
| SFT(F) | SFT(R) + SFT(F) |                10.000 |            0.500 |               100.0% |            3.3% |"""  # noqa: E501


def test_eval_table_exact():
    rows = [
        {"stage": "SFT(R)", "schedule": "SFT(R)", "loss_reasoning": 1.23456,
         "loss_fast": None, "acc_reasoning": 0.875, "acc_fast": None},
        {"stage": "SFT(F)", "schedule": "SFT(R) + SFT(F)", "loss_reasoning": 10,
         "loss_fast": 0.5, "acc_reasoning": 1.0, "acc_fast": 1 / 30},
    ]  # fmt: skip
    assert eval_table(rows) == EXPECTED_TABLE


def test_eval_table_missing_values_and_escaping():
    table = eval_table(
        [
            {"stage": "KD|F"},
            {"stage": "KD(R)", "schedule": "a\nb", "loss_fast": math.nan, "acc_fast": 0.0},
        ]
    )
    lines = table.split("\n")
    assert len(lines) == 4
    cells = [[c.strip() for c in line.split(" | ")] for line in lines[2:]]
    assert cells[0] == ["| KD\\|F", "-", "-", "-", "-", "- |"]
    assert cells[1] == ["| KD(R)", "a b", "-", "nan", "-", "0.0% |"]
    # Every line has the same width, so the table reads as a grid in a terminal.
    assert len({len(line) for line in lines}) == 1


def test_eval_table_without_rows_is_the_header():
    assert eval_table([]) == (
        "| stage | schedule so far | eval loss (reasoning) | eval loss (fast) "
        "| accuracy (reasoning) | accuracy (fast) |\n"
        "| :---- | :-------------- | --------------------: | ---------------: "
        "| -------------------: | --------------: |"
    )


@pytest.mark.parametrize(
    "rows, error, message",
    [
        ({"stage": "A"}, TypeError, "rows must be a sequence of dicts, got dict"),
        (["A"], TypeError, "row 0 must be a dict, got str"),
        ([{"schedule": "A"}], ValueError, "row 0: 'stage' must be a non-empty str"),
        ([{"stage": "A", "acc_reasonning": 0.5}], ValueError, r"unknown keys \['acc_reasonning'\]"),
        ([{"stage": "A", "acc_fast": 87.5}], ValueError, "fraction in \\[0, 1\\], got 87.5"),
        ([{"stage": "A", "acc_fast": math.nan}], ValueError, "fraction in \\[0, 1\\], got nan"),
        ([{"stage": "A", "loss_fast": "1.2"}], TypeError, "'loss_fast' must be a number or None"),
        ([{"stage": "A", "schedule": 3}], TypeError, "'schedule' must be a str, got int"),
    ],
)
def test_eval_table_rejects_bad_rows(rows, error, message):
    with pytest.raises(error, match=message):
        eval_table(rows)


def test_write_eval_table(tmp_path):
    path = tmp_path / "eval.md"
    path.write_text("old table\n")
    rows = [{"stage": "A", "schedule": "A", "acc_fast": 0.5}]
    table = write_eval_table(path, rows)
    assert table == eval_table(rows)
    assert path.read_text(encoding="utf-8") == table + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.md"]


# ---------------------------------------------------------------------------------------------
# Plot


# height x width x RGBA
PNG_SHAPE = (RUN_PLOT_PIXELS[1], RUN_PLOT_PIXELS[0], 4)


def read_png(path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(three_stage_run(), id="three-stages"),
        pytest.param([train("SFT", 1)], id="single-point"),
        pytest.param([train("A", s) for s in range(1, 4)] + [train("B", 1)], id="no-eval"),
        pytest.param([evaluation("A", 0, acc_fast=0.5)], id="eval-only"),
        pytest.param([], id="empty"),
    ],
)
def test_plot_run_writes_a_png(tmp_path, records):
    metrics = tmp_path / "metrics.jsonl"
    write_records(metrics, records)
    png = tmp_path / "curves.png"
    plot_run(metrics, png)
    image = read_png(png)
    assert image.shape == PNG_SHAPE
    # Something was drawn: not a blank canvas.
    assert (image[..., :3] < 0.5).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_plot_run_draws_the_data(tmp_path):
    # The same file with and without a loss spike gives different images: the data is plotted.
    metrics = tmp_path / "metrics.jsonl"
    records = [train("A", s, loss=1.0) for s in range(1, 6)]
    write_records(metrics, records)
    plot_run(metrics, tmp_path / "flat.png")
    metrics.unlink()
    records[2] = train("A", 3, loss=5.0)
    write_records(metrics, records)
    plot_run(metrics, tmp_path / "spike.png")
    assert not np.array_equal(read_png(tmp_path / "flat.png"), read_png(tmp_path / "spike.png"))


def test_plot_run_draws_the_hard_and_soft_loss_and_the_kd_health(tmp_path):
    # A KD stage's records with the statistics the trainer logs, and the same without them.
    metrics = tmp_path / "metrics.jsonl"
    plain = [train("SFT", 1), train("SFT", 2)] + [train("KD", s) for s in range(1, 5)]
    write_records(metrics, plain)
    plot_run(metrics, tmp_path / "plain.png")
    health = {k: 0.1 * (i + 1) for i, k in enumerate(HEALTH_KEYS)}
    logged = plain[:2] + [
        {**r, "hard_loss": 2.0, "soft_loss": 0.5, "tokens_per_s": 1e4, **health} for r in plain[2:]
    ]
    metrics.unlink()
    write_records(metrics, logged)
    plot_run(metrics, tmp_path / "logged.png")
    a, b = read_png(tmp_path / "plain.png"), read_png(tmp_path / "logged.png")
    assert a.shape == b.shape == PNG_SHAPE
    # The difference is in every panel but the eval one (there are no eval records).
    half_h, split_w = PNG_SHAPE[0] // 2, int(PNG_SHAPE[1] * 0.55)
    for rows, cols in [(slice(0, half_h), slice(0, split_w)), (slice(half_h, None), slice(None))]:
        assert not np.array_equal(a[rows, cols], b[rows, cols])


def test_plot_run_replaces_an_old_png_and_reports_bad_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    png = tmp_path / "curves.png"
    png.write_bytes(b"old")
    write_records(metrics, [train("A", 1), train("A", 2)])
    plot_run(metrics, png)
    assert read_png(png).shape == PNG_SHAPE
    metrics.write_text('{"kind": "train"}\n')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:1: missing field 'stage'"):
        plot_run(metrics, png)
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path / "missing.jsonl", png)
    assert read_png(png).shape == PNG_SHAPE  # a failed plot leaves the old PNG whole


# ---------------------------------------------------------------------------------------------
# Progress


def test_progress_plain_lines_are_throttled():
    stream, clock = io.StringIO(), FakeClock()
    bar = Progress(10, "sft", stream=stream, clock=clock, min_interval=0.5)
    for step in range(1, 11):
        clock.now += 3.0
        bar.update(step, 4096, loss=3.0 - 0.25 * step)
    before_close = stream.getvalue()
    bar.close()
    assert stream.getvalue() == before_close  # the last step is shown when it happens
    # Off a TTY a line is printed at most every 0.5 * 20 = 10 s, plus the final step.
    assert stream.getvalue() == (
        "sft  1/10 [##------------------]  loss 2.750  1,365 tok/s  eta 0:27\n"
        "sft  5/10 [##########----------]  loss 1.750  1,365 tok/s  eta 0:15\n"
        "sft  9/10 [##################--]  loss 0.750  1,365 tok/s  eta 0:03\n"
        "sft 10/10 [####################]  loss 0.500  1,365 tok/s  eta 0:00\n"
    )


def test_progress_close_shows_a_throttled_state():
    stream, clock = io.StringIO(), FakeClock()
    bar = Progress(100, "kd", stream=stream, clock=clock, min_interval=1.0)
    for step in (1, 2, 3):
        clock.now += 1.0
        bar.update(step, 10)
    assert stream.getvalue().count("\n") == 1  # only step 1 so far
    bar.close()
    bar.close()
    assert (
        stream.getvalue().split("\n")[1] == "kd   3/100 [--------------------]  10 tok/s  eta 1:37"
    )


def test_progress_redraws_in_place_on_a_tty():
    stream, clock = FakeTTY(), FakeClock()
    bar = Progress(8, "fast", stream=stream, clock=clock, min_interval=0.5, bar_width=8)
    for step in range(1, 9):
        clock.now += 0.25
        bar.update(step, 100, loss=1.5 if step < 5 else None)
    bar.close()
    out = stream.getvalue()
    assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1
    frames = out[:-1].split("\r")[1:]
    # Redrawn at most every 0.5 s: steps 1, 3, 5, 7, and the last step always.
    assert [f.split()[1] for f in frames] == ["1/8", "3/8", "5/8", "7/8", "8/8"]
    assert frames[0] == "fast 1/8 [#-------]  loss 1.500  400 tok/s  eta 0:02"
    # A shorter line (no loss) blanks what is left of the longer one before it.
    assert frames[2] == "fast 5/8 [#####---]  400 tok/s  eta 0:01" + " " * len("loss 1.500  ")
    assert frames[-1].startswith("fast 8/8 [########]  400 tok/s  eta 0:00")


def test_progress_rate_uses_a_sliding_window():
    stream, clock = io.StringIO(), FakeClock()
    bar = Progress(1000, "s", stream=stream, clock=clock, window=2)
    for step in range(1, 5):  # fast: 1 s per 1,000-token step
        clock.now += 1.0
        bar.update(step, 1000)
    for step in range(5, 7):  # slow: 4 s per 1,000-token step
        clock.now += 4.0
        bar.update(step, 1000)
    # Only the last two updates count: 2,000 tokens in 8 s, 4 s per step.
    assert bar.line().endswith("  250 tok/s  eta 1:06:16")


def test_progress_eta_hours_unknown_and_resume():
    clock = FakeClock()
    bar = Progress(1000, "s", stream=io.StringIO(), clock=clock)
    bar.update(0, 0)  # no time has passed: no rate yet
    assert bar.line() == "s    0/1000 [--------------------]  ? tok/s  eta ?"
    clock.now = 10.0
    bar.update(1, 12_340)
    assert bar.line() == "s    1/1000 [--------------------]  1,234 tok/s  eta 2:46:30"
    # Resumed at step 200 of 400: the first rate counts only the steps done in this run.
    clock.now = 0.0
    resumed = Progress(400, "s", stream=io.StringIO(), clock=clock, initial_step=200)
    clock.now = 2.0
    resumed.update(201, 100)
    assert resumed.line().endswith("  50 tok/s  eta 6:38")


def test_disabled_progress_writes_nothing():
    stream = FakeTTY()
    bar = Progress(3, "s", stream=stream, enabled=False, clock=FakeClock())
    for step in (1, 2, 3):
        bar.update(step, 10)
    bar.close()
    assert stream.getvalue() == ""


def test_progress_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps must be an int >= 1, got 0"):
        Progress(0, "s")
    with pytest.raises(ValueError, match="initial_step must be an int in"):
        Progress(5, "s", initial_step=6)
    bar = Progress(5, "s", stream=io.StringIO(), clock=FakeClock())
    bar.update(3, 1)
    with pytest.raises(ValueError, match=r"step must be in \[3, 5\] \(it never goes back\), got 2"):
        bar.update(2, 1)
    with pytest.raises(ValueError, match=r"step must be in \[3, 5\].*got 6"):
        bar.update(6, 1)
    with pytest.raises(ValueError, match="tokens must be an int >= 0, got -1"):
        bar.update(4, -1)
    with pytest.raises(TypeError, match="loss must be a number or None, got Tensor"):
        bar.update(4, 1, loss=torch.tensor(1.0))
    bar.close()
    with pytest.raises(ValueError, match="Progress 's' is closed"):
        bar.update(4, 1)
