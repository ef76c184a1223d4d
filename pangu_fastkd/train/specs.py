"""The model, data, training and evaluation tables of a pipeline config, each checking itself.

Every ``validate`` raises ``ConfigError`` naming the key path it was given (``where``), so a bad
value is reported before any stage runs; checks that relate several tables (stage references,
FSDP with a transformers student) are in ``config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.curriculum import SCHEDULES
from .overrides import ConfigError

__all__ = [
    "BACKENDS",
    "CHAT_TEMPLATES",
    "DATA_SPLITS",
    "STUDENT_TOKENIZER",
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "OptimSpec",
    "TrainSpec",
]

DATA_SPLITS = ("train_reasoning", "train_fast")
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
    # Optimizer steps in a row with a non-finite loss or gradient norm (each skipped, not
    # applied) before the stage stops with an error.
    max_bad_steps: int = 8

    def validate(self, where: str) -> None:
        """Raises ``ConfigError`` for a value no stage can train with."""
        if self.steps < 0 or self.epochs <= 0:
            raise ConfigError(f"{where}: steps must be >= 0 and epochs > 0")
        if self.batch_tokens < 8 or self.grad_accum < 1:
            raise ConfigError(f"{where}: batch_tokens must be >= 8 and grad_accum >= 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.difficulty not in ("given", "length"):
            raise ConfigError(f"{where}.difficulty must be 'given' or 'length'")
        if not self.optim.lr > 0 or self.optim.warmup_steps < 0:
            raise ConfigError(f"{where}.optim: lr must be > 0 and warmup_steps >= 0")
        if (
            isinstance(self.max_bad_steps, bool)
            or not isinstance(self.max_bad_steps, int)
            or self.max_bad_steps < 1
        ):
            raise ConfigError(
                f"{where}.max_bad_steps must be an integer >= 1, got {self.max_bad_steps!r}"
            )


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
    # The share of answered examples that get a hinted copy (1.0: all). A teacher trained on
    # hints for every example learns to copy them; with a share it must still solve the rest.
    answer_hint_share: float = 1.0

    def __post_init__(self) -> None:
        # A teacher trained here with no [train] table trains with the defaults.
        if self.train_on and self.train is None:
            self.train = TrainSpec()

    def validate(self, name: str) -> None:
        """Raises ``ConfigError`` naming the model ``name`` for an inconsistent spec."""
        if (self.preset is None) == (self.path is None):
            raise ConfigError(f"model {name!r}: give exactly one of 'preset' and 'path'")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"model {name!r}: dtype must be 'fp32' or 'bf16'")
        if self.backend not in BACKENDS:
            raise ConfigError(f"model {name!r}.backend: {self.backend!r} is not one of {BACKENDS}")
        if self.preset is not None and self.backend != "auto":
            raise ConfigError(
                f"model {name!r}.backend: presets are always embedded models; 'backend' applies "
                "to 'path' models only"
            )
        for split in self.train_on:
            if split not in DATA_SPLITS:
                raise ConfigError(f"model {name!r}: train_on {split!r} is not in {DATA_SPLITS}")
        if self.train is not None:
            self.train.validate(f"model {name!r}.train")
        if not 0.0 < self.answer_hint_share <= 1.0:
            raise ConfigError(
                f"model {name!r}.answer_hint_share must be in (0, 1], got "
                f"{self.answer_hint_share!r}"
            )


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
    min_difficulty: int = 1
    max_operand: int = 99  # the largest number in a generated question (2..99)
    seed: int = 0
    # files
    train_reasoning: str | None = None
    train_fast: str | None = None
    eval_reasoning: str | None = None
    eval_fast: str | None = None

    def validate(self, student_has_path: bool) -> None:
        """Raises ``ConfigError`` for a data table the run cannot read."""
        if self.tokenizer == STUDENT_TOKENIZER and not student_has_path:
            raise ConfigError(
                f"data.tokenizer = {STUDENT_TOKENIZER!r} needs a student with a 'path' (a "
                "checkpoint directory holding the tokenizer)"
            )
        if self.chat_template not in CHAT_TEMPLATES:
            raise ConfigError(
                f"data.chat_template: {self.chat_template!r} is not one of {CHAT_TEMPLATES}"
            )
        if self.chat_template_kwargs and self.chat_template != "auto":
            raise ConfigError(
                "data.chat_template_kwargs: only a directory's own template (chat_template = "
                "'auto') takes template variables"
            )
        if self.source not in ("demo", "files"):
            raise ConfigError("data.source must be 'demo' or 'files'")
        if self.source == "files" and not (self.train_fast or self.train_reasoning):
            raise ConfigError("data.source = 'files' needs data.train_fast or data.train_reasoning")


@dataclass
class EvalSpec:
    """End-of-stage evaluation: loss on held-out examples and exact-match accuracy of greedy
    answers on up to ``max_examples`` of them."""

    max_examples: int = 100
    max_new_tokens: int = 96
    batch_size: int = 32
    batch_tokens: int = 4096
    # [stage, baseline] pairs compared problem by problem (beyond every stage against the one
    # it started from): eval row names, i.e. stage names, "init" or "teacher <name>".
    compare: list[list[str]] = field(default_factory=list)

    def validate(self, row_names: set[str]) -> None:
        """Raises ``ConfigError`` for a comparison naming a row the run never evaluates."""
        for i, pair in enumerate(self.compare):
            where = f"eval.compare[{i}]"
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(name, str) for name in pair)
            ):
                raise ConfigError(f"{where}: expected [stage, baseline], got {pair!r}")
            for name in pair:
                if name not in row_names:
                    raise ConfigError(
                        f"{where}: {name!r} is not an evaluated stage; known: {sorted(row_names)}"
                    )
