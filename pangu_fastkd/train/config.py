"""The pipeline configuration: a TOML file, command-line overrides, strict validation.

A pipeline names its models (one student, any number of teachers) and an ordered list of
stages. Each stage reads data by name: a split of the run's data (``train_reasoning``,
``train_fast``) or the output of an earlier stage (a ``rollout`` stage's responses, a ``score``
stage's logit cache). Every schedule of the paper is a list of such stages, e.g.
SFT(R) -> SFT(F) -> rollout(F) -> score(F) -> KD(F) (``configs/default.toml``).

Unknown keys are errors that name the key and where it is; so are references to a model, split
or stage that does not exist, stages whose inputs come later, and numbers out of their range
(each names its config path, e.g. ``stages.2.train.optim.lr``, the key ``--set`` takes).
What only the models' sizes can rule out (a score stage's ``k`` above the vocabulary) is
checked at load time for the byte tokenizer and preset models, and by ``check_model_limits``
once the pipeline has loaded the others.

Hugging Face checkpoints (``configs/hf_example.toml``): a model's ``path`` is a local directory;
``backend`` picks how it runs (``"auto"``: the embedded ``DecoderLM`` when its loader supports
the checkpoint, Llama / Qwen2 / Qwen3, else transformers through ``pangu_fastkd.hf``, which needs
the ``hf`` extra). ``[data] tokenizer = "student"`` reads the tokenizer from the student's
directory, and ``[data] chat_template = "auto"`` renders conversations with that directory's own
chat template when it has one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.tokenizer import ByteTokenizer
from ..model.config import ModelConfig
from .bounds import INT64_MAX, check_numbers, number
from .overrides import ConfigError, apply_overrides, check_depth, parse_toml, show_value
from .specs import (
    DATA_SPLITS,
    STUDENT_TOKENIZER,
    DataSpec,
    EvalSpec,
    LoggingSpec,
    ModelSpec,
    OptimSpec,
    TrainSpec,
    check_name,
)
from .stages import STAGE_KINDS, KDStage, RolloutStage, ScoreStage, SFTStage, Stage

__all__ = [
    "CONFIG_DIR",
    "STUDENT_TOKENIZER",
    "ConfigError",
    "DataSpec",
    "EvalSpec",
    "KDStage",
    "LoggingSpec",
    "ModelLimits",
    "ModelSpec",
    "OptimSpec",
    "PipelineConfig",
    "RolloutStage",
    "SFTStage",
    "ScoreStage",
    "Stage",
    "apply_overrides",
    "check_model_limits",
    "config_from_dict",
    "load_config",
    "load_saved_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# More torch threads than any CPU host has cores; torch accepts a million and then crashes.
MAX_THREADS = 1024


@dataclass
class PipelineConfig:
    """Everything one run does."""

    run_dir: str = "runs/default"
    seed: int = number(0, at_least=0)
    threads: int = number(0, at_least=0, at_most=MAX_THREADS, note="(0: torch's default)")
    deterministic: bool = True  # bitwise-reproducible CPU training (exact resume)
    autocast_bf16: bool = False
    fsdp: bool = False  # shard the student with FSDP2 instead of replicating it with DDP
    # Optimizer steps between mid-stage checkpoints.
    checkpoint_every: int = number(50, at_least=0, note="(0: only when a stage ends)")
    data: DataSpec = field(default_factory=DataSpec)
    student: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny"))
    teachers: dict[str, ModelSpec] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    stages: list[Stage] = field(default_factory=list)
    # Run the whole config once per seed and report mean and spread (train.replicates).
    seeds: list[int] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage named {name!r}")


# ---------------------------------------------------------------------------------------------
# Building dataclasses from dicts, strictly


def _key(where: str, name: str) -> str:
    """The config path of key ``name`` of the table at ``where`` ("" is the top level)."""
    return f"{where}.{name}" if where else name


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'}: expected a table, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{where or 'the config'}: unknown key(s) {unknown}; known: {sorted(known)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(known[name].type, value, _key(where, name))
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{where or 'the config'}: {err}") from None


def _convert(annotation: str, value: Any, where: str) -> Any:
    nested = {
        "OptimSpec": OptimSpec,
        "TrainSpec": TrainSpec,
        "TrainSpec | None": TrainSpec,
        "DataSpec": DataSpec,
        "EvalSpec": EvalSpec,
        "LoggingSpec": LoggingSpec,
        "ModelSpec": ModelSpec,
    }
    if value is None and annotation.endswith("| None"):
        return None
    if annotation in nested:
        return _build(nested[annotation], value, where)
    if annotation == "dict[str, ModelSpec]":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of models")
        return {k: _build(ModelSpec, v, f"{where}.{k}") for k, v in value.items()}
    if annotation == "list[Stage]":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array of [[stages]] tables")
        return [_build_stage(v, f"{where}.{i}") for i, v in enumerate(value)]
    expected = {
        "int": (int,),
        "float": (int, float),
        "str": (str,),
        "bool": (bool,),
        "str | None": (str, type(None)),
        "list[str]": (list,),
        "list[list[str]]": (list,),
        "list[int]": (list,),
        "dict[str, Any]": (dict,),
    }.get(annotation)
    if expected is not None:
        bad_bool = isinstance(value, bool) and annotation in ("int", "float")
        if bad_bool or not isinstance(value, expected):
            raise ConfigError(f"{where}: expected {annotation}, got {show_value(value)}")
        if annotation == "float":
            try:
                return float(value)
            except OverflowError:  # an int beyond the largest float
                raise ConfigError(
                    f"{where} must be a finite number, got {show_value(value)}"
                ) from None
    return value


def _build_stage(data: Any, where: str) -> Stage:
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}: a stage needs a 'kind' ({sorted(STAGE_KINDS)})")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in STAGE_KINDS:
        raise ConfigError(f"{where}.kind: {show_value(kind)} is not one of {sorted(STAGE_KINDS)}")
    return _build(STAGE_KINDS[kind], data, where)


# ---------------------------------------------------------------------------------------------
# Validation: each table checks itself; here only what relates several of them.


def validate(config: PipelineConfig) -> None:
    """Checks every table, and the references between stages, models and data, before anything
    runs."""
    if not config.stages and not any(spec.train_on for spec in config.teachers.values()):
        # A run without stages only trains its teachers (configs/teacher.toml).
        raise ConfigError("the pipeline has no [[stages]] and no teacher to train")
    if not config.run_dir:
        # Path("") is the working directory, which --overwrite would empty.
        raise ConfigError("run_dir must not be empty")
    check_numbers(config, "")
    config.logging.validate()
    config.student.validate("student")
    if config.student.train_on:
        raise ConfigError(
            "student.train_on: the student trains in the [[stages]]; train_on is for teachers"
        )
    for name, spec in config.teachers.items():
        check_name("teachers", name)
        spec.validate(f"teachers.{name}")
    trained = [("student", config.student)] + [
        (f"teachers.{name}", spec) for name, spec in config.teachers.items() if spec.train_on
    ]
    for where, spec in trained:
        if config.fsdp and spec.backend == "transformers":
            raise ConfigError(
                f"fsdp = true: {where}.backend = 'transformers' trains with DDP only; set "
                "fsdp = false"
            )
    config.data.validate(student_has_path=config.student.path is not None)
    for i, seed in enumerate(config.seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= INT64_MAX:
            raise ConfigError(f"seeds must be ints in [0, 2**63): seeds.{i} is {show_value(seed)}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds must be distinct, got {show_value(config.seeds)}")
    earlier: dict[str, Stage] = {}
    for i, stage in enumerate(config.stages):
        where = f"stages.{i}"
        check_name(f"{where}.name", stage.name)
        if stage.name == "init":
            raise ConfigError(f"{where}.name: 'init' is the initial student (start_from = 'init')")
        if stage.name in earlier:
            raise ConfigError(f"{where}.name: {stage.name!r} is used twice")
        try:
            stage.validate(where, earlier, config.teachers)
        except ConfigError as err:
            raise ConfigError(f"{err} (stage {stage.name!r})") from None
        earlier[stage.name] = stage
    _check_split_files(config)
    evaluated = {"init"} | {f"teacher {name}" for name in config.teachers}
    evaluated |= {stage.name for stage in config.stages if stage.kind in ("sft", "kd")}
    config.eval.validate(evaluated)
    if config.data.tokenizer == "byte":
        # The vocabulary is known without loading anything, and so are the preset models.
        check_model_limits(config, ByteTokenizer().vocab_size)


def _check_split_files(config: PipelineConfig) -> None:
    """With ``source = 'files'``, every split a stage or teacher reads has its file: an empty
    split would stop the run at that stage, after the stages before it trained."""
    if config.data.source != "files":
        return
    readers = [(f"teachers.{name}.train_on", s) for name, t in config.teachers.items()
               for s in t.train_on]  # fmt: skip
    readers += [(f"stages.{i}.data", getattr(stage, "data", None))
                for i, stage in enumerate(config.stages)]  # fmt: skip
    for where, split in readers:
        if split in DATA_SPLITS and not getattr(config.data, split):
            raise ConfigError(f"{where} reads {split!r}, but data.{split} names no file")


@dataclass(frozen=True)
class ModelLimits:
    """The sizes of a model that bound config values: its vocabulary (a score stage's ``k``)
    and its longest sequence (generation's ``max_new_tokens``)."""

    vocab_size: int
    max_positions: int

    @classmethod
    def of_preset(cls, preset: str, vocab_size: int) -> ModelLimits:
        """The limits of an embedded preset model for a vocabulary of ``vocab_size``."""
        return cls(vocab_size, ModelConfig.preset(preset, vocab_size).max_position_embeddings)

    @classmethod
    def of(cls, model: Any) -> ModelLimits:
        """The limits of a loaded model (any ``CausalLM``: ``model.config`` has both sizes)."""
        return cls(model.config.vocab_size, model.config.max_position_embeddings)


def check_model_limits(
    config: PipelineConfig,
    vocab_size: int,
    loaded: Mapping[str, ModelLimits] | None = None,
) -> None:
    """Raises ``ConfigError`` for values only the models' sizes rule out, before a stage runs:
    a score stage's ``k`` above its teacher's vocabulary, and ``max_new_tokens`` (of a rollout
    stage, or of evaluation) that leaves no room for a prompt in a model's positions.

    Args:
        config: a config that passed ``validate``.
        vocab_size: the tokenizer's; a preset model has exactly this vocabulary.
        loaded: the limits of ``path`` models, keyed by config path (``"student"``,
            ``"teachers.<name>"``); a ``path`` model missing here is not checked.
    """
    loaded = loaded or {}

    def limits(where: str, spec: ModelSpec) -> ModelLimits | None:
        if spec.preset is None:
            return loaded.get(where)
        return ModelLimits.of_preset(spec.preset, vocab_size)

    student = limits("student", config.student)
    teachers = {name: limits(f"teachers.{name}", t) for name, t in config.teachers.items()}
    for i, stage in enumerate(config.stages):
        where = f"stages.{i}"
        if isinstance(stage, ScoreStage):
            teacher = teachers.get(stage.teacher)
            if teacher is not None and stage.k > teacher.vocab_size:
                raise ConfigError(
                    f"{where}.k = {stage.k} is larger than the vocabulary of teacher "
                    f"{stage.teacher!r} ({teacher.vocab_size}) (stage {stage.name!r})"
                )
        if isinstance(stage, RolloutStage) and student is not None:
            _check_generation(f"{where}.max_new_tokens", stage.max_new_tokens, "student", student)
    for where, model in [("student", student)] + [
        (f"teachers.{n}", t) for n, t in teachers.items()
    ]:
        if model is not None:
            _check_generation("eval.max_new_tokens", config.eval.max_new_tokens, where, model)


def _check_generation(where: str, max_new_tokens: int, model_name: str, model: ModelLimits) -> None:
    # Every prompt has at least one token (generation refuses longer, but only when it runs).
    if max_new_tokens >= model.max_positions:
        raise ConfigError(
            f"{where} = {max_new_tokens} leaves no room for a prompt in the "
            f"{model.max_positions} positions of {model_name}"
        )


def config_from_dict(raw: dict, where: str = "config") -> PipelineConfig:
    """A validated config from its dict form (as saved in a run directory's config.json).

    Raises:
        ConfigError: ``"<where>: <config path>: <what is wrong>"``.
    """
    try:
        check_depth(raw, "the config")
        config = _build(PipelineConfig, raw, "")
        validate(config)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return config


def load_saved_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The validated config a run directory was started with (its ``config.json``), for a
    resume, with ``key.path=value`` overrides (``run_dir``: the directory may have moved).

    Raises:
        ConfigError: naming ``path``: not UTF-8, not JSON (or nested deeper than the parser
            goes, or a number with more digits than Python converts), not an object, or not a
            valid config.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: not UTF-8 ({err.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON: arrays or objects nest too deeply") from None
    except ValueError as err:  # JSONDecodeError, or Python's limit on integer digits
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides or []), str(path))


def load_config(
    source: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Reads a pipeline config.

    Args:
        source: a TOML file, or the name of a shipped config (``default``, ``ablation``,
            ``tiny``, ``hf_example``: local HF checkpoints, paths to fill in); None is
            ``default``.
        overrides: ``key.path=value`` strings applied before validation.
    """
    path = Path(source) if source is not None else CONFIG_DIR / "default.toml"
    if not path.exists() and (CONFIG_DIR / f"{source}.toml").exists():
        path = CONFIG_DIR / f"{source}.toml"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"no config file {str(source)!r} (shipped configs: {shipped})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({err.reason})") from None
    raw = parse_toml(text, str(path))
    return config_from_dict(apply_overrides(raw, overrides or []), path.name)
