"""Offline teacher-logit cache: what a teacher said about each supervised token, on disk.

A teacher scores the data once; ``CacheWriter`` stores top-K log-probs (and optionally sampled
targets) in safetensors shards, resumably and per rank; ``finalize_cache`` writes the manifest;
``CacheReader`` hands the trainer ``TopKTarget`` / ``SampledTarget`` rows aligned with its packed
batches, value-checking each; ``verify_cache`` (``python -m pangu_fastkd.cache verify DIR``)
checks everything, and ``CacheReader.verify()`` runs it for the KD stage before its first step.
A hostile directory (a re-signed manifest, links, FIFOs, crafted headers) gets no further than
a ``CacheError`` naming the file: see "A cache written by someone else" in the format doc.
The spec and id encodings are in ``spec.py``, the shard layout in ``shards.py``, the manifest
in ``manifest.py``; docs/cache-format.md describes the whole directory.
"""

from .finalize import finalize_cache
from .manifest import Manifest, ShardRecord
from .reader import CacheReader
from .rows import SequenceScores
from .spec import FORMAT_VERSION, CacheError, CacheSpec
from .verify import verify_cache
from .writer import CacheWriter

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
