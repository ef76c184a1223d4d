"""The distillation options of the fused sparse-KD loss, as one value a trainer can keep.

A trainer holds a ``SparseKDOptions`` per KD stage and hands it to ``fused_linear_sparse_kd``
with ``**options.as_kwargs()``; the op's own keyword arguments stay the primary API (as in
Liger-Kernel and TRL). The options are checked when the object is made, with the op's messages,
so a bad config fails before any training runs. What each field means is defined in
``docs/kd-losses.md``. ``check_option_types`` is the op's check of its options' types.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .input_checks import check_real
from .sparse_kd_targets import DIVERGENCES, MISSING_MASS_MODES, choice_code

__all__ = ["SparseKDOptions", "check_option_types"]

_API = "fused_linear_sparse_kd"


@dataclass(frozen=True)
class SparseKDOptions:
    """How the student's loss uses a teacher target (the tensor-free options of the loss).

    Attributes:
        kd_weight: weight of the distillation term in [0, 1]; 0 is plain cross-entropy.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD mixture weight in [0, 1].
        temperature: distillation temperature T > 0.
        missing_mass: ``"tail"`` (T must equal the cache temperature) or ``"renorm"``.
        include_label: add the label to the top-K support (None: the target kind's default).
        z_loss: coefficient of the ``lse^2`` auxiliary loss, >= 0.
    """

    kd_weight: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    missing_mass: str = "tail"
    include_label: bool | None = None
    z_loss: float = 0.0

    def __post_init__(self) -> None:
        choice_code("divergence", self.divergence, DIVERGENCES)
        choice_code("missing_mass", self.missing_mass, MISSING_MASS_MODES)
        for name in ("kd_weight", "beta"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.z_loss >= 0 and math.isfinite(self.z_loss)):
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``fused_linear_sparse_kd``."""
        return asdict(self)


def check_option_types(
    *,
    kd_weight: object,
    beta: object,
    temperature: object,
    z_loss: object,
    softcap: object,
    num_items: object,
    include_label: object,
) -> None:
    """``TypeError`` for an option of ``fused_linear_sparse_kd`` of the wrong type, before any
    value is compared.

    Without it a string option (``temperature="2.0"``) reached the kernel through ``float()``
    and ran, a bool counted as 0 or 1, ``include_label="no"`` meant True, and a ``num_items``
    tensor of several elements failed with a RuntimeError of ``Tensor.item``.
    """
    for name, value in (
        ("kd_weight", kd_weight),
        ("beta", beta),
        ("temperature", temperature),
        ("z_loss", z_loss),
    ):
        check_real(_API, name, value)
    if softcap is not None:
        check_real(_API, "softcap", softcap)
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(
                f"{_API}: num_items must be a number or a one-element tensor, "
                f"got shape {tuple(num_items.shape)}"
            )
    elif num_items is not None:
        check_real(_API, "num_items", num_items)
    if include_label is not None and not isinstance(include_label, bool):
        raise TypeError(
            f"{_API}: include_label must be a bool or None, got {type(include_label).__name__}"
        )
