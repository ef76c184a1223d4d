"""Shipped models (``builtin:<name>``): shipping a trained teacher writes its recipe and
fingerprints; resolving checks them, so a damaged or swapped file fails by name."""

from __future__ import annotations

import json

import pytest
import torch

import pangu_fastkd.pretrained as pretrained
from pangu_fastkd.backends import load_model_spec
from pangu_fastkd.durable import sha256_file
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights
from pangu_fastkd.model.checkpoint import save_pretrained
from pangu_fastkd.pretrained import PretrainedError, resolve_model_path
from pangu_fastkd.pretrained.__main__ import main as pretrained_main


@pytest.fixture
def shelf(tmp_path, monkeypatch):
    """An empty PRETRAINED_DIR and a run directory holding a trained teacher 't'."""
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", shelf)
    monkeypatch.setattr("pangu_fastkd.pretrained.__main__.PRETRAINED_DIR", shelf)
    monkeypatch.setattr(pretrained, "_verified", set())
    run = tmp_path / "run"
    model = DecoderLM(ModelConfig.preset("tiny", 263))
    init_weights(model, seed=4)
    save_pretrained(model, run / "teachers" / "t" / "model")
    row = {"stage": "teacher t", "acc_fast": 0.9, "correct_fast": "1" * 9 + "0"}
    (run / "teachers" / "t" / "done.json").write_text(json.dumps({"eval": row, "seconds": 3.5}))
    config = {"seed": 7, "data": {"max_operand": 50}, "teachers": {"t": {"preset": "tiny"}}}
    (run / "config.json").write_text(json.dumps(config))
    return shelf, run, model


def test_ship_then_load_by_builtin_name(shelf, capsys):
    directory, run, model = shelf
    assert pretrained_main(["ship", str(run), "t", "arith-test", "--command", "python -m x"]) == 0
    recipe = pretrained.read_recipe("arith-test")
    assert recipe["command"] == "python -m x" and recipe["seed"] == 7
    assert recipe["data"] == {"max_operand": 50} and recipe["teacher_spec"] == {"preset": "tiny"}
    assert recipe["eval"] == {"stage": "teacher t", "acc_fast": 0.9, "correct_fast": "1" * 9 + "0"}
    shipped = directory / "arith-test"
    assert recipe["files"] == {
        f: sha256_file(shipped / f) for f in ("config.json", "model.safetensors")
    }
    assert pretrained.builtin_names() == ["arith-test"]
    assert resolve_model_path("builtin:arith-test") == str(shipped)
    assert resolve_model_path("/some/dir") == "/some/dir"
    loaded = load_model_spec("builtin:arith-test", "auto", torch.float32)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert pretrained_main(["list"]) == 0
    assert "builtin:arith-test  python -m x" in capsys.readouterr().out


def test_a_damaged_or_swapped_file_fails_by_name(shelf):
    directory, run, _ = shelf
    pretrained_main(["ship", str(run), "t", "arith-test", "--command", "c"])
    weights = directory / "arith-test" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match=r"model\.safetensors has sha256 .* damaged"):
        resolve_model_path("builtin:arith-test")
    weights.unlink()
    with pytest.raises(PretrainedError, match=r"model\.safetensors is missing"):
        resolve_model_path("builtin:arith-test")


@pytest.mark.parametrize(
    "path, message",
    [
        ("builtin:nothing-here", r"no such shipped model \(shipped: none\)"),
        ("builtin:../etc", "not a shipped model name"),
        ("builtin:", "not a shipped model name"),
    ],
)
def test_unknown_names_are_refused(shelf, path, message):
    with pytest.raises(PretrainedError, match=message):
        resolve_model_path(path)


def test_ship_refuses_an_unfinished_teacher(shelf, capsys):
    _, run, _ = shelf
    (run / "teachers" / "t" / "done.json").unlink()
    assert pretrained_main(["ship", str(run), "t", "x", "--command", "c"]) == 2
    assert "has not finished training teacher 't'" in capsys.readouterr().err
    assert pretrained_main(["ship", str(run), "t", "Bad/Name", "--command", "c"]) == 2


def test_the_shipped_fast_teacher_matches_its_recipe_and_the_default_job():
    """The shipped file is the one its recipe fingerprints; it was trained on the default
    job's data table (so it never saw one of its held-out questions); and on the first 100
    held-out problems it answers as its recipe recorded."""
    from pangu_fastkd.data import ByteTokenizer, default_template
    from pangu_fastkd.data.demo_curriculum import make_curriculum
    from pangu_fastkd.train import load_config
    from pangu_fastkd.train.evaluate import answer_outcomes, parse_outcomes

    config = load_config("default")
    assert config.teachers["fast"].path == "builtin:arith-fast-small"
    recipe = pretrained.read_recipe("arith-fast-small")
    teacher = load_model_spec("builtin:arith-fast-small", "auto", torch.float32)
    data = config.data
    assert {k: recipe["data"][k] for k in ("seed", "eval_problems", "max_operand")} == {
        "seed": data.seed,
        "eval_problems": data.eval_problems,
        "max_operand": data.max_operand,
    }
    assert (recipe["data"]["min_difficulty"], recipe["data"]["max_difficulty"]) == (
        data.min_difficulty,
        data.max_difficulty,
    )
    recorded = parse_outcomes(recipe["eval"]["correct_fast"])
    assert recipe["eval"]["acc_fast"] >= 0.8 and len(recorded) == data.eval_problems
    curriculum = make_curriculum(
        seed=data.seed,
        n_train=1,
        n_eval=data.eval_problems,
        max_difficulty=data.max_difficulty,
        min_difficulty=data.min_difficulty,
        max_operand=data.max_operand,
    )
    tokenizer = ByteTokenizer()
    examples = curriculum.eval_examples("fast")[:100]
    outcomes = answer_outcomes(
        teacher, tokenizer, default_template(tokenizer), examples, config.eval
    )
    # Greedy decoding is deterministic here; another CPU's rounding may flip a near-tie.
    same = sum(a == b for a, b in zip(outcomes, recorded[:100], strict=True))
    assert same >= 97, same
