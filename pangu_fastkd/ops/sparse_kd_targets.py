"""Sparse teacher targets and options of the fused sparse-KD loss.

The meaning of every field is defined in ``docs/kd-losses.md``; this module only holds the
containers and the option names shared by the C++ kernel and the PyTorch reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "DIVERGENCES",
    "MISSING_MASS_MODES",
    "REDUCTIONS",
    "KDStats",
    "SampledTarget",
    "TopKTarget",
    "choice_code",
]

# The integer codes are part of the C++ op schema (csrc/ops.cpp); keep the order.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MISSING_MASS_MODES = ("tail", "renorm")
REDUCTIONS = ("sum", "mean")


def choice_code(name: str, value: str, choices: tuple[str, ...]) -> int:
    """The integer code of an option string, or a ValueError listing the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return choices.index(value)


@dataclass(frozen=True)
class TopKTarget:
    """The teacher's top-K logits for each position, as stored in the logit cache.

    Attributes:
        ids: ``[N, K]`` int32 (int16/int64 accepted) token ids, ``-1`` marks an empty slot.
        logits: ``[N, K]`` raw teacher logits (any float dtype), ``-inf`` allowed.
        lse: ``[N]`` teacher log-partition ``logsumexp_u(t_u / temperature)`` over the full
            vocabulary, computed when the cache was written.
        label_logit: ``[N]`` the teacher's raw logit of the label token.
        temperature: the cache temperature ``T_c`` at which ``lse`` was computed.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    label_logit: torch.Tensor
    temperature: float = 1.0


@dataclass(frozen=True)
class SampledTarget:
    """Random-sampling KD target: ids drawn from the teacher with importance weights.

    Attributes:
        ids: ``[N, K]`` int32 token ids, ``-1`` marks an empty slot.
        weights: ``[N, K]`` non-negative weights summing to 1 per supervised row (within 1e-3).
    """

    ids: torch.Tensor
    weights: torch.Tensor


class KDStats(NamedTuple):
    """Per-token statistics, each ``[N]`` float32; zero on ignored positions.

    Attributes:
        divergence: ``D_i``, the sparse divergence (before ``kd_weight * T^2``).
        cross_entropy: ``CE_i`` at temperature 1 over the full vocabulary.
        student_mass: ``Q_S``, student probability (at T) on the support.
        teacher_mass: ``P_S``, teacher probability (at T) on the support (top-K tail mode:
            exact cache mass; renorm mode: 1; sampled: sum of weights).
        student_lse: the student's logsumexp of the (soft-capped) logits at temperature 1.
        correct: 1.0 where ``argmax z == y_i``.
    """

    divergence: torch.Tensor
    cross_entropy: torch.Tensor
    student_mass: torch.Tensor
    teacher_mass: torch.Tensor
    student_lse: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def from_matrix(cls, stats: torch.Tensor) -> KDStats:
        """Split the kernel's ``[N, 6]`` statistics matrix into named columns."""
        return cls(*stats.unbind(dim=1))
