"""Offline teacher scoring: the teacher reads each sequence once and the logit cache keeps what
it says about every supervised token (``python -m pangu_fastkd.scoring``)."""

from .agreement import Agreement, reference_agreement
from .run import ScoringConfig, ScoringReport, score_to_cache
from .sequences import (
    DEFAULT_CONDITION_TEMPLATE,
    TeacherSequence,
    condition_on_answer,
    teacher_sequence,
)
from .targets import RowTargets, rows_to_targets, sample_counts

__all__ = [
    "DEFAULT_CONDITION_TEMPLATE",
    "Agreement",
    "RowTargets",
    "ScoringConfig",
    "ScoringReport",
    "TeacherSequence",
    "condition_on_answer",
    "reference_agreement",
    "rows_to_targets",
    "sample_counts",
    "score_to_cache",
    "teacher_sequence",
]
