"""Custom operators: the fused sparse-KD loss and packed-sequence attention."""

from .input_checks import NonFiniteError
from .packed_attention import packed_attention
from .packed_attention_reference import packed_attention_reference
from .sparse_kd import fused_linear_cross_entropy, fused_linear_sparse_kd
from .sparse_kd_options import SparseKDOptions
from .sparse_kd_reference import sparse_kd_reference
from .sparse_kd_targets import KDStats, SampledTarget, TopKTarget

__all__ = [
    "KDStats",
    "NonFiniteError",
    "SampledTarget",
    "SparseKDOptions",
    "TopKTarget",
    "fused_linear_cross_entropy",
    "fused_linear_sparse_kd",
    "packed_attention",
    "packed_attention_reference",
    "sparse_kd_reference",
]
