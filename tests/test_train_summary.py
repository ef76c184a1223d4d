"""The run's report: accuracies with Wilson intervals in eval.md, paired comparisons (every stage
against its start, and the configured pairs) with their words, and summary.json."""

from __future__ import annotations

import json

import pytest

from pangu_fastkd.train import ConfigError
from pangu_fastkd.train.comparisons import compare_rows, comparison_findings
from pangu_fastkd.train.config import config_from_dict
from pangu_fastkd.train.eval_table import eval_table
from pangu_fastkd.train.evaluate import outcome_string, parse_outcomes
from pangu_fastkd.train.intervals import paired_difference, wilson_interval
from pangu_fastkd.train.summary import eval_report, run_summary, write_run_report

N = 400


def _row(stage: str, right_fast: int, start: str | None = None, right_reasoning: int = 0):
    """A row whose first ``right_*`` problems are right."""
    fast = [i < right_fast for i in range(N)]
    reasoning = [i < right_reasoning for i in range(N)]
    row = {
        "stage": stage,
        "schedule": stage,
        "loss_fast": 0.5,
        "loss_reasoning": 1.0,
        "acc_fast": right_fast / N,
        "acc_reasoning": right_reasoning / N,
        "correct_fast": outcome_string(fast),
        "correct_reasoning": outcome_string(reasoning),
    }
    if start is not None:
        row["start"] = start
    return row


ROWS = [
    _row("init", 0),
    _row("sft_fast", 100, start="init", right_reasoning=40),
    _row("kd_fast", 160, start="sft_fast", right_reasoning=40),
    _row("sft_fast_more", 150, start="sft_fast", right_reasoning=40),
]


def test_outcome_strings_round_trip_and_refuse_garbage():
    outcomes = [True, False, False, True]
    assert outcome_string(outcomes) == "1001"
    assert parse_outcomes("1001") == outcomes
    with pytest.raises(ValueError, match="string of 0 and 1"):
        parse_outcomes("10x1")


def test_eval_table_prints_wilson_intervals():
    table = eval_table([ROWS[1]])
    interval = wilson_interval(100, N)
    assert f"25.0% ({100 * interval.low:.1f}-{100 * interval.high:.1f})" in table
    bad = dict(ROWS[1], acc_fast=0.3)
    with pytest.raises(ValueError, match=r"disagrees with its outcomes \(100 of 400\)"):
        eval_table([bad])


def test_compare_rows_pairs_each_stage_with_its_start_and_the_configured_pairs():
    comparisons = compare_rows(ROWS, [("kd_fast", "sft_fast_more")])
    pairs = [(c.stage, c.baseline, c.mode, c.configured) for c in comparisons]
    assert pairs[:2] == [
        ("kd_fast", "sft_fast_more", "reasoning", True),
        ("kd_fast", "sft_fast_more", "fast", True),
    ]
    assert ("sft_fast", "init", "fast", False) in pairs
    assert ("sft_fast_more", "sft_fast", "fast", False) in pairs
    kd_vs_control = comparisons[1]
    # The first 150 problems are right for both, 10 more for KD only.
    expected = paired_difference(
        parse_outcomes(ROWS[2]["correct_fast"]), parse_outcomes(ROWS[3]["correct_fast"])
    )
    assert kd_vs_control.difference == expected
    assert kd_vs_control.difference.value == pytest.approx(10 / N)
    assert kd_vs_control.outside_noise  # 10 discordant pairs, all one way


def test_findings_say_which_differences_are_outside_the_noise():
    rows = [*ROWS, _row("sft_fast_same", 101, start="sft_fast", right_reasoning=40)]
    comparisons = compare_rows(rows, [("kd_fast", "sft_fast_more"), ("sft_fast_same", "sft_fast")])
    findings = comparison_findings(comparisons)
    assert any(
        line.startswith("kd_fast against sft_fast_more (fast mode): +2.5 points")
        and "outside the noise: kd_fast is better" in line
        for line in findings
    )
    assert any(
        line.startswith("sft_fast_same against sft_fast (fast mode): +0.3 points")
        and "within the noise" in line
        for line in findings
    )
    assert findings[-1].startswith("Gains over the stage started from, outside the noise:")
    assert "sft_fast (fast)" in findings[-1]


def test_pairs_need_the_same_problems():
    short = dict(ROWS[2], correct_fast="1" * 10, acc_fast=1.0)
    with pytest.raises(ValueError, match="evaluated on 10 and 400 fast problems"):
        compare_rows([ROWS[1], short], [("kd_fast", "sft_fast")])


def test_report_and_summary(tmp_path):
    metrics = [
        {"kind": "train", "stage": "kd_fast", "step": 1, "tokens": 2000, "supervised": 300},
        {"kind": "train", "stage": "kd_fast", "step": 2, "tokens": 1900, "supervised": 280},
        {"kind": "eval", "stage": "kd_fast", "step": 0},
    ]
    compare = [("kd_fast", "sft_fast_more")]
    report = write_run_report(tmp_path, ROWS, compare, metrics, {"kd_fast": 12.5})
    assert (tmp_path / "eval.md").read_text() == report + "\n"
    assert report == eval_report(ROWS, compare)
    assert "400 reasoning, 400 fast" in report and "Newcombe" in report
    assert "| kd_fast | sft_fast_more | fast | 40.0% | 37.5% | +2.5 |" in report
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == run_summary(ROWS, compare, metrics, {"kd_fast": 12.5})
    assert summary["eval_problems"] == {"reasoning": 400, "fast": 400}
    kd = next(s for s in summary["stages"] if s["stage"] == "kd_fast")
    assert kd["tokens_trained"] == 3900 and kd["supervised_tokens"] == 580
    assert kd["seconds"] == 12.5 and kd["start"] == "sft_fast"
    assert kd["accuracy"]["fast"] == wilson_interval(160, N).as_dict()
    assert kd["eval_loss"] == {"reasoning": 1.0, "fast": 0.5}
    first = summary["comparisons"][1]
    assert first["stage"] == "kd_fast" and first["mode"] == "fast" and first["outside_noise"]
    assert first["difference"]["value"] == pytest.approx(0.025)


def test_a_diverged_loss_is_null_in_summary_json(tmp_path):
    rows = [dict(ROWS[1], loss_fast=float("nan"))]
    write_run_report(tmp_path, rows, [], [], {})
    stage = json.loads((tmp_path / "summary.json").read_text())["stages"][0]
    assert stage["eval_loss"] == {"reasoning": 1.0, "fast": None}
    assert "nan" in (tmp_path / "eval.md").read_text()


BASE = {
    "run_dir": "unused",
    "data": {"source": "demo", "train_problems": 8, "eval_problems": 2},
    "stages": [{"name": "s", "kind": "sft", "data": "train_fast"}],
}


@pytest.mark.parametrize(
    "compare, message",
    [
        ([["s", "ghost"]], r"eval.compare\[0\]: 'ghost' is not an evaluated stage"),
        ([["s"]], r"eval.compare\[0\]: expected \[stage, baseline\]"),
        ([["s", 3]], r"eval.compare\[0\]: expected \[stage, baseline\]"),
    ],
)
def test_bad_comparisons_fail_at_config_time(compare, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, "eval": {"compare": compare}})


def test_comparisons_may_name_init_and_teachers():
    raw = {
        **BASE,
        "teachers": {"t": {"preset": "tiny", "train_on": ["train_fast"]}},
        "eval": {"compare": [["s", "init"], ["teacher t", "s"]]},
    }
    assert config_from_dict(raw).eval.compare == [["s", "init"], ["teacher t", "s"]]
