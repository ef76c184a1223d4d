"""Custom operators: the fused sparse-KD loss and packed-sequence attention."""

from .packed_attention import packed_attention
from .packed_attention_reference import (
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    packed_attention_reference,
)
from .sparse_kd import fused_linear_cross_entropy, fused_linear_sparse_kd
from .sparse_kd_reference import sparse_kd_reference
from .sparse_kd_targets import KDStats, SampledTarget, TopKTarget

__all__ = [
    "KDStats",
    "SampledTarget",
    "TopKTarget",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "fused_linear_cross_entropy",
    "fused_linear_sparse_kd",
    "packed_attention",
    "packed_attention_reference",
    "sparse_kd_reference",
]
