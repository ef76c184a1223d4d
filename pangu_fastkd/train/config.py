"""The pipeline configuration: a TOML file, command-line overrides, strict validation.

A pipeline names its models (one student, any number of teachers) and an ordered list of
stages. Each stage reads data by name: a split of the run's data (``train_reasoning``,
``train_fast``) or the output of an earlier stage (a ``rollout`` stage's responses, a ``score``
stage's logit cache). Every schedule of the paper is a list of such stages, e.g.
SFT(R) -> SFT(F) -> rollout(F) -> score(F) -> KD(F) (``configs/default.toml``).

Unknown keys are errors that name the key and where it is; so are references to a model, split
or stage that does not exist, and stages whose inputs come later.

Hugging Face checkpoints (``configs/hf_example.toml``): a model's ``path`` is a local directory;
``backend`` picks how it runs (``"auto"``: the embedded ``DecoderLM`` when its loader supports
the checkpoint, Llama / Qwen2 / Qwen3, else transformers through ``pangu_fastkd.hf``, which needs
the ``hf`` extra). ``[data] tokenizer = "student"`` reads the tokenizer from the student's
directory, and ``[data] chat_template = "auto"`` renders conversations with that directory's own
chat template when it has one.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .overrides import ConfigError, apply_overrides
from .specs import (
    STUDENT_TOKENIZER,
    DataSpec,
    EvalSpec,
    ModelSpec,
    OptimSpec,
    TrainSpec,
)
from .stages import STAGE_KINDS, KDStage, RolloutStage, ScoreStage, SFTStage, Stage

__all__ = [
    "CONFIG_DIR",
    "STUDENT_TOKENIZER",
    "ConfigError",
    "DataSpec",
    "EvalSpec",
    "KDStage",
    "ModelSpec",
    "OptimSpec",
    "PipelineConfig",
    "RolloutStage",
    "SFTStage",
    "ScoreStage",
    "Stage",
    "apply_overrides",
    "config_from_dict",
    "load_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class PipelineConfig:
    """Everything one run does."""

    run_dir: str = "runs/default"
    seed: int = 0
    threads: int = 0  # torch threads; 0 keeps torch's default
    deterministic: bool = True  # bitwise-reproducible CPU training (exact resume)
    autocast_bf16: bool = False
    fsdp: bool = False  # shard the student with FSDP2 instead of replicating it with DDP
    checkpoint_every: int = 50  # optimizer steps between mid-stage checkpoints (0: stage ends)
    data: DataSpec = field(default_factory=DataSpec)
    student: ModelSpec = field(default_factory=lambda: ModelSpec(preset="tiny"))
    teachers: dict[str, ModelSpec] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
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


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(known[name].type, value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{where}: {err}") from None


def _convert(annotation: str, value: Any, where: str) -> Any:
    nested = {
        "OptimSpec": OptimSpec,
        "TrainSpec": TrainSpec,
        "TrainSpec | None": TrainSpec,
        "DataSpec": DataSpec,
        "EvalSpec": EvalSpec,
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
        return [_build_stage(v, f"{where}[{i}]") for i, v in enumerate(value)]
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
            raise ConfigError(f"{where}: expected {annotation}, got {value!r}")
        if annotation == "float":
            return float(value)
    return value


def _build_stage(data: Any, where: str) -> Stage:
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}: a stage needs a 'kind' ({sorted(STAGE_KINDS)})")
    kind = data["kind"]
    if kind not in STAGE_KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {sorted(STAGE_KINDS)}")
    return _build(STAGE_KINDS[kind], data, f"{where} ({kind})")


# ---------------------------------------------------------------------------------------------
# Validation: each table checks itself; here only what relates several of them.


def validate(config: PipelineConfig) -> None:
    """Checks every table, and the references between stages, models and data, before anything
    runs."""
    if not config.stages and not any(spec.train_on for spec in config.teachers.values()):
        # A run without stages only trains its teachers (configs/teacher.toml).
        raise ConfigError("the pipeline has no [[stages]] and no teacher to train")
    for name, spec in [("student", config.student), *config.teachers.items()]:
        spec.validate(name)
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
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
        raise ConfigError(f"seeds must be non-negative ints, got {config.seeds!r}")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds must be distinct, got {config.seeds!r}")
    earlier: dict[str, Stage] = {}
    for i, stage in enumerate(config.stages):
        where = f"stages[{i}] ({stage.name!r})"
        if stage.name in earlier:
            raise ConfigError(f"{where}: the name is used twice")
        stage.validate(where, earlier, config.teachers)
        earlier[stage.name] = stage
    evaluated = {"init"} | {f"teacher {name}" for name in config.teachers}
    evaluated |= {stage.name for stage in config.stages if stage.kind in ("sft", "kd")}
    config.eval.validate(evaluated)


def config_from_dict(raw: dict, where: str = "config") -> PipelineConfig:
    """A validated config from its dict form (as saved in a run directory's config.json)."""
    config = _build(PipelineConfig, raw, where)
    validate(config)
    return config


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
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return config_from_dict(apply_overrides(raw, overrides or []), path.name)
