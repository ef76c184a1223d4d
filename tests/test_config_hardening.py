"""Bad configs, overrides and data files fail when they are read, before any stage runs, with a
named error: every numeric field has a checked range, values too deep or too long to parse are
refused by name, and the command line prints one ``error:`` line instead of a traceback."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pangu_fastkd.data.records import RecordError, read_jsonl
from pangu_fastkd.data.tokenizer import _read_special_token_config
from pangu_fastkd.train.__main__ import main
from pangu_fastkd.train.bounds import INT64_MAX, check_numbers, range_of
from pangu_fastkd.train.config import (
    ConfigError,
    ModelLimits,
    PipelineConfig,
    check_model_limits,
    config_from_dict,
    load_config,
    load_saved_config,
)
from pangu_fastkd.train.overrides import apply_overrides
from pangu_fastkd.train.specs import (
    DataSpec,
    EvalSpec,
    LoggingSpec,
    ModelSpec,
    OptimSpec,
    TrainSpec,
)
from pangu_fastkd.train.stages import KDStage, RolloutStage, ScoreStage, SFTStage

REPO = Path(__file__).resolve().parents[1]
DEEP = "[" * 10_000 + "]" * 10_000  # deeper than any recursive parser goes
LONG_INT = "9" * 5_000  # more digits than Python's int() converts from text
# tiny.toml: 0 sft_reasoning, 1 sft_fast, 2 rollout_fast, 3 score_fast, 4 kd_fast
TABLES = (PipelineConfig, DataSpec, EvalSpec, LoggingSpec, ModelSpec, OptimSpec, TrainSpec)
STAGES = (SFTStage, KDStage, RolloutStage, ScoreStage)


def _raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


# ---------------------------------------------------------------------------------------------
# Values the fuzz pass found accepted, or refused only when their stage ran


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.0.train.optim.beta1=1.5"], "stages.0.train.optim.beta1 must be in [0, 1), got"),
        (["stages.4.kd_weight=2"], "stages.4.kd_weight must be in [0, 1], got 2.0"),
        (
            ["stages.4.missing_mass='renorm'", "stages.4.temperature=0"],
            "stages.4.temperature must be > 0, got 0.0",
        ),
        (["stages.3.k=100000"], "stages.3.k = 100000 is larger than the vocabulary of teacher"),
        (["stages.2.temperature=-1"], "stages.2.temperature must be >= 0 (0: greedy), got -1.0"),
        (["stages.2.top_p=2"], "stages.2.top_p must be in (0, 1], got 2.0"),
        (["stages.0.train.optim.lr=inf"], "stages.0.train.optim.lr must be a finite number"),
        (["stages.1.train.optim.weight_decay=nan"], "stages.1.train.optim.weight_decay must be a"),
        (["stages.0.train.optim.min_lr_ratio=-5"], "stages.0.train.optim.min_lr_ratio must be in"),
        (["stages.0.train.optim.clip=nan"], "stages.0.train.optim.clip must be a finite number"),
        (["stages.0.train.optim.clip=-1"], "stages.0.train.optim.clip must be >= 0"),
        (["checkpoint_every=-3"], "checkpoint_every must be >= 0"),
        (["eval.max_examples=-1"], "eval.max_examples must be >= 0"),
        (["stages.0.train.epochs=inf"], "stages.0.train.epochs must be a finite number, got inf"),
        (["threads=-2"], "threads must be in [0, 1024]"),
        (["teachers.teacher.train.optim.beta2=1"], "teachers.teacher.train.optim.beta2 must be in"),
        (["data.max_operand=1"], "data.max_operand must be in [2, 99], got 1"),
        # Beyond int64, torch says "expected 'int', found 'int'".
        (
            ["stages.2.max_new_tokens=9223372036854775808"],
            "stages.2.max_new_tokens must be within int64",
        ),
        ([f"seed={2**64}"], "seed must be within int64"),
        ([f"stages.0.train.optim.lr={10**400}"], "stages.0.train.optim.lr must be a finite number"),
        (["eval.max_new_tokens=5000"], "eval.max_new_tokens = 5000 leaves no room for a prompt"),
    ],
)
def test_bad_numbers_fail_when_the_config_is_loaded(overrides, message):
    with _raises(message):
        load_config("tiny", overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.1.name='../../x'"], "stages.1.name: '../../x' is not a usable name"),
        (["stages.1.name='init'"], "stages.1.name: 'init' is the initial student"),
        (["stages.3.value_dtype='int8'"], "stages.3.value_dtype: 'int8' is not one of"),
        (["stages.3.codec='v3'"], "stages.3: codec must be one of ('v1', 'v2'), got 'v3'"),
        (["stages.3.value_bits=2"], "stages.3.value_bits must be in [3, 16], got 2"),
        (["stages.3.value_bits=17"], "stages.3.value_bits must be in [3, 16], got 17"),
        (["stages.3.id_coding='zip'"], "stages.3.id_coding: 'zip' is not one of"),
        (["stages.3.value_dtype='fp32'"], "stages.3: value_dtype applies to codec v1 only"),
        (
            ["stages.3.codec='v1'", "stages.3.value_bits=8"],
            "stages.3: value_bits and id_coding apply to codec v2 only",
        ),
        (["stages.2.mode='slow'"], "stages.2.mode: 'slow' is not one of"),
        (["stages.0.train.mode='slow'"], "stages.0.train.mode: 'slow' is not one of"),
        (["teachers.teacher.preset='huge'"], "teachers.teacher.preset: 'huge' is not one of"),
        (["student.train_on=['train_fast']"], "student.train_on: the student trains in the"),
        (["data.train_fast='f.jsonl'"], "data.train_fast is read only with data.source = 'files'"),
        (["run_dir=''"], "run_dir must not be empty"),
        (["data.min_difficulty=3"], "data.min_difficulty (3) must be at most data.max_difficulty"),
    ],
)
def test_values_that_would_be_ignored_or_break_later_are_refused(overrides, message):
    with _raises(message):
        load_config("tiny", overrides)


def test_teacher_names_are_directory_names_and_tables_are_not_ignored():
    stages = [{"name": "s", "kind": "sft", "data": "train_fast"}]
    with _raises("teachers: '..' is not a usable name"):
        config_from_dict({"stages": stages, "teachers": {"..": {"preset": "tiny"}}})
    with _raises("teachers.t.train applies only to a teacher trained here: give train_on"):
        config_from_dict({"stages": stages, "teachers": {"t": {"preset": "tiny", "train": {}}}})
    files = {"source": "files", "train_fast": "f.jsonl"}
    with _raises("stages.0.data reads 'train_reasoning', but data.train_reasoning names no"):
        config_from_dict(
            {"data": files, "stages": [{"name": "s", "kind": "sft", "data": "train_reasoning"}]}
        )


def _with_field(table, name: str, value):
    """``table`` with one field set, past the dataclass (and past any __post_init__)."""
    copy = dataclasses.replace(table)
    object.__setattr__(copy, name, value)
    return copy


def _defaults(cls):
    if cls in STAGES:
        required = {"name": "x", "data": "train_fast", "cache": "c", "teacher": "t"}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in required.items() if k in names})
    return cls()


NUMERIC_FIELDS = [
    (cls, f)
    for cls in TABLES + STAGES
    for f in dataclasses.fields(cls)
    if f.type in ("int", "float")
]


def test_every_numeric_field_of_every_table_declares_its_range():
    undeclared = [f"{cls.__name__}.{f.name}" for cls, f in NUMERIC_FIELDS if range_of(f) is None]
    assert not undeclared, f"numeric fields without bounds.number(...): {undeclared}"
    assert len(NUMERIC_FIELDS) >= 35  # the walk finds them


@pytest.mark.parametrize(
    ("cls", "field"), NUMERIC_FIELDS, ids=[f"{c.__name__}.{f.name}" for c, f in NUMERIC_FIELDS]
)
def test_every_numeric_field_refuses_nan_bools_and_ints_beyond_int64(cls, field):
    table = _defaults(cls)
    check_numbers(table, "w")  # the defaults are valid
    bad = [True, math.nan, math.inf, "1"]
    if field.type == "int":
        bad += [1.0, INT64_MAX + 1, -(INT64_MAX + 2)]
    for value in bad:
        with pytest.raises(ConfigError, match=re.escape(f"w.{field.name} must be")):
            check_numbers(_with_field(table, field.name, value), "w")


def test_model_limits_check_path_models_once_the_pipeline_knows_them():
    raw = {
        "student": {"path": "/models/s"},
        "data": {"tokenizer": "student"},
        "teachers": {"t": {"path": "/models/t"}},
        "stages": [{"name": "c", "kind": "score", "data": "train_fast", "teacher": "t", "k": 64}],
    }
    config = config_from_dict(raw)  # nothing is known about path models at load time
    check_model_limits(config, 50)  # and a model that is not loaded is not checked
    check_model_limits(config, 50, {"teachers.t": ModelLimits(64, 4096)})
    with _raises("stages.0.k = 64 is larger than the vocabulary of teacher 't' (32)"):
        check_model_limits(config, 50, {"teachers.t": ModelLimits(32, 4096)})
    with _raises("eval.max_new_tokens = 96 leaves no room for a prompt in the 96 positions of"):
        check_model_limits(config, 50, {"student": ModelLimits(50, 96)})


# ---------------------------------------------------------------------------------------------
# Overrides and config files: parse errors with names, not Python's exceptions


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed.x=1", "override 'seed.x=1': seed is 0, not a table, so it has no key to set"),
        ("stages.0.name.x=1", "stages.0.name is 'sft_reasoning', not a table"),
        (f"stages.0.train={DEEP}", "the value nests too deeply"),
        (f"seed={LONG_INT}", "the number is too long"),
        ("stages.\u00b2.name='x'", "no list item '\u00b2'"),  # "²".isdigit() is True
        (f"stages.{LONG_INT}.name='x'", "no list item"),
        ("seed=1\nrun_dir='elsewhere'", "the value must be one TOML value"),
        ("stages..name='x'", "empty key"),
    ],
    ids=[
        "scalar",
        "scalar-in-list",
        "deep",
        "long-int",
        "superscript",
        "long-index",
        "two",
        "empty",
    ],
)
def test_bad_overrides_are_config_errors(override, message):
    raw = {"seed": 0, "stages": [{"name": "sft_reasoning", "train": {}}]}
    with _raises(message):
        apply_overrides(raw, [override])


def test_config_files_too_deep_or_too_long_are_named(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text(f"seeds = {DEEP}\n")
    with _raises("deep.toml: tables and arrays nest too deeply"):
        load_config(deep)
    long = tmp_path / "long.toml"
    long.write_text(f"seed = {LONG_INT}\n")
    with _raises("long.toml: a number is too long"):
        load_config(long)
    # Nesting that the parsers survive but dataclasses.asdict (the saved config) would not.
    nested: dict = {}
    for _ in range(1000):
        nested = {"x": nested}
    with _raises("tables and arrays nest more than 32 deep"):
        config_from_dict({"data": {"chat_template_kwargs": nested}, "stages": []})


def test_saved_configs_that_do_not_parse_name_their_file(tmp_path):
    saved = tmp_path / "config.json"
    for text, message in [
        ("{", "config.json: not valid JSON"),
        (DEEP, "config.json: not valid JSON: arrays or objects nest too deeply"),
        (LONG_INT, "config.json: not valid JSON"),
        ("[]", "config.json: expected a JSON object, got list"),
    ]:
        saved.write_text(text)
        with _raises(message):
            load_saved_config(saved)


# ---------------------------------------------------------------------------------------------
# Data files


def _jsonl(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "d021.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "1+1?", "response": "2"})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "response": "a", "id": 1.5}, "'id' must be a string or an integer"),
        ({"prompt": "q", "response": "a", "mode": "slow"}, "unknown mode 'slow'"),
        ({"prompt": "q", "response": "a", "difficulty": "hard"}, "non-numeric difficulty"),
        ({"prompt": "q", "response": "a", "answer": [1]}, "'answer' must be a string"),
        ({"messages": [{"role": "assistant", "content": "4"}]}, "no user message before the"),
        ({"messages": [{"role": "system", "content": "s"}]}, "no user message before the"),
    ],
)
def test_bad_records_are_named_once_with_file_and_line(tmp_path, record, message):
    path = _jsonl(tmp_path, GOOD, "", json.dumps(record))
    with pytest.raises(RecordError, match=re.escape(message)) as caught:
        read_jsonl(path, require_response=not message.startswith("no user"))
    assert str(caught.value).count("d021.jsonl:3:") == 1, str(caught.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (DEEP, "d021.jsonl:2: invalid JSON (arrays or objects nest too deeply)"),
        (f'{{"prompt": "q", "response": "a", "id": {LONG_INT}}}', "d021.jsonl:2: invalid JSON"),
        (
            f'{{"prompt": "q", "response": "a", "difficulty": 1{"0" * 400}}}',
            "d021.jsonl:2: difficulty must be finite, got an int of about 401 digits",
        ),
    ],
    ids=["deep", "long-int", "difficulty-beyond-float"],
)
def test_data_lines_too_deep_or_too_long_are_record_errors(tmp_path, line, message):
    with pytest.raises(RecordError, match=re.escape(message)):
        read_jsonl(_jsonl(tmp_path, GOOD, line))


def test_tokenizer_configs_too_deep_are_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(DEEP)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON \(nested too"):
        _read_special_token_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# The command line: one error line, exit status 2, never a traceback


def _cli_cases(tmp_path: Path) -> dict[str, list[str]]:
    """Command lines that must fail with one error line, keyed by a fragment of that line."""
    data = tmp_path / "deep.jsonl"
    data.write_text(GOOD + "\n" + DEEP + "\n")
    files = tmp_path / "files.toml"
    files.write_text(
        f'[data]\nsource = "files"\ntrain_fast = "{data}"\n'
        '[[stages]]\nname = "a"\nkind = "sft"\ndata = "train_fast"\n'
    )
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text('{"seed": ')
    run = ["--run-dir", str(tmp_path / "run")]
    return {
        "threads must be in [0, 1024]": ["tiny", "--threads", "-2", *run],
        "seed is 0, not a table": ["tiny", "--set", "seed.x=1", *run],
        "deep.jsonl:2: invalid JSON (arrays or objects nest too deeply)": [str(files), *run],
        "stages.0.train.epochs must be a finite number": [
            "tiny", "--set", "stages.0.train.epochs=inf", *run
        ],
        "the value nests too deeply": ["tiny", "--set", f"stages.0.train={DEEP}", *run],
        "the number is too long": ["tiny", "--set", f"seed={LONG_INT}", *run],
        "config.json: not valid JSON": ["--resume", str(killed)],
    }  # fmt: skip


def test_main_reports_each_bad_input_in_one_line(tmp_path, capsys):
    for message, args in _cli_cases(tmp_path).items():
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert message in err, err
    assert not (tmp_path / "run").exists()  # nothing ran


def test_the_command_line_names_bad_input_without_a_traceback(tmp_path):
    # Two of the cases as real processes (each pays for importing torch, on a shared CPU): a
    # torch error (set_num_threads(-2)) and a data reader's RecursionError, before the fixes.
    every = _cli_cases(tmp_path)
    chosen = ("threads must be in", "deep.jsonl:2")
    cases = {m: args for m, args in every.items() if m.startswith(chosen)}
    assert len(cases) == 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {
        message: subprocess.Popen(
            [sys.executable, "-m", "pangu_fastkd.train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for message, args in cases.items()
    }
    for message, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, (message, err)
        assert "Traceback" not in err and err.startswith("error: "), err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
