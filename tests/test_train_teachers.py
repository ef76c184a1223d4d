"""Teachers trained by the run: the examples reach the training loop in the order the teacher's
``schedule`` asks for, so a shuffled teacher sees plain and answer-hinted examples mixed in
every batch rather than in blocks."""

from __future__ import annotations

import copy
import json

import pytest

from pangu_fastkd.data import pack_examples, tokenize_example
from pangu_fastkd.distributed import DistributedContext
from pangu_fastkd.train import ConfigError, teachers
from pangu_fastkd.train.config import config_from_dict
from pangu_fastkd.train.pipeline import Pipeline

CONFIG = {
    "run_dir": "unused",
    "data": {"source": "demo", "train_problems": 120, "eval_problems": 4, "max_difficulty": 2},
    "student": {"preset": "tiny", "seed": 1},
    "teachers": {
        "teacher": {
            "preset": "tiny",
            "seed": 2,
            "train_on": ["train_fast"],
            "train_with_answer_hints": True,
            "train": {"steps": 3, "batch_tokens": 512, "schedule": "shuffle"},
        }
    },
    "stages": [{"name": "s", "kind": "sft", "data": "train_fast", "train": {"steps": 1}}],
}


class _CapturedError(Exception):
    pass


def _teacher_batches(tmp_path, monkeypatch, schedule: str) -> list[list[bool]]:
    """For each batch the teacher would train on: which of its examples carry the hint."""
    raw = copy.deepcopy(CONFIG)
    raw["run_dir"] = str(tmp_path)
    raw["teachers"]["teacher"]["train"]["schedule"] = schedule
    pipeline = Pipeline(config_from_dict(raw), DistributedContext(0, 1, 0))
    pipeline._load_data()
    captured = {}

    def capture(pipeline, model, examples, train, *args, **kwargs):
        captured["examples"], captured["train"] = list(examples), train
        raise _CapturedError

    monkeypatch.setattr(teachers, "train_model", capture)
    with pytest.raises(_CapturedError):
        teachers.trained_teacher(pipeline, "teacher")
    examples, train = captured["examples"], captured["train"]
    tokenized = [tokenize_example(ex, pipeline.tokenizer, pipeline.template) for ex in examples]
    hinted = {i for i, ex in enumerate(examples) if ex.id.endswith("+hint")}
    assert len(hinted) == len(examples) // 2 == 120  # one hinted copy per plain example
    # The loop packs in the given order (order="keep"), as train_model does.
    batches = pack_examples(tokenized, train.batch_tokens, order="keep")
    id_to_index = {ex.id: i for i, ex in enumerate(examples)}
    return [[id_to_index[doc] in hinted for doc in batch.example_ids] for batch in batches]


def test_shuffled_teacher_batches_mix_plain_and_hinted(tmp_path, monkeypatch):
    batches = _teacher_batches(tmp_path, monkeypatch, "shuffle")
    assert len(batches) >= 8
    for flags in batches:
        assert any(flags) and not all(flags), flags


def test_unshuffled_teacher_trains_in_blocks(tmp_path, monkeypatch):
    # schedule = "none" keeps the input order: the plain examples first, then their hinted
    # copies; what the shuffled teacher trained on before the fix.
    batches = _teacher_batches(tmp_path, monkeypatch, "none")
    mixed = [flags for flags in batches if any(flags) and not all(flags)]
    assert len(mixed) <= 1
    assert not any(batches[0]) and all(batches[-1])


def test_answer_hint_share_hints_a_seeded_share(tmp_path):
    raw = copy.deepcopy(CONFIG)
    raw["teachers"]["teacher"]["answer_hint_share"] = 0.25
    pipeline = Pipeline(config_from_dict(raw), DistributedContext(0, 1, 0))
    pipeline._load_data()
    spec = pipeline.config.teachers["teacher"]
    examples = teachers.teacher_examples(spec, pipeline.splits)
    hinted = [ex.id for ex in examples if ex.id.endswith("+hint")]
    assert len(examples) == 120 + 30 and len(hinted) == 30
    assert hinted == [
        ex.id for ex in teachers.teacher_examples(spec, pipeline.splits) if "+hint" in ex.id
    ]
    raw["teachers"]["teacher"]["answer_hint_share"] = 0.0
    with pytest.raises(ConfigError, match=r"answer_hint_share must be in \(0, 1\]"):
        config_from_dict(raw)


TEACHER_ONLY = """
run_dir = "unused"
checkpoint_every = 2
[data]
source = "demo"
train_problems = 40
eval_problems = 4
max_difficulty = 2
[teachers.t]
preset = "tiny"
seed = 2
train_on = ["train_fast"]
[teachers.t.train]
steps = 4
batch_tokens = 300
[eval]
max_examples = 4
max_new_tokens = 8
"""


def test_a_run_without_stages_trains_its_teacher_and_resumes_it(tmp_path, capsys):
    from pangu_fastkd.train.__main__ import main

    path = tmp_path / "teacher.toml"
    path.write_text(TEACHER_ONLY)
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0
    teacher = run / "teachers" / "t"
    assert "teacher 't': training from scratch" in capsys.readouterr().out
    weights = (teacher / "model" / "model.safetensors").read_bytes()
    # Killed after its last checkpoint, before done.json: the resume continues there.
    (teacher / "done.json").unlink()
    assert main(["--resume", str(run)]) == 0
    assert "teacher t: resuming at step 4/4" in capsys.readouterr().out
    assert (teacher / "model" / "model.safetensors").read_bytes() == weights
    assert "train_fast" in json.loads((teacher / "done.json").read_text())["train_accuracy"]
    # Another spec is another teacher: it starts over.
    assert (
        main([str(path), "--run-dir", str(run), "--overwrite", "--set", "teachers.t.seed=3"]) == 0
    )
    assert "resuming" not in capsys.readouterr().out
