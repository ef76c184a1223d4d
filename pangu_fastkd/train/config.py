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

from ..ops.sparse_kd_targets import DIVERGENCES, MISSING_MASS_MODES
from .overrides import ConfigError, apply_overrides

__all__ = [
    "CONFIG_DIR",
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
    "apply_overrides",
    "config_from_dict",
    "load_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATA_SPLITS = ("train_reasoning", "train_fast")
SCHEDULES = ("sorted", "bucketed", "shuffle", "none")
BACKENDS = ("auto", "embedded", "transformers")
CHAT_TEMPLATES = ("auto", "default")
# [data] tokenizer = "student": the tokenizer files of the student's checkpoint directory.
STUDENT_TOKENIZER = "student"


@dataclass
class OptimSpec:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class TrainSpec:
    """How a model trains in one stage (shared by SFT, KD and teacher training).

    ``steps`` optimizer steps (0: ``epochs`` passes over the stage's data). An optimizer step
    consumes ``grad_accum`` packed micro-batches of at most ``batch_tokens`` tokens on every rank;
    the loss is normalised by the global count of supervised tokens of the step.
    """

    steps: int = 0
    epochs: float = 1.0
    batch_tokens: int = 1024
    grad_accum: int = 1
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: str = "sorted"  # curriculum order inside the stage
    difficulty: str = "given"  # "given" or "length"
    mode: str | None = None  # keep only examples of this mode ("reasoning" / "fast")


@dataclass
class ModelSpec:
    """A model: an embedded preset (random init, optionally trained here first) or a local
    HF-style directory.

    ``backend`` (``path`` models only): ``"embedded"`` loads the directory into the embedded
    ``DecoderLM`` (Llama / Qwen2 / Qwen3 configs); ``"transformers"`` wraps transformers' own
    ``*ForCausalLM`` (``pangu_fastkd.hf.load_hf_causal_lm``: packed ``pangu_fastkd`` attention and
    the fused losses on its head, bias and softcap included; never its own logits); ``"auto"``
    is the embedded model when the embedded loader supports the config, else transformers.
    Students on the transformers backend train with DDP; ``fsdp = true`` is refused for them.
    """

    preset: str | None = None
    path: str | None = None
    backend: str = "auto"
    seed: int = 0
    dtype: str = "fp32"
    # Teachers from a preset are trained from scratch on these splits before the pipeline runs
    # (cached in the run directory's teachers/ folder, keyed by spec and data).
    train_on: list[str] = field(default_factory=list)
    train: TrainSpec | None = None
    # Also train on copies whose prompt carries the reference answer (the label-conditioned
    # scoring template), so that a teacher trained from scratch can read that hint the way a
    # pretrained teacher LLM reads it.
    train_with_answer_hints: bool = False


@dataclass
class DataSpec:
    """The run's data: the generated arithmetic curriculum or JSONL files."""

    source: str = "demo"  # "demo" or "files"
    # "byte", a directory holding tokenizer.json, a tokenizer.json file, or "student": the
    # student's checkpoint directory (its `path`).
    tokenizer: str = "byte"
    # "auto": the tokenizer directory's own chat template (transformers' Jinja template) when it
    # has one, else the default ChatTemplate; "default": always the default ChatTemplate.
    chat_template: str = "auto"
    # Extra variables for a directory's own template, e.g. { enable_thinking = false } (Qwen3).
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # demo
    train_problems: int = 2000
    eval_problems: int = 100
    max_difficulty: int = 4
    max_operand: int = 99  # the largest number in a generated question (2..99)
    seed: int = 0
    # files
    train_reasoning: str | None = None
    train_fast: str | None = None
    eval_reasoning: str | None = None
    eval_fast: str | None = None


@dataclass
class EvalSpec:
    """End-of-stage evaluation: loss on held-out examples and exact-match accuracy of greedy
    answers on up to ``max_examples`` of them."""

    max_examples: int = 100
    max_new_tokens: int = 96
    batch_size: int = 32
    batch_tokens: int = 4096


@dataclass
class SFTStage:
    """Supervised fine-tuning on a split or a rollout stage's responses.

    ``start_from``: "" continues from the latest trained student, "init" from the initial
    student, or the name of an earlier training stage (branches, e.g. for ablations)."""

    name: str
    data: str
    train: TrainSpec = field(default_factory=TrainSpec)
    start_from: str = ""
    kind: str = "sft"


@dataclass
class KDStage:
    """Offline KD from a ``score`` stage's cache (``kd_weight`` < 1 mixes in the CE loss)."""

    name: str
    cache: str
    train: TrainSpec = field(default_factory=TrainSpec)
    kd_weight: float = 1.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    missing_mass: str = "tail"
    target: str = "topk"  # "topk" or "sampled"
    start_from: str = ""
    kind: str = "kd"


@dataclass
class RolloutStage:
    """The student answers the prompts of a split once (on-policy data for scoring)."""

    name: str
    data: str
    mode: str | None = None
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    samples_per_prompt: int = 1
    seed: int = 0
    start_from: str = ""
    kind: str = "rollout"


@dataclass
class ScoreStage:
    """A teacher scores a split or a rollout stage's responses into a logit cache."""

    name: str
    data: str
    teacher: str
    k: int = 16
    temperature: float = 1.0
    label_conditioned: bool = True
    sampled_draws: int = 0
    value_dtype: str = "bf16"
    mode: str | None = None
    kind: str = "score"


STAGE_KINDS = {"sft": SFTStage, "kd": KDStage, "rollout": RolloutStage, "score": ScoreStage}
Stage = SFTStage | KDStage | RolloutStage | ScoreStage


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
# Validation


def _validate_train(train: TrainSpec, where: str) -> None:
    if train.steps < 0 or train.epochs <= 0:
        raise ConfigError(f"{where}: steps must be >= 0 and epochs > 0")
    if train.batch_tokens < 8 or train.grad_accum < 1:
        raise ConfigError(f"{where}: batch_tokens must be >= 8 and grad_accum >= 1")
    if train.schedule not in SCHEDULES:
        raise ConfigError(f"{where}.schedule: {train.schedule!r} is not one of {SCHEDULES}")
    if train.difficulty not in ("given", "length"):
        raise ConfigError(f"{where}.difficulty must be 'given' or 'length'")
    if not train.optim.lr > 0 or train.optim.warmup_steps < 0:
        raise ConfigError(f"{where}.optim: lr must be > 0 and warmup_steps >= 0")


def _validate_data(config: PipelineConfig) -> None:
    data = config.data
    if data.tokenizer == STUDENT_TOKENIZER and config.student.path is None:
        raise ConfigError(
            f"data.tokenizer = {STUDENT_TOKENIZER!r} needs a student with a 'path' (a checkpoint "
            "directory holding the tokenizer)"
        )
    if data.chat_template not in CHAT_TEMPLATES:
        raise ConfigError(
            f"data.chat_template: {data.chat_template!r} is not one of {CHAT_TEMPLATES}"
        )
    if data.chat_template_kwargs and data.chat_template != "auto":
        raise ConfigError(
            "data.chat_template_kwargs: only a directory's own template (chat_template = 'auto') "
            "takes template variables"
        )


def validate(config: PipelineConfig) -> None:
    """Checks references between stages, models and data before anything runs."""
    if not config.stages:
        raise ConfigError("the pipeline has no [[stages]]")
    for name, spec in [("student", config.student), *config.teachers.items()]:
        if (spec.preset is None) == (spec.path is None):
            raise ConfigError(f"model {name!r}: give exactly one of 'preset' and 'path'")
        if spec.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"model {name!r}: dtype must be 'fp32' or 'bf16'")
        if spec.backend not in BACKENDS:
            raise ConfigError(f"model {name!r}.backend: {spec.backend!r} is not one of {BACKENDS}")
        if spec.preset is not None and spec.backend != "auto":
            raise ConfigError(
                f"model {name!r}.backend: presets are always embedded models; 'backend' applies "
                "to 'path' models only"
            )
        for split in spec.train_on:
            if split not in DATA_SPLITS:
                raise ConfigError(f"model {name!r}: train_on {split!r} is not in {DATA_SPLITS}")
        if spec.train_on and spec.train is None:
            spec.train = TrainSpec()
        if spec.train is not None:
            _validate_train(spec.train, f"model {name!r}.train")
    trained = [("student", config.student)] + [
        (f"teachers.{name}", spec) for name, spec in config.teachers.items() if spec.train_on
    ]
    for where, spec in trained:
        if config.fsdp and spec.backend == "transformers":
            raise ConfigError(
                f"fsdp = true: {where}.backend = 'transformers' trains with DDP only; set "
                "fsdp = false"
            )
    _validate_data(config)
    if config.data.source not in ("demo", "files"):
        raise ConfigError("data.source must be 'demo' or 'files'")
    if config.data.source == "files" and not (
        config.data.train_fast or config.data.train_reasoning
    ):
        raise ConfigError("data.source = 'files' needs data.train_fast or data.train_reasoning")
    seen: dict[str, Stage] = {}
    for i, stage in enumerate(config.stages):
        where = f"stages[{i}] ({stage.name!r})"
        if stage.name in seen:
            raise ConfigError(f"{where}: the name is used twice")
        if isinstance(stage, SFTStage | RolloutStage | ScoreStage):
            source = seen.get(stage.data)
            if stage.data not in DATA_SPLITS and not isinstance(source, RolloutStage):
                raise ConfigError(
                    f"{where}.data: {stage.data!r} is neither a split {DATA_SPLITS} nor an "
                    "earlier rollout stage"
                )
        if isinstance(stage, SFTStage | KDStage):
            _validate_train(stage.train, f"{where}.train")
        if isinstance(stage, ScoreStage):
            if stage.teacher not in config.teachers:
                raise ConfigError(f"{where}.teacher: no teacher named {stage.teacher!r}")
            if stage.k < 1 or stage.temperature <= 0 or stage.sampled_draws < 0:
                raise ConfigError(f"{where}: k >= 1, temperature > 0 and sampled_draws >= 0")
        if isinstance(stage, KDStage):
            if not isinstance(seen.get(stage.cache), ScoreStage):
                raise ConfigError(f"{where}.cache: {stage.cache!r} is not an earlier score stage")
            if stage.divergence not in DIVERGENCES:
                raise ConfigError(f"{where}.divergence must be one of {DIVERGENCES}")
            if stage.missing_mass not in MISSING_MASS_MODES:
                raise ConfigError(f"{where}.missing_mass must be one of {MISSING_MASS_MODES}")
            if stage.target not in ("topk", "sampled"):
                raise ConfigError(f"{where}.target must be 'topk' or 'sampled'")
            score = seen[stage.cache]
            if stage.target == "sampled" and score.sampled_draws == 0:
                raise ConfigError(
                    f"{where}: target 'sampled' needs sampled_draws in {score.name!r}"
                )
            if stage.missing_mass == "tail" and stage.temperature != score.temperature:
                raise ConfigError(
                    f"{where}: missing_mass 'tail' needs the KD temperature to equal the cache "
                    f"temperature ({score.temperature}); use 'renorm' for another temperature"
                )
        start = getattr(stage, "start_from", "")
        if start not in ("", "init") and not isinstance(seen.get(start), SFTStage | KDStage):
            raise ConfigError(
                f"{where}.start_from: {start!r} is not '', 'init' or an earlier training stage"
            )
        if isinstance(stage, RolloutStage) and (
            stage.max_new_tokens < 1 or stage.samples_per_prompt < 1
        ):
            raise ConfigError(f"{where}: max_new_tokens and samples_per_prompt must be >= 1")
        seen[stage.name] = stage


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
