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
    assert recipe["eval"] == {"stage": "teacher t", "acc_fast": 0.9}  # outcomes left out
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
