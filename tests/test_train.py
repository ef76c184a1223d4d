"""``python -m pangu_fastkd.train``: configs, the tiny pipeline end to end, run-directory
safety, resume after SIGKILL, and torchrun data parallelism against one process."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pangu_fastkd.cache import verify_cache
from pangu_fastkd.model import load_pretrained
from pangu_fastkd.train import ConfigError, load_config
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.config import CONFIG_DIR
from pangu_fastkd.train.loop import StepPlan, lr_at
from pangu_fastkd.train.metrics import read_metrics
from pangu_fastkd.train.overrides import apply_overrides

REPO = Path(__file__).resolve().parents[1]

# A pipeline of two SFT stages only, small enough for several runs per test.
SFT_ONLY = """
run_dir = "unused"
checkpoint_every = 2
[data]
source = "demo"
train_problems = 64
eval_problems = 4
max_difficulty = 2
[student]
preset = "tiny"
seed = 3
[eval]
max_examples = 4
max_new_tokens = 8
[[stages]]
name = "sft_r"
kind = "sft"
data = "train_reasoning"
train = { steps = 4, batch_tokens = 400, grad_accum = 1, optim = { lr = 3e-3, warmup_steps = 1 } }
[[stages]]
name = "sft_f"
kind = "sft"
data = "train_fast"
train = { steps = 3, batch_tokens = 300, grad_accum = 1, optim = { lr = 2e-3, warmup_steps = 1 } }
"""


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
def test_shipped_configs_are_valid(name):
    config = load_config(name)
    # teacher.toml trains its teacher only; every other config has stages.
    assert config.stages or name == "teacher"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ('[student]\npresett = "tiny"', "unknown key(s) ['presett']"),
        ('[[stages]]\nname = "x"\nkind = "dance"', "'dance' is not one of"),
        ('[[stages]]\nname = "k"\nkind = "kd"\ncache = "nope"', "is not an earlier score stage"),
        (
            '[[stages]]\nname = "s"\nkind = "score"\ndata = "train_fast"\nteacher = "ghost"',
            "no teacher named 'ghost'",
        ),
        ('[[stages]]\nname = "r"\nkind = "sft"\ndata = "later"', "neither a split"),
        ("seed = 'zero'", "expected int"),
        ("checkpoint_every = [", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, edit, message):
    base = '[[stages]]\nname = "a"\nkind = "sft"\ndata = "train_fast"\n'
    text = edit if "stages" in edit else edit + "\n" + base
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, text))


def test_overrides_reach_nested_keys_and_list_items():
    raw = {"stages": [{"train": {"steps": 1}}], "student": {}}
    apply_overrides(raw, ["stages.0.train.steps=7", "student.preset=small", "seed=1e-3"])
    assert raw == {
        "stages": [{"train": {"steps": 7}}],
        "student": {"preset": "small"},
        "seed": 1e-3,
    }
    with pytest.raises(ConfigError, match="no list item"):
        apply_overrides(raw, ["stages.3.train.steps=1"])
    with pytest.raises(ConfigError, match=re.escape("key.path=value")):
        apply_overrides(raw, ["stages"])


def test_step_plan_and_schedule():
    plan = StepPlan(num_batches=5, world_size=2, grad_accum=2, total_steps=3)
    assert plan.micro_batches(0, 0) == [0, 2] and plan.micro_batches(0, 1) == [1, 3]
    assert sorted(plan.all_micro_batches(1)) == [0, 1, 2, 4]  # wraps into the next epoch
    optim = load_config("tiny").stages[0].train.optim
    lrs = [lr_at(s, 12, optim) for s in range(12)]
    assert lrs[0] < lrs[1] < lrs[2] == max(lrs) and lrs[-1] >= optim.min_lr_ratio * optim.lr


# ---------------------------------------------------------------------------------------------
# The tiny pipeline end to end (what CI runs)


def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    run = tmp_path / "tiny"
    assert main(["tiny", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    for stage in ("sft_reasoning", "sft_fast", "rollout_fast", "score_fast", "kd_fast"):
        assert list((run / "stages").glob(f"*-{stage}/done.json")), stage
    table = (run / "eval.md").read_text()
    assert "SFT(R) + SFT(F) + KD(F)" in table and table.strip() in out
    verify_cache(next((run / "stages").glob("*-score_fast")) / "cache")
    metrics = read_metrics(run / "metrics.jsonl")
    assert {m["stage"] for m in metrics if m["kind"] == "train"} >= {"sft_reasoning", "kd_fast"}
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = load_pretrained(next((run / "stages").glob("*-kd_fast")) / "model")
    assert student.config.vocab_size == 263
    # A second run in the same directory is refused and changes nothing; --overwrite reuses the
    # trained teacher; --resume of a finished run skips every stage.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["tiny", "--run-dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert main(["--resume", str(run)]) == 0
    assert "kd_fast: done (skipped)" in capsys.readouterr().out
    # Killed in the KD stage: the resume skips the score stage and the teacher is not loaded
    # again, but its row stays in the report.
    shutil.rmtree(next((run / "stages").glob("*-kd_fast")))
    assert main(["--resume", str(run)]) == 0
    assert "score_fast: done (skipped)" in capsys.readouterr().out
    assert (run / "eval.md").read_text() == table
    # The KD stage started over (no checkpoint left): its steps of the first run were dropped.
    metrics = read_metrics(run / "metrics.jsonl")
    steps = [m["step"] for m in metrics if m["kind"] == "train" and m["stage"] == "kd_fast"]
    assert steps == list(range(1, 9))


def test_bad_input_fails_before_training(tmp_path, capsys):
    missing = _write(
        tmp_path,
        '[data]\nsource = "files"\ntrain_fast = "nowhere.jsonl"\n'
        '[[stages]]\nname = "a"\nkind = "sft"\ndata = "train_fast"\n',
    )
    assert main([str(missing), "--run-dir", str(tmp_path / "r1")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    small = str(tmp_path / "small.toml")
    Path(small).write_text(SFT_ONLY.replace("batch_tokens = 300", "batch_tokens = 20"))
    assert main([small, "--run-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "sft_f" in err and "does not fit batch_tokens=20" in err
    assert not list((tmp_path / "r2").glob("stages/*-sft_r/checkpoint"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}'
    )
    bad_student = str(tmp_path / "bad.toml")
    Path(bad_student).write_text(SFT_ONLY.replace('preset = "tiny"', f'path = "{other}"'))
    assert main([bad_student, "--run-dir", str(tmp_path / "r3")]) == 2
    assert "gpt2" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit):
        main(["--resume"])  # argparse: missing value


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL, torchrun


def _config_file(tmp_path: Path, text: str = SFT_ONLY) -> str:
    path = tmp_path / "sft.toml"
    path.write_text(text)
    return str(path)


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    config = _config_file(tmp_path)
    assert main([config, "--run-dir", str(tmp_path / "whole")]) == 0
    slow = textwrap.dedent(
        """
        import sys, time
        from pangu_fastkd.train.loop import StageRunner
        from pangu_fastkd.train.__main__ import main
        step = StageRunner.step
        def slow_step(self, i):
            time.sleep(0.3)
            return step(self, i)
        StageRunner.step = slow_step
        sys.exit(main(sys.argv[1:]))
        """
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", slow, config, "--run-dir", str(killed)])
    try:
        deadline = time.monotonic() + 120
        # Kill inside the second stage, after its first mid-stage checkpoint.
        while not list(killed.glob("stages/*-sft_f/checkpoint/state.json")):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list(killed.glob("stages/*-sft_f/done.json"))
    assert main(["--resume", str(killed)]) == 0
    for stage in ("0-sft_r", "1-sft_f"):
        a = _weights(tmp_path / "whole" / "stages" / stage / "model")
        b = _weights(killed / "stages" / stage / "model")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (stage, key)
    metrics = read_metrics(killed / "metrics.jsonl")
    steps = [m["step"] for m in metrics if m["kind"] == "train" and m["stage"] == "sft_f"]
    assert steps == [1, 2, 3]  # the killed run's steps after its checkpoint were replaced


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_match_one_process(tmp_path, fsdp):
    """The same global batch (2 ranks x 1 micro-batch vs 1 rank x 2) gives the same weights."""
    two_ranks = SFT_ONLY.replace(
        "checkpoint_every", f"fsdp = {str(fsdp).lower()}\ncheckpoint_every"
    )
    one_rank = SFT_ONLY.replace("grad_accum = 1", "grad_accum = 2")
    assert main([_config_file(tmp_path, one_rank), "--run-dir", str(tmp_path / "one")]) == 0
    config = tmp_path / "two.toml"
    config.write_text(two_ranks)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pangu_fastkd.train", str(config), "--run-dir", str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("0-sft_r", "1-sft_f"):
        a = _weights(tmp_path / "one" / "stages" / stage / "model")
        b = _weights(tmp_path / "two" / "stages" / stage / "model")
        for key in a:
            # Gradient all-reduce sums in another order; AdamW's first steps (update ~ lr *
            # sign(g) where |g| is tiny) can turn last-bit differences into ~1e-6 ones.
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)
    # The step statistics are global: summed over the ranks in the step's all-reduce.
    hard = {
        run: [r["hard_loss"] for r in read_metrics(tmp_path / run / "metrics.jsonl")
              if r["kind"] == "train"]
        for run in ("one", "two")
    }  # fmt: skip
    assert len(hard["one"]) == 7 and hard["two"] == pytest.approx(hard["one"], rel=1e-4)


def test_bf16_autocast_trains(tmp_path):
    config = _config_file(tmp_path)
    run = tmp_path / "bf16"
    assert main([config, "--run-dir", str(run), "--set", "autocast_bf16=true"]) == 0
    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    weights = _weights(run / "stages" / "1-sft_f" / "model")
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32


def test_resume_may_change_the_thread_count_but_not_the_run(tmp_path):
    from pangu_fastkd.distributed import DistributedContext
    from pangu_fastkd.train.run_dir import RunDirError, prepare_run_dir

    context = DistributedContext(0, 1, 0)
    run = tmp_path / "run"
    prepare_run_dir(run, {"seed": 0, "threads": 1}, context, resume=False, overwrite=False)
    prepare_run_dir(run, {"seed": 0, "threads": 2}, context, resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="configuration differs"):
        prepare_run_dir(run, {"seed": 1, "threads": 2}, context, resume=True, overwrite=False)
