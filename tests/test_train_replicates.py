"""A config with ``seeds``: one run per seed under ``seed-<s>/``, a report across seeds (mean,
spread, per-seed figures), resume of the seeds not finished, and the aggregation itself."""

from __future__ import annotations

import json
import shutil

import pytest

from pangu_fastkd.train import ConfigError, config_from_dict, load_config
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.replicates import aggregate_summaries, replicate_config

CONFIG = """
run_dir = "unused"
checkpoint_every = 2
seeds = [0, 1]
[data]
source = "demo"
train_problems = 48
eval_problems = 6
max_difficulty = 2
[student]
preset = "tiny"
seed = 3
[eval]
max_examples = 6
max_new_tokens = 8
compare = [["sft_f", "init"]]
[[stages]]
name = "sft_r"
kind = "sft"
data = "train_reasoning"
train = { steps = 3, batch_tokens = 400, optim = { lr = 3e-3, warmup_steps = 1 } }
[[stages]]
name = "sft_f"
kind = "sft"
data = "train_fast"
train = { steps = 2, batch_tokens = 300, optim = { lr = 2e-3, warmup_steps = 1 } }
"""


def test_each_seed_runs_and_the_report_spans_them(tmp_path, capsys):
    path = tmp_path / "seeds.toml"
    path.write_text(CONFIG)
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0
    seeds = [json.loads((run / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    configs = [json.loads((run / f"seed-{s}" / "config.json").read_text()) for s in (0, 1)]
    assert [c["seed"] for c in configs] == [0, 1]
    assert [c["student"]["seed"] for c in configs] == [3, 4]
    assert all(c["seeds"] == [] for c in configs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary == aggregate_summaries([0, 1], seeds)
    assert [s["stage"] for s in summary["stages"]] == ["init", "sft_r", "sft_f"]
    report = (run / "eval.md").read_text()
    assert report.startswith("Mean ± standard deviation over 2 seeds (0, 1)")
    assert "| sft_f | init | fast |" in report
    assert (run / "replicates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert report.strip() in out
    # A resume after both seeds finished skips every stage and writes the same report.
    assert main(["--resume", str(run)]) == 0
    assert "sft_f: done (skipped)" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text()) == summary


def test_resume_runs_the_seeds_not_started(tmp_path, capsys):
    path = tmp_path / "seeds.toml"
    path.write_text(CONFIG)
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    shutil.rmtree(run / "seed-1")  # as if killed before seed 1 started
    assert main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "== stage sft_r" in out and (run / "seed-1" / "summary.json").exists()


def test_aggregate_summaries_mean_spread_and_noise_counts():
    def summary(acc: float, diff: float, outside: bool) -> dict:
        interval = {"value": acc, "low": acc - 0.02, "high": acc + 0.02}
        return {
            "eval_problems": {"fast": 1000},
            "stages": [{"stage": "kd", "schedule": "KD(F)", "accuracy": {"fast": interval}}],
            "comparisons": [
                {
                    "stage": "kd",
                    "baseline": "sft",
                    "mode": "fast",
                    "configured": True,
                    "difference": {"value": diff, "low": diff - 0.01, "high": diff + 0.01},
                    "outside_noise": outside,
                }
            ],
        }

    out = aggregate_summaries(
        [0, 1, 2], [summary(0.30, 0.05, True), summary(0.34, 0.03, True), summary(0.32, 0.0, False)]
    )
    fast = out["stages"][0]["accuracy"]["fast"]
    assert fast["mean"] == pytest.approx(0.32) and fast["std"] == pytest.approx(0.02)
    assert fast["per_seed"] == [0.30, 0.34, 0.32] and (fast["min"], fast["max"]) == (0.30, 0.34)
    comparison = out["comparisons"][0]
    assert comparison["difference"]["mean"] == pytest.approx(0.08 / 3)
    assert comparison["outside_noise_seeds"] == 2 and comparison["seeds"] == 3
    with pytest.raises(ValueError, match="one summary per seed"):
        aggregate_summaries([0, 1], [summary(0.3, 0.0, False)])


def test_replicate_config_and_bad_seeds():
    config = load_config("tiny", ["seeds=[0, 5]"])
    sub = replicate_config(config, 5)
    assert sub.seeds == [] and sub.seed == 5 and sub.student.seed == config.student.seed + 5
    assert sub.run_dir.endswith("seed-5")
    raw = {
        "data": {"source": "demo"},
        "stages": [{"name": "s", "kind": "sft", "data": "train_fast"}],
    }
    for bad in ([0, 0], [-1], [True]):
        with pytest.raises(ConfigError, match="seeds must be"):
            config_from_dict({**raw, "seeds": bad})
