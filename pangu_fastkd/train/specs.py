"""The model, data, training and evaluation tables of a pipeline config, each checking itself.

Every ``validate`` raises ``ConfigError`` naming the config path of the bad key (``where`` is
the table's own path, e.g. ``stages.2.train``), so a bad value is reported before any stage runs.
Every numeric field declares its range with ``bounds.number``; checks that relate several tables
(stage references, FSDP with a transformers student) are in ``config.validate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..data.curriculum import SCHEDULES
from ..data.demo_curriculum import MAX_DIFFICULTY
from ..data.records import MODES
from ..model.config import PRESETS
from .bounds import check_numbers, number
from .overrides import ConfigError, show_value

__all__ = [
    "BACKENDS",
    "CHAT_TEMPLATES",
    "DATA_SPLITS",
    "STUDENT_TOKENIZER",
    "DataSpec",
    "EvalSpec",
    "LoggingSpec",
    "ModelSpec",
    "OptimSpec",
    "TrainSpec",
    "check_mode",
    "check_name",
]

DATA_SPLITS = ("train_reasoning", "train_fast")
BACKENDS = ("auto", "embedded", "transformers")
CHAT_TEMPLATES = ("auto", "default")
# [data] tokenizer = "student": the tokenizer files of the student's checkpoint directory.
STUDENT_TOKENIZER = "student"
# The demo curriculum's largest operand (data.demo_curriculum refuses more).
MAX_OPERAND = 99
# [logging] health_rows: the sample's float64 logits are [rows, V] (4096 rows of a 150k
# vocabulary: 4.6 GiB); beyond this the sample costs more than it tells.
MAX_HEALTH_ROWS = 4096


# activation_checkpointing = "every_<n>": every n-th decoder layer (layers 0, n, 2n, ...). At
# most 6 digits: no model has a million layers, and int() of the digits stays trivial.
_EVERY_N = re.compile(r"every_([1-9][0-9]{0,5})")


def _checkpointing_stride(value: bool | str) -> int | None:
    """The layer stride of an ``activation_checkpointing`` value: 0 for false, 1 for true, ``n``
    for ``"every_<n>"``; None for any other value."""
    if isinstance(value, bool):
        return int(value)
    match = _EVERY_N.fullmatch(value) if isinstance(value, str) else None
    return int(match.group(1)) if match else None


# Stage and teacher names become directory names (stages/<i>-<name>; teachers/<name>, which is
# deleted when that teacher's spec changes): one path component of plain characters, so never
# "", "." or "..", a separator, or a name only some file systems tell apart.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}")


def check_name(where: str, name: str) -> None:
    """Raises ``ConfigError`` unless ``name`` (at config path ``where``) is a safe directory
    name: letters, digits and ``_ . + -``, starting with a letter or digit, at most 100."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: {show_value(name)} is not a usable name (it names a directory: letters, "
            "digits and _ . + -, starting with a letter or digit, at most 100 characters)"
        )


def check_mode(where: str, mode: str | None) -> None:
    """Raises ``ConfigError`` unless ``mode`` (at config path ``where``) is None or a mode."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"{where}: {mode!r} is not one of {MODES} (or leave it out for all)")


@dataclass
class OptimSpec:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = number(1e-3, above=0)
    min_lr_ratio: float = number(0.1, at_least=0, at_most=1)  # > 1 would climb, < 0 ascend
    warmup_steps: int = number(10, at_least=0)
    weight_decay: float = number(0.01, at_least=0)
    # torch.optim.AdamW refuses betas outside [0, 1), but only when a stage starts training.
    beta1: float = number(0.9, at_least=0, below=1)
    beta2: float = number(0.95, at_least=0, below=1)
    clip: float = number(1.0, at_least=0, note="(0: no clipping)")  # max global grad norm

    def validate(self, where: str) -> None:
        """Raises ``ConfigError`` naming ``<where>.<field>`` for a value AdamW cannot use."""
        check_numbers(self, where)


@dataclass
class TrainSpec:
    """How a model trains in one stage (shared by SFT, KD and teacher training).

    ``steps`` optimizer steps (0: ``epochs`` passes over the stage's data). An optimizer step
    consumes ``grad_accum`` packed micro-batches of at most ``batch_tokens`` tokens on every rank;
    the loss is normalised by the global count of supervised tokens of the step.
    """

    steps: int = number(0, at_least=0, note="(0: as many as epochs take)")
    epochs: float = number(1.0, above=0)
    batch_tokens: int = number(1024, at_least=8)
    grad_accum: int = number(1, at_least=1)
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: str = "sorted"  # curriculum order inside the stage
    difficulty: str = "given"  # "given" or "length"
    mode: str | None = None  # keep only examples of this mode ("reasoning" / "fast")
    # Optimizer steps in a row with a non-finite loss or gradient norm (each skipped, not
    # applied) before the stage stops with an error.
    max_bad_steps: int = number(8, at_least=1)
    # Recompute decoder layers' activations in backward instead of keeping them: false, true
    # (every layer) or "every_<n>" (every n-th layer). Less memory, one more forward per layer.
    activation_checkpointing: bool | str = False

    def validate(self, where: str) -> None:
        """Raises ``ConfigError`` naming ``<where>.<field>`` for a value no stage can train
        with."""
        check_numbers(self, where)
        if _checkpointing_stride(self.activation_checkpointing) is None:
            raise ConfigError(f"{where}.{self._bad_checkpointing()}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.difficulty not in ("given", "length"):
            raise ConfigError(f"{where}.difficulty must be 'given' or 'length'")
        check_mode(f"{where}.mode", self.mode)
        self.optim.validate(f"{where}.optim")

    @property
    def checkpointing_every(self) -> int:
        """Every how many layers activations are recomputed (0: none), the argument of
        ``set_activation_checkpointing``; the spec must have passed ``validate``."""
        stride = _checkpointing_stride(self.activation_checkpointing)
        if stride is None:
            raise ConfigError(self._bad_checkpointing())
        return stride

    def _bad_checkpointing(self) -> str:
        return (
            "activation_checkpointing must be false, true or 'every_<n>' (n >= 1: every n-th "
            f"decoder layer), got {show_value(self.activation_checkpointing)}"
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
    seed: int = number(0, at_least=0)
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
    answer_hint_share: float = number(1.0, above=0, at_most=1)

    def __post_init__(self) -> None:
        # A teacher trained here with no [train] table trains with the defaults.
        if self.train_on and self.train is None:
            self.train = TrainSpec()

    def validate(self, where: str) -> None:
        """Raises ``ConfigError`` for an inconsistent spec, naming ``where`` (the model's config
        path: ``student`` or ``teachers.<name>``)."""
        check_numbers(self, where)
        if (self.preset is None) == (self.path is None):
            raise ConfigError(f"{where}: give exactly one of 'preset' and 'path'")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"{where}.preset: {self.preset!r} is not one of {sorted(PRESETS)}")
        if self.path is not None and not self.path:
            raise ConfigError(f"{where}.path must not be empty")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"{where}.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where}.backend: {self.backend!r} is not one of {BACKENDS}")
        if self.preset is not None and self.backend != "auto":
            raise ConfigError(
                f"{where}.backend: presets are always embedded models; 'backend' applies "
                "to 'path' models only"
            )
        for split in self.train_on:
            if split not in DATA_SPLITS:
                raise ConfigError(f"{where}.train_on: {split!r} is not in {DATA_SPLITS}")
        if len(set(self.train_on)) != len(self.train_on):
            raise ConfigError(f"{where}.train_on names a split twice: {self.train_on!r}")
        if self.train is not None:
            self.train.validate(f"{where}.train")
        if not self.train_on:
            # These only shape a teacher trained here; without train_on they would do nothing.
            for key, unused in (
                ("train", self.train is not None),
                ("train_with_answer_hints", self.train_with_answer_hints),
            ):
                if unused:
                    raise ConfigError(
                        f"{where}.{key} applies only to a teacher trained here: give train_on"
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
    train_problems: int = number(2000, at_least=1)
    eval_problems: int = number(100, at_least=1)
    max_difficulty: int = number(4, at_least=1, at_most=MAX_DIFFICULTY)
    min_difficulty: int = number(1, at_least=1, at_most=MAX_DIFFICULTY)
    # The largest number in a generated question.
    max_operand: int = number(MAX_OPERAND, at_least=2, at_most=MAX_OPERAND)
    seed: int = number(0, at_least=0)
    # files
    train_reasoning: str | None = None
    train_fast: str | None = None
    eval_reasoning: str | None = None
    eval_fast: str | None = None

    def validate(self, student_has_path: bool) -> None:
        """Raises ``ConfigError`` for a data table the run cannot read."""
        check_numbers(self, "data")
        if self.min_difficulty > self.max_difficulty:
            raise ConfigError(
                f"data.min_difficulty ({self.min_difficulty}) must be at most "
                f"data.max_difficulty ({self.max_difficulty})"
            )
        if not self.tokenizer:
            raise ConfigError("data.tokenizer must not be empty ('byte' is the byte tokenizer)")
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
        if self.source == "demo":
            # The demo generates its data; a file given with it would be ignored without a word.
            for key in ("train_reasoning", "train_fast", "eval_reasoning", "eval_fast"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"data.{key} is read only with data.source = 'files' (source is 'demo')"
                    )


@dataclass
class EvalSpec:
    """End-of-stage evaluation: loss on held-out examples and exact-match accuracy of greedy
    answers on up to ``max_examples`` of them."""

    max_examples: int = number(100, at_least=0, note="(0: no evaluation)")
    max_new_tokens: int = number(96, at_least=1)
    batch_size: int = number(32, at_least=1)
    batch_tokens: int = number(4096, at_least=1)
    # [stage, baseline] pairs compared problem by problem (beyond every stage against the one
    # it started from): eval row names, i.e. stage names, "init" or "teacher <name>".
    compare: list[list[str]] = field(default_factory=list)

    def validate(self, row_names: set[str]) -> None:
        """Raises ``ConfigError`` for a bad number or a comparison naming a row the run never
        evaluates."""
        check_numbers(self, "eval")
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


@dataclass
class LoggingSpec:
    """What the trainer logs besides ``metrics.jsonl`` and ``plot.png`` (the ``[logging]`` table).

    ``tensorboard``: also write every training step's record as TensorBoard scalars
    (``train/<key>``, under ``<run_dir>/tensorboard/<stage>``); needs the ``tensorboard``
    package (the ``tensorboard`` extra). ``health_rows``: supervised rows of each KD
    micro-batch whose student logits give the top-K agreement statistics
    (``train.kd_health``). Neither changes what is trained: a resume may change them.
    """

    tensorboard: bool = False
    health_rows: int = number(
        64, at_least=0, at_most=MAX_HEALTH_ROWS, note="(0: no top-K agreement statistics)"
    )

    def validate(self) -> None:
        """Raises ``ConfigError`` naming ``logging.<field>`` for a value the trainer cannot use."""
        check_numbers(self, "logging")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(
                f"logging.tensorboard must be a bool, got {show_value(self.tensorboard)}"
            )
