"""A damaged run directory is never trusted silently: checkpoints, finished stages' records and
outputs, the config a resume builds from and the KD stage's logit cache are each checked, and a
failure names the file (and what to delete); a damaged newest checkpoint falls back to the
previous good one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    set_aside_damaged,
)
from pangu_fastkd.train.integrity import seal
from pangu_fastkd.train.metrics import read_metrics
from pangu_fastkd.train.run_dir import read_record, write_finished_record
from pangu_fastkd.train.stage_runners import STAGE_OUTPUTS

# ---------------------------------------------------------------------------------------------
# Checkpoints


def _model(seed: int) -> DecoderLM:
    model = DecoderLM(ModelConfig.preset("tiny", 40))
    init_weights(model, seed=seed)
    return model


def _optimizer_state(model: DecoderLM) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer.state_dict()


def _two_checkpoints(stage_dir: Path) -> None:
    """checkpoint.old at step 2, checkpoint at step 4 (of 8)."""
    for step, seed in ((2, 1), (4, 2)):
        model = _model(seed)
        save_checkpoint(stage_dir, model, _optimizer_state(model), next_step=step, total_steps=8)


def _state(directory: Path) -> dict:
    return json.loads((directory / "state.json").read_text())


def _write_state(directory: Path, state: dict, *, reseal: bool) -> None:
    """``state.json`` as given, or (``reseal``) with a checksum made to match: a forged record."""
    if reseal:
        state = seal({k: v for k, v in state.items() if k != "checksum"})
    (directory / "state.json").write_text(json.dumps(state))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _edit_next_step(d: Path) -> str:
    _write_state(d, {**_state(d), "next_step": 6}, reseal=False)
    return "state.json was edited or damaged"


def _drop_weights_entry(d: Path) -> str:
    # The record forged consistently (checksum recomputed) without the weights, then the weights
    # damaged: the code, not the record, says the weights must be verified.
    state = _state(d)
    del state["files"]["model/model.safetensors"]
    _write_state(d, state, reseal=True)
    _flip_last_byte(d / "model" / "model.safetensors")
    return "does not record the required file"


def _unrecorded_file(d: Path) -> str:
    (d / "model" / "model-00002-of-00002.safetensors").write_bytes(b"extra")
    return "is not among the files"


def _bad_rng(d: Path) -> str:
    _write_state(d, {**_state(d), "torch_rng": "AAAA"}, reseal=True)
    return "torch_rng is not a torch RNG state"


DAMAGE = {
    "edited next_step": _edit_next_step,
    "dropped entry": _drop_weights_entry,
    "flipped weights": lambda d: (
        _flip_last_byte(d / "model" / "model.safetensors") or "model.safetensors is damaged"
    ),
    "missing optimizer": lambda d: (d / "optimizer.pt").unlink() or "optimizer.pt is missing",
    "torn state": lambda d: _write_text(d / "state.json", '{"next_step": ') or "not valid JSON",
    "no state": lambda d: (d / "state.json").unlink() or "state.json is missing",
    "unrecorded file": _unrecorded_file,
    "bad rng": _bad_rng,
    "no checksum": lambda d: (
        _write_state(d, {k: v for k, v in _state(d).items() if k != "checksum"}, reseal=False)
        or "has no 'checksum'"
    ),
}


def test_a_checkpoint_round_trips_and_keeps_the_previous_one(tmp_path):
    _two_checkpoints(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.next_step == 4 and checkpoint.total_steps == 8
    assert checkpoint.passed_over == () and checkpoint.directory == tmp_path / "checkpoint"
    assert _state(tmp_path / "checkpoint.old")["next_step"] == 2
    assert load_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _two_checkpoints(tmp_path)
    message = DAMAGE[damage](tmp_path / "checkpoint")
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.next_step == 2
    assert checkpoint.directory == tmp_path / "checkpoint.old"
    assert len(checkpoint.passed_over) == 1 and message in checkpoint.passed_over[0]
    assert str(tmp_path / "checkpoint") in checkpoint.passed_over[0]
    # Set aside, the damaged one cannot push the good one out of checkpoint.old.
    set_aside_damaged(tmp_path, checkpoint)
    assert (tmp_path / "checkpoint.damaged").is_dir() and not (tmp_path / "checkpoint").exists()
    model = _model(3)
    save_checkpoint(tmp_path, model, _optimizer_state(model), next_step=6, total_steps=8)
    assert _state(tmp_path / "checkpoint")["next_step"] == 6
    assert load_checkpoint(tmp_path).next_step == 6
    assert _state(tmp_path / "checkpoint.old")["next_step"] == 2


def test_with_no_good_checkpoint_the_error_names_each_file(tmp_path):
    _two_checkpoints(tmp_path)
    _flip_last_byte(tmp_path / "checkpoint" / "model" / "model.safetensors")
    (tmp_path / "checkpoint.old" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "checkpoint" / "model" / "model.safetensors") in message
    assert str(tmp_path / "checkpoint.old" / "optimizer.pt") in message
    assert "to train the stage from its start" in message


def test_the_restored_rng_state_is_the_saved_one(tmp_path):
    model = _model(1)
    optimizer_state = _optimizer_state(model)
    torch.manual_seed(11)
    save_checkpoint(tmp_path, model, optimizer_state, next_step=1, total_steps=2)
    expected = torch.rand(4)
    torch.rand(100)
    load_checkpoint(tmp_path)
    assert torch.equal(torch.rand(4), expected)


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    _two_checkpoints(tmp_path)
    model = _model(3)
    with torch.no_grad():
        model.output_weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not writing a checkpoint whose weight"):
        save_checkpoint(tmp_path, model, {}, next_step=6, total_steps=8)
    assert load_checkpoint(tmp_path).next_step == 4


# ---------------------------------------------------------------------------------------------
# Finished stages, the run's records and the KD stage's cache, through --resume

RUN = """
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
[teachers.t]
preset = "tiny"
seed = 9
[eval]
max_examples = 4
max_new_tokens = 8
[[stages]]
name = "sft_a"
kind = "sft"
data = "train_reasoning"
train = { steps = 3, batch_tokens = 400, optim = { lr = 3e-3, warmup_steps = 1 } }
[[stages]]
name = "sft_b"
kind = "sft"
data = "train_fast"
train = { steps = 2, batch_tokens = 300, optim = { lr = 2e-3, warmup_steps = 1 } }
[[stages]]
name = "score"
kind = "score"
data = "train_fast"
teacher = "t"
k = 4
max_examples = 16
[[stages]]
name = "kd"
kind = "kd"
cache = "score"
train = { steps = 2, batch_tokens = 300, optim = { lr = 2e-3, warmup_steps = 1 } }
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("finished")
    config = base / "run.toml"
    config.write_text(RUN)
    run = base / "run"
    assert main([str(config), "--run-dir", str(run)]) == 0
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _resume(run: Path, capsys) -> tuple[int, str, str]:
    code = main(["--resume", str(run)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_intact_finished_run_resumes_by_skipping_every_stage(run, capsys):
    code, out, err = _resume(run, capsys)
    assert code == 0, err
    for stage in ("sft_a", "sft_b", "score", "kd"):
        assert f"{stage}: done (skipped)" in out


def test_a_bit_flipped_model_of_a_finished_stage_is_refused(run, capsys):
    weights = run / "stages" / "0-sft_a" / "model" / "model.safetensors"
    _flip_last_byte(weights)
    code, _, err = _resume(run, capsys)
    assert code == 2
    assert "stage 'sft_a' is marked finished" in err and f"{weights} is damaged" in err
    assert f"Delete {run / 'stages' / '0-sft_a'} to run it again" in err


def test_a_deleted_model_never_re_parents_the_later_stages(run, capsys):
    shutil.rmtree(run / "stages" / "1-sft_b" / "model")
    code, out, err = _resume(run, capsys)
    assert code == 2
    assert "stage 'sft_b' is marked finished" in err and "model/config.json is missing" in err
    assert "from sft_a" not in out  # the KD stage is not trained from the stage before sft_b


def test_an_edited_or_torn_done_json_is_refused_by_name(run, capsys):
    done = run / "stages" / "2-score" / "done.json"
    record = json.loads(done.read_text())
    record["reference_agreement"] = {}
    done.write_text(json.dumps(record))
    code, _, err = _resume(run, capsys)
    assert code == 2 and f"{done} was edited or damaged" in err
    done.write_text("{")
    code, _, err = _resume(run, capsys)
    assert code == 2 and f"{done} is not valid JSON" in err


def test_a_forged_record_cannot_leave_the_weights_out(run, capsys):
    stage_dir = run / "stages" / "0-sft_a"
    record = read_record(stage_dir / "done.json")
    del record["files"]["model/model.safetensors"]
    (stage_dir / "done.json").write_text(json.dumps(seal(record)))
    code, _, err = _resume(run, capsys)
    assert code == 2 and "does not record the required file" in err


def test_a_stage_made_from_a_replaced_parent_is_refused(run, capsys):
    """sft_a's model swapped for another, with a record that matches it: sft_a passes its own
    check, but sft_b was trained from the sft_a that was there before."""
    first, second = run / "stages" / "0-sft_a", run / "stages" / "1-sft_b"
    record = {k: v for k, v in read_record(first / "done.json").items() if k != "files"}
    shutil.rmtree(first / "model")
    shutil.copytree(second / "model", first / "model")
    write_finished_record(first, STAGE_OUTPUTS["sft"], record)
    code, _, err = _resume(run, capsys)
    assert code == 2
    assert "stage 'sft_b'" in err and "was made from ['sft_a']" in err


def test_edited_run_records_are_refused_by_name(run, capsys):
    init = run / "stages" / "init.json"
    original = init.read_text()
    init.write_text(original.replace('"stage": "init"', '"stage": "init2"'))
    code, _, err = _resume(run, capsys)
    assert code == 2 and f"{init} was edited or damaged" in err
    init.write_text(original)
    config = run / "config.json"
    resolved = json.loads(config.read_text())
    resolved["stages"][3]["train"]["steps"] = 5
    config.write_text(json.dumps(resolved))
    code, _, err = _resume(run, capsys)
    assert code == 2 and f"{config} was edited since the run started" in err


def test_the_kd_stage_verifies_its_cache_before_its_first_step(run, capsys):
    kd_dir = run / "stages" / "3-kd"
    shutil.rmtree(kd_dir)  # killed in the KD stage
    shard = next((run / "stages" / "2-score" / "cache").glob("*.safetensors"))
    _flip_last_byte(shard)
    kd_steps = len(_kd_train_records(run))
    code, _, err = _resume(run, capsys)
    assert code == 2
    assert "kd: the logit cache" in err and "fails verification" in err and shard.name in err
    assert not (kd_dir / "checkpoint").exists() and len(_kd_train_records(run)) == kd_steps


def _kd_train_records(run: Path) -> list[dict]:
    records = read_metrics(run / "metrics.jsonl")
    return [r for r in records if r["kind"] == "train" and r["stage"] == "kd"]
