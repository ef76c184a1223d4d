"""The non-finite step guard: a step whose loss or gradient norm is NaN or infinite is not
applied (the weights and optimizer state end as if its batch had been passed over), it is
logged as skipped, and ``max_bad_steps`` of them in a row stop the stage by name, keeping the
last good checkpoint; with torchrun, every rank takes the same decision."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.data.packing import PackedBatch
from pangu_fastkd.distributed import DistributedContext
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.checkpoint import load_checkpoint
from pangu_fastkd.train.config import ConfigError
from pangu_fastkd.train.loop import (
    LossModule,
    NonFiniteStepsError,
    StageRunner,
    StepPlan,
    make_optimizer,
)
from pangu_fastkd.train.metrics import read_metrics
from pangu_fastkd.train.specs import OptimSpec, TrainSpec

REPO = Path(__file__).resolve().parents[1]
VOCAB = 40
POISONED = 2  # the step (and batch: one batch per step) that goes bad


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _batch(seed: int) -> PackedBatch:
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 7, 4]
    input_ids = torch.randint(0, VOCAB, (sum(lengths),), generator=gen)
    labels = torch.full_like(input_ids, -100)
    cu = cu_seqlens_from_lengths(lengths)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        labels[start : end - 1] = input_ids[start + 1 : end]
    positions = torch.cat([torch.arange(n) for n in lengths])
    return PackedBatch(input_ids, labels, cu, positions, (f"a{seed}", f"b{seed}", f"c{seed}"))


def _runner(model: DecoderLM, batches, train: TrainSpec) -> StageRunner:
    module = LossModule(model)
    plan = StepPlan.build(len(batches), train, 1)
    optimizer = make_optimizer(module, train.optim)
    return StageRunner(
        module, optimizer, batches, plan, train, DistributedContext(0, 1, 0), name="s"
    )


def _poison(monkeypatch, bad, how: str) -> None:
    """Makes the loss of the batches ``bad(batch)`` picks NaN (``how="loss"``) or gives it an
    infinite gradient (``how="grad"``)."""
    forward = LossModule.forward

    def poisoned(self, batch, target, num_items):
        loss = forward(self, batch, target, num_items)
        if not bad(batch):
            return loss
        return loss * math.nan if how == "loss" else _InfiniteGradient.apply(loss)

    monkeypatch.setattr(LossModule, "forward", poisoned)


def _optimizer_tensors(runner: StageRunner) -> list[torch.Tensor]:
    state = runner.optimizer.state_dict()["state"]
    return [t for key in sorted(state) for t in state[key].values()]


@pytest.mark.parametrize("how", ["loss", "grad"])
@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clip", "noclip"])
def test_a_poisoned_batch_is_skipped_as_if_it_were_not_there(monkeypatch, how, clip):
    model = DecoderLM(ModelConfig.preset("tiny", VOCAB))
    init_weights(model, seed=5)
    reference_model = copy.deepcopy(model)
    batches = [_batch(seed) for seed in range(6)]
    train = TrainSpec(steps=5, optim=OptimSpec(lr=3e-3, warmup_steps=1, clip=clip))
    reference = _runner(reference_model, batches, train)
    for step in range(5):
        if step != POISONED:
            reference.step(step)  # the same plan, the poisoned batch passed over

    _poison(monkeypatch, lambda batch: batch is batches[POISONED], how)
    runner = _runner(model, batches, train)
    results, grads_left = [], []

    def on_step(result):
        results.append(result)
        grads_left.append(any(p.grad is not None for p in model.parameters()))

    runner.run(0, on_step)
    assert [r.skipped for r in results] == [s == POISONED for s in range(5)]
    assert not grads_left[POISONED]  # the bad gradients are zeroed, not kept for the next step
    bad = results[POISONED]
    if how == "loss":
        assert math.isnan(bad.loss)
    elif clip > 0:
        assert math.isfinite(bad.loss) and not math.isfinite(bad.grad_norm)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, reference_model.state_dict()[name]), name
    for ours, theirs in zip(_optimizer_tensors(runner), _optimizer_tensors(reference), strict=True):
        assert torch.equal(ours, theirs)  # AdamW's moments and step count: 4 updates each


@pytest.mark.parametrize(
    "value,found",
    [
        (math.nan, r"hidden holds nan in row 3"),
        (-math.inf, r"hidden holds -inf in row 3"),
    ],
    ids=["nan-hidden", "inf-hidden"],
)
def test_check_finite_in_the_loss_skips_the_step_and_names_the_tensor(monkeypatch, value, found):
    # The trainer's loss runs with check_finite: a bad hidden state (here in supervised row 3 of
    # one batch) is named in the step's result, and the step is skipped like any NaN loss.
    model = DecoderLM(ModelConfig.preset("tiny", VOCAB))
    init_weights(model, seed=5)
    reference_model = copy.deepcopy(model)
    batches = [_batch(seed) for seed in range(6)]
    train = TrainSpec(steps=4, optim=OptimSpec(lr=3e-3, warmup_steps=0))
    reference = _runner(reference_model, batches, train)
    for step in range(4):
        if step != POISONED:
            reference.step(step)
    hidden_states = DecoderLM.hidden_states

    def poisoned(self, input_ids, cu_seqlens):
        hidden = hidden_states(self, input_ids, cu_seqlens)
        if input_ids is batches[POISONED].input_ids:
            hidden = hidden.clone()
            hidden[3] = value
        return hidden

    monkeypatch.setattr(DecoderLM, "hidden_states", poisoned)
    results = []
    _runner(model, batches, train).run(0, results.append)
    assert [r.skipped for r in results] == [s == POISONED for s in range(4)]
    assert re.search(found, results[POISONED].non_finite), results[POISONED].non_finite
    assert all(not r.non_finite for i, r in enumerate(results) if i != POISONED)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, reference_model.state_dict()[name]), name


def test_max_bad_steps_in_a_row_stop_the_stage_by_name(monkeypatch):
    model = DecoderLM(ModelConfig.preset("tiny", VOCAB))
    init_weights(model, seed=5)
    before = copy.deepcopy(model.state_dict())
    batches = [_batch(seed) for seed in range(6)]
    train = TrainSpec(steps=6, max_bad_steps=3, optim=OptimSpec(warmup_steps=0))
    _poison(monkeypatch, lambda batch: True, "loss")
    results = []
    with pytest.raises(NonFiniteStepsError, match=r"s: stopped at step 3/6: 3 steps in a row"):
        _runner(model, batches, train).run(0, results.append)
    assert len(results) == 3 and all(r.skipped for r in results)
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, before[name]), name


def test_a_good_step_resets_the_count(monkeypatch):
    model = DecoderLM(ModelConfig.preset("tiny", VOCAB))
    init_weights(model, seed=5)
    batches = [_batch(seed) for seed in range(6)]
    train = TrainSpec(steps=6, max_bad_steps=2, optim=OptimSpec(warmup_steps=0))
    _poison(monkeypatch, lambda batch: batch.example_ids[0] not in ("a1", "a4"), "loss")
    results = []
    with pytest.raises(NonFiniteStepsError, match=r"steps 3\.\.4"):
        _runner(model, batches, train).run(0, results.append)
    assert [r.skipped for r in results] == [True, False, True, True]


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_max_bad_steps_is_checked(value):
    with pytest.raises(ConfigError, match=r"w\.max_bad_steps must be (an int|>= 1)"):
        TrainSpec(max_bad_steps=value).validate("w")
    TrainSpec(max_bad_steps=1).validate("w")


# ---------------------------------------------------------------------------------------------
# Through the pipeline: the progress output, metrics.jsonl and the kept checkpoint

ONE_STAGE = """
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
train = { steps = 8, batch_tokens = 400, max_bad_steps = 3, optim = { lr = 3e-3, warmup_steps = 1 }}
"""


def test_a_run_that_goes_bad_stops_and_keeps_its_last_good_checkpoint(
    tmp_path, monkeypatch, capsys
):
    current = {"step": 0}
    step = StageRunner.step

    def counting_step(self, index):
        current["step"] = index
        return step(self, index)

    monkeypatch.setattr(StageRunner, "step", counting_step)
    # Good for two steps (the checkpoint at 2), then NaN for good.
    _poison(monkeypatch, lambda batch: current["step"] >= 2, "loss")
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE)
    run = tmp_path / "run"
    assert main([str(config), "--run-dir", str(run)]) == 2
    captured = capsys.readouterr()
    assert "sft_r: stopped at step 5/8: 3 steps in a row (steps 3..5)" in captured.err
    stage_dir = run / "stages" / "0-sft_r"
    assert f"the last good checkpoint {stage_dir / 'checkpoint'} is kept" in captured.err
    for skipped in (3, 4, 5):
        assert f"sft_r: step {skipped}/8 skipped: loss nan" in captured.out
    train = [m for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]
    assert [(m["step"], m.get("skipped", False)) for m in train] == [
        (1, False), (2, False), (3, True), (4, True), (5, True)
    ]  # fmt: skip
    assert train[2]["loss"] is None  # NaN is written as null
    # The checkpoint of step 2 stays (none was written at step 4, a skipped step) and loads.
    checkpoint = load_checkpoint(stage_dir)
    assert checkpoint is not None and checkpoint.next_step == 2 and not checkpoint.passed_over
    assert not (stage_dir / "checkpoint.old").exists()
    assert not (stage_dir / "done.json").exists()


POISON_RANK_1 = """
import math, sys
from pangu_fastkd.train.loop import LossModule, StageRunner
from pangu_fastkd.train.__main__ import main
forward, step = LossModule.forward, StageRunner.step
current = {}
def counting_step(self, index):
    current["step"] = index
    return step(self, index)
def poisoned(self, batch, target, num_items):
    loss = forward(self, batch, target, num_items)
    if self.training and current.get("step") == 1 and int(__import__("os").environ["RANK"]) == 1:
        return loss * math.nan
    return loss
StageRunner.step, LossModule.forward = counting_step, poisoned
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_ranks_agree_on_a_bad_step(tmp_path, fsdp):
    """A NaN on rank 1 only: both ranks skip the step and go on in step with each other."""
    config = tmp_path / "two.toml"
    text = ONE_STAGE.replace("steps = 8", "steps = 4")
    config.write_text(
        text.replace("checkpoint_every", f"fsdp = {str(fsdp).lower()}\ncheckpoint_every")
    )
    script = tmp_path / "poison.py"
    script.write_text(textwrap.dedent(POISON_RANK_1))
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(config), "--run-dir", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    train = [m for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]
    assert [m.get("skipped", False) for m in train] == [False, True, False, False]
    weights = load_checkpoint(run / "stages" / "0-sft_r")
    assert weights is not None and weights.next_step == 4
