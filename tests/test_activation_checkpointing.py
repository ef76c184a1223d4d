"""Activation checkpointing (``activation_checkpointing = false | true | "every_<n>"``).

Checkpointed layers train exactly as the plain ones do (fp32 within rounding, bf16 autocast
loosely; packed multi-document rows with GQA through the packed-attention kernel, whose saved
tensors the recompute makes again), keep fewer bytes for backward (counted with
``saved_tensors_hooks``, not timed), run their forward a second time only when a backward needs
it, and keep the trainer's promises: bitwise resume, DDP and FSDP2 equal to one process. The
transformers backend takes the same switch. Bad values are config errors naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pangu_fastkd._native import native_available
from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.data.packing import PackedBatch
from pangu_fastkd.distributed import DistributedContext
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights, modeling
from pangu_fastkd.ops.packed_attention import attention_route
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.config import ConfigError, load_config
from pangu_fastkd.train.loop import LossModule, StageRunner, StepPlan, make_optimizer
from pangu_fastkd.train.specs import OptimSpec, TrainSpec

REPO = Path(__file__).resolve().parents[1]
VOCAB = 53
# GQA (4 query heads on 2 kv heads) and 4 layers, so that every_2 and every_3 differ from true.
CONFIG = dataclasses.replace(ModelConfig.preset("tiny", VOCAB), num_hidden_layers=4)
# Documents of awkward lengths in one packed row, a one-token document among them.
LENGTHS = ((13, 1, 29, 7), (31, 17, 2), (5, 40, 11, 3))
EVERY = {"false": 0, "true": 1, "every_2": 2}

# Two SFT stages of the tiny student, small enough for several runs per test.
TWO_STAGES = """
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
train = { steps = 4, batch_tokens = 400, grad_accum = 1, optim = { lr = 3e-3, warmup_steps = 1 }, activation_checkpointing = CKPT_R }
[[stages]]
name = "sft_f"
kind = "sft"
data = "train_fast"
train = { steps = 3, batch_tokens = 300, grad_accum = 1, optim = { lr = 2e-3, warmup_steps = 1 }, activation_checkpointing = CKPT_F }
"""  # noqa: E501
STAGES = ("0-sft_r", "1-sft_f")
STEPS = 4 + 3


def _two_stages(tmp_path: Path, ckpt_r: str, ckpt_f: str, name: str = "two.toml") -> str:
    path = tmp_path / name
    path.write_text(TWO_STAGES.replace("CKPT_R", ckpt_r).replace("CKPT_F", ckpt_f))
    return str(path)


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(run / "stages" / stage / "model" / "model.safetensors")


def _batch(lengths: tuple[int, ...], seed: int) -> PackedBatch:
    """One packed row of next-token labels inside each document (its last token unsupervised)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (sum(lengths),), generator=gen)
    labels = torch.full_like(input_ids, -100)
    cu = cu_seqlens_from_lengths(list(lengths))
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        labels[start : end - 1] = input_ids[start + 1 : end]
    positions = torch.cat([torch.arange(n) for n in lengths])
    ids = tuple(f"d{seed}-{i}" for i in range(len(lengths)))
    return PackedBatch(input_ids, labels, cu, positions, ids)


def _model(every: int) -> DecoderLM:
    model = DecoderLM(CONFIG)
    init_weights(model, seed=7)
    model.set_activation_checkpointing(every)
    return model


def _train(every: int, autocast_bf16: bool = False) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """``(loss, {name: grad})`` of each of 3 optimizer steps of the trainer's own loop (AdamW
    steps in between, so later steps run on weights the earlier gradients moved)."""
    model = _model(every)
    batches = [_batch(lengths, seed) for seed, lengths in enumerate(LENGTHS)]
    train = TrainSpec(steps=len(batches), optim=OptimSpec(lr=3e-3, warmup_steps=1))
    module = LossModule(model, autocast_bf16=autocast_bf16)
    optimizer = make_optimizer(module, train.optim)
    plan = StepPlan.build(len(batches), train, 1)
    runner = StageRunner(module, optimizer, batches, plan, train, DistributedContext(0, 1, 0))
    module.train()
    history = []
    for step in range(plan.total_steps):
        result = runner.step(step)
        assert not result.skipped
        history.append((result.loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return history


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------------------------------------
# The same training, less kept for backward


@pytest.mark.parametrize("every", [1, 2], ids=["true", "every_2"])
def test_checkpointed_training_equals_plain_training(every):
    if native_available():  # the recompute must make the C++ op's saved tensors again
        q = torch.zeros(4, CONFIG.num_attention_heads, CONFIG.resolved_head_dim)
        kv = torch.zeros(4, CONFIG.num_key_value_heads, CONFIG.resolved_head_dim)
        assert attention_route(q, kv, kv) == "cpu_kernel"
    want, got = _train(0), _train(every)
    for step, ((want_loss, want_grads), (got_loss, got_grads)) in enumerate(
        zip(want, got, strict=True)
    ):
        assert got_loss == pytest.approx(want_loss, rel=1e-6), step
        for name, grad in want_grads.items():
            assert grad.abs().max() > 0, f"{name} has no gradient"
            # fp32 rounding at most: the recompute runs the same kernels on the same inputs (on
            # CPU the results are in fact bitwise equal).
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_checkpointed_matches_loosely():
    """Autocast is replayed in the recompute as the forward had it: bf16 matmuls again, fp32
    master gradients."""
    want, got = _train(0, autocast_bf16=True), _train(1, autocast_bf16=True)
    for (want_loss, want_grads), (got_loss, got_grads) in zip(want, got, strict=True):
        assert got_loss == pytest.approx(want_loss, rel=1e-3)
        for name, grad in want_grads.items():
            assert got_grads[name].dtype == torch.float32
            assert _relative_error(got_grads[name], grad) <= 1e-2, name


def _saved_bytes(forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``forward()``'s output and the bytes autograd saved for its backward, counted as they
    are packed."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward()
    return output, saved


def _kept_bytes(every: int) -> int:
    """Bytes one training forward keeps for backward: autograd's saved tensors (counted as
    they are packed) plus the inputs of the checkpointed layers, which the checkpoint keeps
    itself."""
    model = _model(every)
    batch = _batch(LENGTHS[2], seed=2)
    hidden, saved = _saved_bytes(lambda: model.hidden_states(batch.input_ids, batch.cu_seqlens))
    checkpointed = sum(layer.activation_checkpointing for layer in model.layers)
    return saved + checkpointed * hidden.numel() * hidden.element_size()


def test_checkpointing_keeps_fewer_bytes_for_backward():
    plain, every_2, every_1 = _kept_bytes(0), _kept_bytes(2), _kept_bytes(1)
    assert every_1 < every_2 < plain
    # Half the layers keep nothing but their input; with every layer only the inputs and the
    # embedding and final norm's tensors are left.
    assert every_2 < 0.6 * plain
    assert every_1 < 0.2 * plain


def test_layers_recompute_only_when_a_backward_needs_it(monkeypatch):
    """A checkpointed layer runs twice per training step (forward, then again in backward);
    eval, no-grad forwards and generation run each layer once and checkpoint nothing."""
    calls = {"block": 0, "checkpoint": 0}
    block, checkpoint = modeling.DecoderLayer._block, modeling.checkpoint

    def counting_block(self, *args):
        calls["block"] += 1
        return block(self, *args)

    def counting_checkpoint(*args, **kwargs):
        calls["checkpoint"] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling.DecoderLayer, "_block", counting_block)
    monkeypatch.setattr(modeling, "checkpoint", counting_checkpoint)
    model = _model(2)  # layers 0 and 2 of 4
    assert [layer.activation_checkpointing for layer in model.layers] == [True, False] * 2
    batch = _batch(LENGTHS[0], seed=0)
    hidden = model.hidden_states(batch.input_ids, batch.cu_seqlens)
    assert calls == {"block": 4, "checkpoint": 2}
    hidden.square().sum().backward()
    assert calls == {"block": 6, "checkpoint": 2}  # layers 0 and 2 again
    with torch.no_grad():
        model.hidden_states(batch.input_ids, batch.cu_seqlens)
    model.eval()
    model.hidden_states(batch.input_ids, batch.cu_seqlens).sum().backward()
    assert calls == {"block": 14, "checkpoint": 2}
    model.set_activation_checkpointing(0)
    assert not any(layer.activation_checkpointing for layer in model.layers)


@pytest.mark.parametrize("every", [-1, True, 1.5, "2", None])
def test_set_activation_checkpointing_refuses_what_is_not_a_stride(every):
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        _model(0).set_activation_checkpointing(every)


# ---------------------------------------------------------------------------------------------
# The config field


@pytest.mark.parametrize(
    ("value", "every"),
    [("false", 0), ("true", 1), ("'every_3'", 3), ("every_2", 2), ("'every_1'", 1)],
)
def test_config_takes_false_true_and_every_n(value, every):
    # every_2 unquoted: --set takes what is not a TOML value as the string it is.
    config = load_config("tiny", [f"stages.0.train.activation_checkpointing={value}"])
    assert config.stages[0].train.checkpointing_every == every
    assert config.stages[1].train.checkpointing_every == 0  # per stage; off by default


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("stages.0.train.activation_checkpointing", "'every_0'"),
        ("stages.0.train.activation_checkpointing", "'every'"),
        ("stages.0.train.activation_checkpointing", "'every_2x'"),
        ("stages.0.train.activation_checkpointing", "'every_-1'"),
        ("stages.0.train.activation_checkpointing", "'all'"),
        ("stages.0.train.activation_checkpointing", "'True'"),
        ("stages.0.train.activation_checkpointing", "2"),
        ("stages.0.train.activation_checkpointing", "1.5"),
        ("stages.0.train.activation_checkpointing", "[1]"),
        ("stages.4.train.activation_checkpointing", "'every_1234567'"),
        ("teachers.teacher.train.activation_checkpointing", "'yes'"),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(key, value):
    message = f"{key} must be false, true or 'every_<n>' (n >= 1: every n-th decoder layer), got"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [f"{key}={value}"])


def test_an_unvalidated_spec_refuses_to_give_a_stride():
    with pytest.raises(ConfigError, match="activation_checkpointing must be false, true or"):
        _ = TrainSpec(activation_checkpointing="every_0").checkpointing_every


# ---------------------------------------------------------------------------------------------
# The trainer: per stage, resume, DDP and FSDP2

# Counts, in a process of its own, the checkpointed layer forwards (torch's checkpoint, patched
# before the model and transformers import it) and the embedded model's layer forwards that
# build a graph, and writes them to calls-<rank>.json when the run ends.
COUNT_CALLS = """
import atexit, json, os, sys
import torch, torch.utils.checkpoint
calls = {"block": 0, "checkpoint": 0}
checkpoint = torch.utils.checkpoint.checkpoint
def counting_checkpoint(*args, **kwargs):
    calls["checkpoint"] += 1
    return checkpoint(*args, **kwargs)
torch.utils.checkpoint.checkpoint = counting_checkpoint
from pangu_fastkd.model import modeling
from pangu_fastkd.train.__main__ import main
block = modeling.DecoderLayer._block
def counting_block(self, *args):
    calls["block"] += torch.is_grad_enabled()
    return block(self, *args)
modeling.DecoderLayer._block = counting_block
out = os.path.join(os.environ["CALLS_DIR"], f"calls-{os.environ.get('RANK', '0')}.json")
atexit.register(lambda: open(out, "w").write(json.dumps(calls)))
sys.exit(main(sys.argv[1:]))
"""


def _torchrun_counting(tmp_path: Path, config: Path, run: Path) -> list[dict[str, int]]:
    """Runs ``config`` into ``run`` on 2 ranks (torchrun, gloo) through ``COUNT_CALLS``;
    returns each rank's counts."""
    script = tmp_path / "count_calls.py"
    script.write_text(textwrap.dedent(COUNT_CALLS))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(config), "--run-dir", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env["CALLS_DIR"] = str(tmp_path)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"calls-{rank}.json").read_text()) for rank in (0, 1)]


def _count_calls(monkeypatch) -> dict[str, int]:
    """The same counts as ``COUNT_CALLS``, in this process."""
    calls = {"block": 0, "checkpoint": 0}
    block, checkpoint = modeling.DecoderLayer._block, modeling.checkpoint

    def counting_block(self, *args):
        calls["block"] += torch.is_grad_enabled()
        return block(self, *args)

    def counting_checkpoint(*args, **kwargs):
        calls["checkpoint"] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling.DecoderLayer, "_block", counting_block)
    monkeypatch.setattr(modeling, "checkpoint", counting_checkpoint)
    return calls


def test_the_trainer_applies_it_per_stage(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    layers = ModelConfig.preset("tiny", 263).num_hidden_layers
    run = tmp_path / "run"
    assert main([_two_stages(tmp_path, "true", "false"), "--run-dir", str(run)]) == 0
    # sft_r: 4 steps of one micro-batch, every layer checkpointed and run again in backward;
    # sft_f: 3 steps, none; eval and generation build no graph.
    assert calls == {"checkpoint": 4 * layers, "block": 2 * 4 * layers + 3 * layers}


class _KilledError(Exception):
    """Stands in for a kill in the middle of a stage."""


def test_resume_with_checkpointing_ends_with_bitwise_the_same_weights(tmp_path, monkeypatch):
    config = _two_stages(tmp_path, "true", "'every_2'")
    assert main([config, "--run-dir", str(tmp_path / "whole")]) == 0
    plain = _two_stages(tmp_path, "false", "false", name="plain.toml")
    assert main([plain, "--run-dir", str(tmp_path / "plain")]) == 0

    step = StageRunner.step

    def crash_in_sft_f(self, index):
        if self.name == "sft_f" and index == 2:  # after its checkpoint at step 2
            raise _KilledError
        return step(self, index)

    monkeypatch.setattr(StageRunner, "step", crash_in_sft_f)
    killed = tmp_path / "killed"
    with pytest.raises(_KilledError):
        main([config, "--run-dir", str(killed)])
    assert (killed / "stages" / "1-sft_f" / "checkpoint").is_dir()
    monkeypatch.setattr(StageRunner, "step", step)
    calls = _count_calls(monkeypatch)
    assert main(["--resume", str(killed)]) == 0
    assert calls["checkpoint"] == 1  # the last step, on the reloaded model: layer 0 of 2
    for stage in STAGES:
        whole, resumed = _weights(tmp_path / "whole", stage), _weights(killed, stage)
        unchecked = _weights(tmp_path / "plain", stage)
        for key in whole:
            assert torch.equal(resumed[key], whole[key]), (stage, key)
            torch.testing.assert_close(whole[key], unchecked[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_with_checkpointing_match_one_process(tmp_path, fsdp):
    """2 ranks x 1 micro-batch, every layer checkpointed, against 1 rank x 2 without."""
    one = Path(_two_stages(tmp_path, "false", "false", name="one.toml"))
    one.write_text(one.read_text().replace("grad_accum = 1", "grad_accum = 2"))
    assert main([str(one), "--run-dir", str(tmp_path / "one")]) == 0
    two = Path(_two_stages(tmp_path, "true", "true"))
    two.write_text(
        two.read_text().replace("checkpoint_every", f"fsdp = {str(fsdp).lower()}\ncheckpoint_every")
    )
    layers = ModelConfig.preset("tiny", 263).num_hidden_layers
    for calls in _torchrun_counting(tmp_path, two, tmp_path / "two"):
        # Every layer of every micro-batch checkpointed, and run again in backward: the
        # recompute happened under DDP's and FSDP2's hooks.
        assert calls == {"checkpoint": STEPS * layers, "block": 2 * STEPS * layers}
    for stage in STAGES:
        a, b = _weights(tmp_path / "one", stage), _weights(tmp_path / "two", stage)
        for key in a:
            # As test_train's torchrun test: all-reduce order and AdamW's first steps.
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# The transformers backend


def test_transformers_layers_checkpoint_through_their_own_switch():
    transformers = pytest.importorskip("transformers")
    from pangu_fastkd.hf.model import HFCausalLM

    hf_config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    weights = transformers.AutoModelForCausalLM.from_config(hf_config).state_dict()
    batch = _batch(LENGTHS[0], seed=0)

    def run(every: int) -> tuple[HFCausalLM, int, dict[str, torch.Tensor]]:
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        hf_model.load_state_dict(weights)
        model = HFCausalLM(hf_model).train()
        model.set_activation_checkpointing(every)
        hidden, saved = _saved_bytes(lambda: model.hidden_states(batch.input_ids, batch.cu_seqlens))
        hidden.square().sum().backward()
        return model, saved, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_saved, want = run(0)
    for every, flags in ((1, [True] * 4), (2, [True, False] * 2)):
        model, saved, got = run(every)
        layers = model.hf_model.model.layers
        assert [layer.gradient_checkpointing for layer in layers] == flags
        assert saved < 0.6 * plain_saved
        assert got.keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        model.set_activation_checkpointing(0)
        assert not any(layer.gradient_checkpointing for layer in layers)
        assert not getattr(model.hf_model, "_require_grads_hooks", None)  # no hook left behind
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        plain.set_activation_checkpointing(-2)


HF_STUDENT = """
checkpoint_every = 1
[data]
source = "demo"
train_problems = 12
eval_problems = 2
max_difficulty = 1
[student]
path = "STUDENT"
backend = "transformers"
[eval]
max_examples = 2
max_new_tokens = 4
batch_size = 2
[[stages]]
name = "sft"
kind = "sft"
data = "train_fast"
train = { steps = 2, batch_tokens = 300, optim = { lr = 3e-3, warmup_steps = 0 }, TRAIN }
"""


def test_torchrun_ddp_trains_a_transformers_student_with_checkpointing(tmp_path):
    """The trainer switches transformers' own checkpointing per stage: every_2 on 2 ranks, its
    weights those of one process without it (1 rank x 2 micro-batches)."""
    pytest.importorskip("transformers")
    from test_hf_pipeline import _hf_dir

    text = HF_STUDENT.replace("STUDENT", str(_hf_dir(tmp_path, "qwen3", seed=5)))
    one, two = tmp_path / "one.toml", tmp_path / "two.toml"
    one.write_text(text.replace("TRAIN", "grad_accum = 2"))
    two.write_text(text.replace("TRAIN", "activation_checkpointing = 'every_2'"))
    assert main([str(one), "--run-dir", str(tmp_path / "one")]) == 0
    for calls in _torchrun_counting(tmp_path, two, tmp_path / "two"):
        assert calls["checkpoint"] == 2  # 2 steps x layer 0 of 2
    a = _weights(tmp_path / "one", "0-sft")
    b = _weights(tmp_path / "two", "0-sft")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
