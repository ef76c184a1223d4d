"""Training logs: the KD health statistics against a direct float64 computation, their per-step
sums over micro-batches and ranks, the keys of metrics.jsonl in a real tiny run, TensorBoard
event files read back and equal to metrics.jsonl (also after resumes), the missing-package
error, and the ``[logging]`` table's checks."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pangu_fastkd.distributed import DistributedContext
from pangu_fastkd.ops import TopKTarget
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.config import ConfigError, LoggingSpec, load_config
from pangu_fastkd.train.kd_health import AGREEMENT_KEYS, HEALTH_KEYS, kd_health, sample_rows
from pangu_fastkd.train.metrics import read_metrics
from pangu_fastkd.train.run_dir import RunDirError, prepare_run_dir
from pangu_fastkd.train.step_stats import STEP_STAT_KEYS, StepStats
from pangu_fastkd.train.tensorboard_log import MissingTensorBoardError, require_tensorboard

# SFT, a teacher trained here, its top-K cache and a KD stage: every kind of training record, in
# a few seconds. kd_weight < 1 so that the loss is a mix of the hard and the soft loss.
KD_RUN = """
run_dir = "unused"
checkpoint_every = 2
[data]
source = "demo"
train_problems = 48
eval_problems = 4
max_difficulty = 2
[student]
preset = "tiny"
seed = 3
[teachers.t]
preset = "tiny"
seed = 4
train_on = ["train_fast"]
train = { steps = 3, batch_tokens = 400, optim = { lr = 3e-3, warmup_steps = 1 } }
[eval]
max_examples = 4
max_new_tokens = 8
[logging]
tensorboard = true
health_rows = 16
[[stages]]
name = "sft"
kind = "sft"
data = "train_fast"
train = { steps = 2, batch_tokens = 300, optim = { lr = 3e-3, warmup_steps = 1 } }
[[stages]]
name = "score"
kind = "score"
data = "train_fast"
teacher = "t"
k = 8
max_examples = 24
[[stages]]
name = "kd"
kind = "kd"
cache = "score"
kd_weight = 0.7
train = { steps = 4, batch_tokens = 300, grad_accum = 2, optim = { lr = 1e-3, warmup_steps = 1 } }
"""
KD_KEYS = {"hard_loss", "soft_loss", *HEALTH_KEYS, "tokens_per_s"}


# ---------------------------------------------------------------------------------------------
# The statistics


def _topk_target(dense: torch.Tensor, k: int, temperature: float) -> TopKTarget:
    """The cache's view of a dense teacher ``[N, V]``: its top-k in shuffled slot order, row 1
    with two empty slots and row 4 with none stored."""
    gen = torch.Generator().manual_seed(7)
    logits, ids = dense.topk(k, dim=-1)
    order = torch.stack([torch.randperm(k, generator=gen) for _ in range(dense.shape[0])])
    ids, logits = ids.gather(1, order), logits.gather(1, order)
    ids[1, :2], logits[1, :2] = -1, -torch.inf
    ids[4], logits[4] = -1, -torch.inf
    # In float64, so that the statistics can be compared with a float64 softmax to 1e-12.
    lse = torch.logsumexp(dense.double() / temperature, dim=-1)
    return TopKTarget(ids.int(), logits, lse, dense[:, 0], temperature=temperature)


def _direct_health(z: torch.Tensor, p: torch.Tensor, target: TopKTarget, rows: list[int]):
    """The statistics row by row, from the dense float64 student logits ``z`` and teacher
    probabilities ``p`` (both ``[N, V]``, at the cache temperature)."""
    q = torch.softmax(z / target.temperature, dim=-1)
    tail = [1 - sum(p[i, s] for s in target.ids[i].tolist() if s >= 0) for i in range(len(z))]
    found = {key: [] for key in AGREEMENT_KEYS}
    true_mass = []  # the teacher's mass on the student's top-k, which the cache cannot give
    for i in rows:
        stored = [s for s in target.ids[i].tolist() if s >= 0]
        if not stored:
            continue
        top = sorted(range(z.shape[1]), key=lambda v: -float(q[i, v]))[: len(stored)]
        shared = set(stored) & set(top)
        found["student_mass_on_teacher_topk"].append(sum(float(q[i, s]) for s in stored))
        found["teacher_mass_in_student_topk"].append(sum(float(p[i, s]) for s in shared))
        found["topk_overlap"].append(len(shared) / len(stored))
        true_mass.append(sum(float(p[i, v]) for v in top))
    return torch.tensor(tail, dtype=torch.float64), found, true_mass


def test_kd_health_matches_a_direct_float64_computation():
    N, V, d, K, T, softcap = 23, 41, 12, 6, 1.5, 4.0
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(N, d, generator=gen), torch.randn(V, d, generator=gen) / 3
    bias = torch.randn(V, generator=gen)
    # A teacher correlated with the student, so the top-k sets partly overlap.
    z = softcap * torch.tanh((hidden.double() @ weight.double().T + bias.double()) / softcap)
    dense = z.float() + torch.randn(N, V, generator=gen)
    target = _topk_target(dense, K, T)
    p = torch.softmax(dense.double() / T, dim=-1)
    rows = sample_rows(N, 9).tolist()

    health = kd_health(hidden, weight, target, bias=bias, softcap=softcap, max_rows=9)

    tail, expected, true_mass = _direct_health(z, p, target, rows)
    torch.testing.assert_close(health["teacher_tail_mass"], tail, rtol=0, atol=1e-12)
    assert float(health["teacher_tail_mass"][4]) == 1.0  # nothing stored
    for key in AGREEMENT_KEYS:
        assert health[key].dtype == torch.float64
        values = torch.tensor(expected[key], dtype=torch.float64)
        torch.testing.assert_close(health[key], values, rtol=0, atol=1e-12)
    overlap = health["topk_overlap"]
    assert 0 < float(overlap.min()) and float(overlap.max()) < 1  # neither trivial case only
    # The stored ids give a lower bound of the teacher's mass on the student's top-k, short by
    # at most the tail the cache did not keep.
    sampled_tail = tail[[i for i in rows if i != 4]]
    mass = health["teacher_mass_in_student_topk"]
    true_mass = torch.tensor(true_mass, dtype=torch.float64)
    assert bool((mass <= true_mass + 1e-12).all() and (mass >= true_mass - sampled_tail).all())
    assert bool((mass < true_mass - 1e-9).any())  # the bound is not always tight


def test_kd_health_reads_only_the_sampled_rows_and_none_with_zero():
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(10, 30, generator=gen)
    target = _topk_target(dense, 4, 1.0)
    hidden, weight = torch.randn(10, 5, generator=gen), torch.randn(30, 5, generator=gen)
    poisoned = hidden.clone()
    unsampled = sorted(set(range(10)) - set(sample_rows(10, 3).tolist()))
    poisoned[unsampled] = torch.nan
    health = kd_health(poisoned, weight, target, max_rows=3)
    assert all(bool(torch.isfinite(v).all()) for v in health.values())
    none = kd_health(hidden, weight, target, max_rows=0)
    assert none["teacher_tail_mass"].shape == (10,)
    assert all(none[key].numel() == 0 for key in AGREEMENT_KEYS)


@pytest.mark.parametrize(("num_rows", "max_rows"), [(5, 64), (64, 64), (65, 64), (1000, 7)])
def test_sample_rows_are_distinct_evenly_spread_and_capped(num_rows, max_rows):
    rows = sample_rows(num_rows, max_rows).tolist()
    assert len(rows) == min(num_rows, max_rows) and rows == sorted(set(rows))
    assert rows[0] == 0 and rows[-1] < num_rows
    if num_rows > max_rows:
        gaps = np.diff(rows)
        assert gaps.max() - gaps.min() <= 1


def test_step_stats_add_over_micro_batches_and_ranks_to_the_global_means():
    gen = torch.Generator().manual_seed(2)
    batches = {rank: [torch.rand(n, generator=gen) for n in (5, 9)] for rank in (0, 1)}
    flats = []
    for rank, micro_batches in batches.items():
        stats = StepStats()
        for values in micro_batches:
            stats.add("hard_loss", values.float())
            if rank == 1:  # a key only one rank has
                stats.add("topk_overlap", values[:2])
        flats.append(stats.flat())
    assert flats[0].shape == (2 * len(STEP_STAT_KEYS),) and flats[0].dtype == torch.float64
    means = StepStats.from_flat(flats[0] + flats[1]).means()  # what the all-reduce sums
    every = torch.cat([v for vs in batches.values() for v in vs]).float().double()
    assert list(means) == ["hard_loss", "topk_overlap"]
    assert means["hard_loss"] == pytest.approx(float(every.mean()), rel=1e-12)
    overlap = torch.cat([v[:2] for v in batches[1]]).double()
    assert means["topk_overlap"] == pytest.approx(float(overlap.mean()), rel=1e-12)
    stats = StepStats.from_flat(flats[1])
    stats.clear()
    assert stats.means() == {}


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard from a real run


def _events(run: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard" / stage), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def _train_records(run: Path, stage: str) -> list[dict]:
    records = read_metrics(run / "metrics.jsonl")
    return [r for r in records if r["kind"] == "train" and r["stage"] == stage]


def _assert_tensorboard_is_metrics(run: Path, stage: str) -> None:
    """Every finite number of the stage's records is a TensorBoard scalar at its step, once,
    with the record's value (TensorBoard keeps float32)."""
    records = _train_records(run, stage)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("kind", "stage", "step") and isinstance(value, int | float):
                expected.setdefault(f"train/{key}", []).append(
                    (record["step"], float(np.float32(value)))
                )
    assert _events(run, stage) == expected
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))


def test_a_tiny_run_logs_its_statistics_to_metrics_tensorboard_and_the_plot(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    config = tmp_path / "kd.toml"
    config.write_text(KD_RUN)
    run = tmp_path / "run"
    assert main([str(config), "--run-dir", str(run)]) == 0
    for stage in ("sft", "teacher t"):  # SFT: the hard loss and tokens/s, nothing of KD
        for record in _train_records(run, stage):
            assert {"hard_loss", "tokens_per_s"} <= set(record)
            assert not set(record) & (KD_KEYS - {"hard_loss", "tokens_per_s"})
            assert record["hard_loss"] == pytest.approx(record["loss"], rel=1e-5)
    kd = _train_records(run, "kd")
    assert [r["step"] for r in kd] == [1, 2, 3, 4]
    for record in kd:
        assert KD_KEYS <= set(record)
        # The soft loss is the divergence before kd_weight * T^2 (T = 1 here).
        mixed = 0.7 * record["soft_loss"] + 0.3 * record["hard_loss"]
        assert record["loss"] == pytest.approx(mixed, rel=1e-5)
        assert all(0 <= record[key] <= 1 for key in HEALTH_KEYS)
        assert record["teacher_mass_in_student_topk"] <= 1 - record["teacher_tail_mass"] + 1e-9
    for stage in ("sft", "teacher t", "kd"):
        _assert_tensorboard_is_metrics(run, stage)
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = {k: [r[k] for r in kd] for k in ("loss", "hard_loss", "soft_loss", *HEALTH_KEYS)}

    # Killed after the KD stage's step-2 checkpoint, its event files lost: the resume cuts the
    # metrics at step 2, writes steps 1-2 to TensorBoard again from them, then steps 3-4.
    kd_dir = next((run / "stages").glob("*-kd"))
    for name in ("done.json", "model", "checkpoint"):
        path = kd_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(run / "tensorboard" / "kd")
    assert main(["--resume", str(run)]) == 0
    assert "kd: resuming at step 2/4" in capsys.readouterr().out
    _assert_tensorboard_is_metrics(run, "kd")
    again = _train_records(run, "kd")
    assert {k: [r[k] for r in again] for k in first} == first  # the same steps, exactly

    # Killed before its first checkpoint: the stage starts over and its earlier records go
    # (they were kept, and the steps logged twice, before truncate_after(stage, 0)). [logging]
    # may change on a resume; it changes what is logged, not what is trained.
    shutil.rmtree(kd_dir)
    assert main(["--resume", str(run), "--set", "logging.health_rows=4"]) == 0
    _assert_tensorboard_is_metrics(run, "kd")
    redone = _train_records(run, "kd")
    for key in ("loss", "hard_loss", "soft_loss"):
        assert [r[key] for r in redone] == first[key]
    assert [r["topk_overlap"] for r in redone] != first["topk_overlap"]  # 4 rows, not 16
    assert [r["stage"] for r in read_metrics(run / "metrics.jsonl")].count("kd") == 4 + 1
    assert main(["--resume", str(run), "--set", "seed=1"]) == 2
    assert "--set only settings of how it executes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Without the package, and the [logging] table


SFT_RUN = """
run_dir = "unused"
[data]
source = "demo"
train_problems = 16
eval_problems = 2
max_difficulty = 1
[student]
preset = "tiny"
[eval]
max_examples = 2
max_new_tokens = 4
[logging]
tensorboard = true
[[stages]]
name = "sft"
kind = "sft"
data = "train_fast"
train = { steps = 1, batch_tokens = 300 }
"""


def test_a_missing_tensorboard_is_named_before_the_run_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(MissingTensorBoardError, match=r"pip install 'tensorboard>=2\.14'"):
        require_tensorboard()
    assert issubclass(MissingTensorBoardError, ImportError)
    config = tmp_path / "sft.toml"
    config.write_text(SFT_RUN)
    run = tmp_path / "run"
    assert main([str(config), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [logging] tensorboard = true needs the tensorboard package")
    assert "pip install -e '.[tensorboard]'" in err and not run.exists()
    # With TensorBoard off nothing imports it.
    off = ["--set", "logging.tensorboard=false"]
    assert main([str(config), "--run-dir", str(run), *off]) == 0
    assert not (run / "tensorboard").exists()
    assert "hard_loss" in _train_records(run, "sft")[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.health_rows=-1", "logging.health_rows must be in [0, 4096]"),
        ("logging.health_rows=4097", "logging.health_rows must be in [0, 4096]"),
        ("logging.health_rows=1.5", "logging.health_rows: expected int, got 1.5"),
        ("logging.tensorboard='yes'", "logging.tensorboard: expected bool, got 'yes'"),
        ("logging.tensorbord=true", "logging: unknown key(s) ['tensorbord']"),
        ("logging=3", "logging: expected a table, got int"),
    ],
)
def test_the_logging_table_names_its_bad_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_logging_defaults_and_a_resume_may_change_it(tmp_path):
    config = load_config("tiny")
    assert config.logging == LoggingSpec(tensorboard=False, health_rows=64)
    with pytest.raises(ConfigError, match=r"logging\.tensorboard must be a bool"):
        LoggingSpec(tensorboard="yes").validate()
    context = DistributedContext(0, 1, 0)
    run = tmp_path / "run"
    started = {"seed": 0, "logging": {"tensorboard": False, "health_rows": 64}}
    prepare_run_dir(run, started, context, resume=False, overwrite=False)
    changed = {"seed": 0, "logging": {"tensorboard": True, "health_rows": 8}}
    prepare_run_dir(run, changed, context, resume=True, overwrite=False)
    with pytest.raises(RunDirError, match="configuration differs"):
        prepare_run_dir(run, {**changed, "seed": 1}, context, resume=True, overwrite=False)
