"""Offline teacher-logit cache: what a teacher said about each supervised token, on disk.

A teacher scores the data once; ``CacheWriter`` stores top-K log-probs (and optionally sampled
targets) in safetensors shards, resumably and per rank; ``finalize_cache`` writes the manifest;
``CacheReader`` hands the trainer ``TopKTarget`` / ``SampledTarget`` rows aligned with its packed
batches; ``verify_cache`` (``python -m pangu_fastkd.cache verify DIR``) checks everything.
The layout is described in ``format.py``.
"""

from .format import FORMAT_VERSION, CacheError, CacheSpec, Manifest, ShardRecord
from .reader import CacheReader
from .verify import verify_cache
from .writer import CacheWriter, SequenceScores, finalize_cache

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "Manifest",
    "SequenceScores",
    "ShardRecord",
    "finalize_cache",
    "verify_cache",
]
