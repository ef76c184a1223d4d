"""Custom operators: the fused sparse-KD loss (and, later, packed-sequence attention)."""

from .sparse_kd import fused_linear_cross_entropy, fused_linear_sparse_kd
from .sparse_kd_reference import sparse_kd_reference
from .sparse_kd_targets import KDStats, SampledTarget, TopKTarget

__all__ = [
    "KDStats",
    "SampledTarget",
    "TopKTarget",
    "fused_linear_cross_entropy",
    "fused_linear_sparse_kd",
    "sparse_kd_reference",
]
