"""The stage tables of a pipeline config (sft, kd, rollout, score), each checking itself.

A stage's ``validate(where, earlier, teachers)`` sees the stages before it (by name) and the
configured teachers, so a reference to a split, cache, teacher or start point that does not
exist, or comes later, is a ``ConfigError`` naming the stage before anything runs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ..ops import SparseKDOptions
from ..ops.sparse_kd_targets import DIVERGENCES, MISSING_MASS_MODES
from .overrides import ConfigError
from .specs import DATA_SPLITS, TrainSpec

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
    kd_weight: float = 1.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
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
        self.train.validate(f"{where}.train")
        score = earlier.get(self.cache)
        if not isinstance(score, ScoreStage):
            raise ConfigError(f"{where}.cache: {self.cache!r} is not an earlier score stage")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"{where}.divergence must be one of {DIVERGENCES}")
        if self.missing_mass not in MISSING_MASS_MODES:
            raise ConfigError(f"{where}.missing_mass must be one of {MISSING_MASS_MODES}")
        if self.target not in ("topk", "sampled"):
            raise ConfigError(f"{where}.target must be 'topk' or 'sampled'")
        try:
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
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    samples_per_prompt: int = 1
    seed: int = 0
    start_from: str = ""
    # Answer only the first ``max_prompts`` prompts of the data (0: all): as many as the KD
    # stage's steps consume, not the whole generated split.
    max_prompts: int = 0
    kind: str = "rollout"

    def validate(self, where: str, earlier: Mapping[str, Stage], teachers: Collection[str]) -> None:
        """Raises ``ConfigError`` for bad values or references to stages not in ``earlier``."""
        _check_data(where, self.data, earlier)
        _check_start_from(where, self.start_from, earlier)
        if self.max_new_tokens < 1 or self.samples_per_prompt < 1:
            raise ConfigError(f"{where}: max_new_tokens and samples_per_prompt must be >= 1")
        if self.max_prompts < 0:
            raise ConfigError(f"{where}.max_prompts must be >= 0 (0: all), got {self.max_prompts}")


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
    # Score only the first ``max_examples`` examples of the data (0: all); the KD stage that
    # reads the cache trains on the same ones.
    max_examples: int = 0
    kind: str = "score"

    def validate(self, where: str, earlier: Mapping[str, Stage], teachers: Collection[str]) -> None:
        """Raises ``ConfigError`` for bad values, an unknown teacher or data not yet made."""
        _check_data(where, self.data, earlier)
        if self.teacher not in teachers:
            raise ConfigError(f"{where}.teacher: no teacher named {self.teacher!r}")
        if self.k < 1 or self.temperature <= 0 or self.sampled_draws < 0:
            raise ConfigError(f"{where}: k >= 1, temperature > 0 and sampled_draws >= 0")
        if self.max_examples < 0:
            raise ConfigError(
                f"{where}.max_examples must be >= 0 (0: all), got {self.max_examples}"
            )


STAGE_KINDS = {"sft": SFTStage, "kd": KDStage, "rollout": RolloutStage, "score": ScoreStage}
Stage = SFTStage | KDStage | RolloutStage | ScoreStage
