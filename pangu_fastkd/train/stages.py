"""The stage tables of a pipeline config (sft, kd, rollout, score), each checking itself.

A stage's ``validate(where, earlier, teachers)`` sees the stages before it (by name) and the
configured teachers, so a reference to a split, cache, teacher or start point that does not
exist, or comes later, is a ``ConfigError`` naming the stage before anything runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ..cache.quantise import MAX_VALUE_BITS, MIN_VALUE_BITS
from ..cache.spec import DEFAULT_VALUE_BITS, ID_CODINGS, VALUE_DTYPES, codec_fields
from ..ops import SparseKDOptions
from ..ops.sparse_kd_targets import DIVERGENCES, MISSING_MASS_MODES
from .bounds import check_numbers, number
from .overrides import ConfigError
from .specs import DATA_SPLITS, TrainSpec, check_mode

__all__ = ["STAGE_KINDS", "KDStage", "RolloutStage", "SFTStage", "ScoreStage", "Stage"]


def _check_data(where: str, data: str, earlier: Mapping[str, object]) -> None:
    """``data`` names a split or an earlier rollout stage."""
    if data not in DATA_SPLITS and not isinstance(earlier.get(data), RolloutStage):
        raise ConfigError(
            f"{where}.data: {data!r} is neither a split {DATA_SPLITS} nor an earlier rollout stage"
        )


def _check_start_from(where: str, start: str, earlier: Mapping[str, object]) -> None:
    """``start`` is "", "init" or an earlier training stage."""
    if start not in ("", "init") and not isinstance(earlier.get(start), SFTStage | KDStage):
        raise ConfigError(
            f"{where}.start_from: {start!r} is not '', 'init' or an earlier training stage"
        )


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

    def validate(self, where: str, earlier: Mapping[str, Stage], teachers: Collection[str]) -> None:
        """Raises ``ConfigError`` for bad values or references to stages not in ``earlier``."""
        _check_data(where, self.data, earlier)
        self.train.validate(f"{where}.train")
        _check_start_from(where, self.start_from, earlier)


@dataclass
class KDStage:
    """Offline KD from a ``score`` stage's cache (``kd_weight`` < 1 mixes in the CE loss)."""

    name: str
    cache: str
    train: TrainSpec = field(default_factory=TrainSpec)
    kd_weight: float = number(1.0, at_least=0, at_most=1)
    divergence: str = "forward_kl"
    temperature: float = number(1.0, above=0)
    missing_mass: str = "tail"
    target: str = "topk"  # "topk" or "sampled"
    start_from: str = ""
    kind: str = "kd"

    def loss_options(self) -> SparseKDOptions:
        """The options of the stage's loss (``ValueError`` for values the loss refuses)."""
        return SparseKDOptions(
            kd_weight=self.kd_weight,
            divergence=self.divergence,
            temperature=self.temperature,
            missing_mass=self.missing_mass,
        )

    def validate(self, where: str, earlier: Mapping[str, Stage], teachers: Collection[str]) -> None:
        """Raises ``ConfigError`` for bad values, or a ``cache`` that is not an earlier score
        stage able to give the stage's target."""
        check_numbers(self, where)
        self.train.validate(f"{where}.train")
        score = earlier.get(self.cache)
        if not isinstance(score, ScoreStage):
            raise ConfigError(f"{where}.cache: {self.cache!r} is not an earlier score stage")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"{where}.divergence must be one of {DIVERGENCES}, got {self.divergence!r}"
            )
        if self.missing_mass not in MISSING_MASS_MODES:
            raise ConfigError(
                f"{where}.missing_mass must be one of {MISSING_MASS_MODES}, got "
                f"{self.missing_mass!r}"
            )
        if self.target not in ("topk", "sampled"):
            raise ConfigError(f"{where}.target must be 'topk' or 'sampled'")
        try:  # whatever else the loss refuses, in its own words
            self.loss_options()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if self.target == "sampled" and score.sampled_draws == 0:
            raise ConfigError(f"{where}: target 'sampled' needs sampled_draws in {score.name!r}")
        if self.missing_mass == "tail" and self.temperature != score.temperature:
            raise ConfigError(
                f"{where}: missing_mass 'tail' needs the KD temperature to equal the cache "
                f"temperature ({score.temperature}); use 'renorm' for another temperature"
            )
        _check_start_from(where, self.start_from, earlier)


@dataclass
class RolloutStage:
    """The student answers the prompts of a split once (on-policy data for scoring)."""

    name: str
    data: str
    mode: str | None = None
    max_new_tokens: int = number(96, at_least=1)
    temperature: float = number(0.7, at_least=0, note="(0: greedy)")
    top_p: float = number(0.95, above=0, at_most=1)
    samples_per_prompt: int = number(1, at_least=1)
    seed: int = number(0, at_least=0)
    start_from: str = ""
    # Answer only the first ``max_prompts`` prompts of the data (0: all): as many as the KD
    # stage's steps consume, not the whole generated split.
    max_prompts: int = number(0, at_least=0, note="(0: all)")
    kind: str = "rollout"

    def validate(self, where: str, earlier: Mapping[str, Stage], teachers: Collection[str]) -> None:
        """Raises ``ConfigError`` for bad values or references to stages not in ``earlier``."""
        check_numbers(self, where)
        _check_data(where, self.data, earlier)
        _check_start_from(where, self.start_from, earlier)
        check_mode(f"{where}.mode", self.mode)


@dataclass
class ScoreStage:
    """A teacher scores a split or a rollout stage's responses into a logit cache."""

    name: str
    data: str
    teacher: str
    # At most the teacher's vocabulary (config.check_model_limits, once it is known).
    k: int = number(16, at_least=1)
    temperature: float = number(1.0, above=0)
    label_conditioned: bool = True
    sampled_draws: int = number(0, at_least=0, note="(0: no sampled targets)")
    # The cache format (docs/cache-format.md): v2 bit-packs ids and quantises log-probs to
    # value_bits; v1 stores whole-byte ids and value_dtype log-probs.
    codec: str = "v2"
    value_bits: int = number(DEFAULT_VALUE_BITS, at_least=MIN_VALUE_BITS, at_most=MAX_VALUE_BITS)
    id_coding: str = "elias_fano"
    value_dtype: str = "bf16"
    mode: str | None = None
    # Score only the first ``max_examples`` examples of the data (0: all); the KD stage that
    # reads the cache trains on the same ones.
    max_examples: int = number(0, at_least=0, note="(0: all)")
    kind: str = "score"

    def validate(self, where: str, earlier: Mapping[str, Stage], teachers: Collection[str]) -> None:
        """Raises ``ConfigError`` for bad values, an unknown teacher or data not yet made."""
        check_numbers(self, where)
        _check_data(where, self.data, earlier)
        if self.teacher not in teachers:
            raise ConfigError(f"{where}.teacher: no teacher named {self.teacher!r}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(
                f"{where}.value_dtype: {self.value_dtype!r} is not one of {tuple(VALUE_DTYPES)}"
            )
        if self.id_coding not in ID_CODINGS:
            raise ConfigError(f"{where}.id_coding: {self.id_coding!r} is not one of {ID_CODINGS}")
        try:
            codec_fields(self.codec, self.value_dtype, self.value_bits, self.id_coding)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        check_mode(f"{where}.mode", self.mode)


STAGE_KINDS = {"sft": SFTStage, "kd": KDStage, "rollout": RolloutStage, "score": ScoreStage}
Stage = SFTStage | KDStage | RolloutStage | ScoreStage
