"""The manifest of a finalised teacher-logit cache: its spec, sequences, shards and checksums.

``finalize_cache`` writes ``manifest.json`` once every rank committed its shards; readers start
from it and refuse a cache without one, of another format version, or whose manifest was edited
(it carries a checksum of itself).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..durable import atomic_write_bytes
from .jsonfile import json_bytes, read_json
from .shards import check_shard_name, expected_shard_tensors
from .spec import FORMAT_VERSIONS, CacheError, CacheSpec

__all__ = ["MANIFEST_NAME", "Manifest", "ShardRecord", "read_manifest", "write_manifest"]

MANIFEST_NAME = "manifest.json"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard: which sequences it holds and what its bytes hash to."""

    name: str
    rank: int
    seq_start: int
    seq_stop: int
    num_tokens: int
    num_bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> ShardRecord:
        """Rebuild a record; CacheError naming ``source`` if malformed."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise CacheError(f"{source}: malformed shard record {str(data)[:300]}")
        ok = (
            isinstance(data["name"], str)
            and isinstance(data["sha256"], str)
            and all(
                isinstance(data[n], int) and not isinstance(data[n], bool) and data[n] >= 0
                for n in names
                if n not in ("name", "sha256")
            )
            and data["seq_start"] < data["seq_stop"]
        )
        if not ok:
            raise CacheError(f"{source}: malformed shard record {str(data)[:300]}")
        # Before any file is touched: a shard is a file the writer named, in this directory.
        check_shard_name(data["name"], data["rank"], source)
        if not _SHA256_HEX.fullmatch(data["sha256"]):
            raise CacheError(f"{source}: shard {data['name']} has a malformed sha256")
        return cls(**data)


def _canonical(value: Any) -> str:
    """JSON text that tells apart what ``==`` does not (``1``, ``1.0`` and ``true``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _manifest_checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a complete cache.

    Attributes:
        format_version: 1 or 2, the version of the spec's codec (``FORMAT_VERSIONS``).
        spec: the cache spec (vocab size, K, T_c, fingerprints, dtypes, sampled targets).
        world_size: number of ranks that wrote it.
        sequence_ids: ids of all sequences, in cache order.
        token_counts: supervised tokens of each sequence (rows in the cache).
        shards: the shards in sequence order, together covering every sequence once.
    """

    format_version: int
    spec: CacheSpec
    world_size: int
    sequence_ids: tuple[str, ...]
    token_counts: tuple[int, ...]
    shards: tuple[ShardRecord, ...]

    @property
    def id_encoding(self) -> str:
        """How ids are stored (``"int16"``, ``"uint24"`` or ``"int32"``)."""
        return self.spec.id_encoding

    @property
    def total_tokens(self) -> int:
        """Supervised tokens in the cache."""
        return sum(self.token_counts)

    @property
    def total_bytes(self) -> int:
        """Bytes of all shards on disk."""
        return sum(shard.num_bytes for shard in self.shards)

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes per supervised token (inf for a cache without supervised tokens)."""
        tokens = self.total_tokens
        return self.total_bytes / tokens if tokens else math.inf

    def dtypes(self) -> dict[str, str]:
        """Storage dtype of each shard tensor, e.g. ``{"ids": "U8[3]", "values": "BF16"}``."""
        names = {}
        for name, (dtype, tail) in expected_shard_tensors(self.spec).items():
            uint24 = self.spec.codec == "v1" and dtype == "U8" and tail[-1:] == (3,)
            names[name] = f"{dtype}[3]" if uint24 else dtype
        names["seq_offsets"] = "I64"
        return names

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``manifest.json``, with its self-checksum."""
        body = {
            "format_version": self.format_version,
            "spec": self.spec.to_json(),
            "id_encoding": self.id_encoding,
            "dtypes": self.dtypes(),
            "world_size": self.world_size,
            "num_sequences": len(self.sequence_ids),
            "total_tokens": self.total_tokens,
            "total_bytes": self.total_bytes,
            "bytes_per_token": self.bytes_per_token if self.total_tokens else None,
            "shards": [shard.to_json() for shard in self.shards],
            "sequence_ids": list(self.sequence_ids),
            "token_counts": list(self.token_counts),
        }
        return {**body, "checksum": _manifest_checksum(body)}

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> Manifest:
        """Parse and check a manifest; any inconsistency is a CacheError naming ``source``.

        Checks, in order: the format version, the self-checksum (an edited manifest fails here),
        the fields, and that shards cover every sequence exactly once with matching counts.
        """
        if not isinstance(data, dict):
            raise CacheError(f"{source}: not a cache manifest")
        version = data.get("format_version")
        if type(version) is not int or version not in FORMAT_VERSIONS.values():
            raise CacheError(
                f"{source}: cache format version {version!r} is not supported "
                f"(this code reads versions {sorted(FORMAT_VERSIONS.values())})"
            )
        body = {key: value for key, value in data.items() if key != "checksum"}
        try:
            checksum = _manifest_checksum(body)
        except ValueError:  # a number like 1e400 parses to inf, which canonical JSON cannot hold
            raise CacheError(f"{source}: a number is beyond the range of a float") from None
        if data.get("checksum") != checksum:
            raise CacheError(f"{source}: checksum mismatch, the manifest was edited or is corrupt")
        try:
            spec = CacheSpec.from_json(data["spec"], source=source)
            shards = tuple(ShardRecord.from_json(s, source=source) for s in data["shards"])
            sequence_ids = tuple(data["sequence_ids"])
            token_counts = tuple(data["token_counts"])
            world_size = data["world_size"]
        except (KeyError, TypeError) as exc:
            raise CacheError(f"{source}: malformed manifest ({exc!r})") from None
        if spec.format_version != version:
            raise CacheError(
                f"{source}: format version {version} does not match the spec's codec "
                f"{spec.codec!r} (version {spec.format_version})"
            )
        manifest = cls(version, spec, world_size, sequence_ids, token_counts, shards)
        manifest.check_consistent(source)
        if data.get("id_encoding") != spec.id_encoding:
            raise CacheError(
                f"{source}: id_encoding {data.get('id_encoding')!r} does not match vocab_size "
                f"{spec.vocab_size} (expected {spec.id_encoding!r})"
            )
        # Anyone can re-sign an edited manifest, so the fields the reader does not use (the
        # totals, dtypes) must still be what the writer records for these shards and sequences,
        # with no key added and none of another type (a format_version of true or 1.0 is not 1):
        # a manifest that verifies is one this code wrote.
        written = manifest.to_json()
        del written["checksum"]
        differing = sorted(
            key
            for key in set(body) | set(written)
            if key not in body
            or key not in written
            or _canonical(body[key]) != _canonical(written[key])
        )
        if differing:
            raise CacheError(
                f"{source}: {', '.join(map(repr, differing))[:300]} not as the writer records them "
                "for this cache's spec, shards and sequences; the manifest was edited"
            )
        return manifest

    def check_consistent(self, source: str) -> None:
        """CacheError naming ``source`` unless ids, counts and shard ranges agree."""
        ids, counts = self.sequence_ids, self.token_counts
        if not ids or not all(isinstance(s, str) for s in ids) or len(set(ids)) != len(ids):
            raise CacheError(f"{source}: sequence_ids must be distinct strings, at least one")
        if len(counts) != len(ids) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise CacheError(
                f"{source}: token_counts must hold one non-negative int per sequence "
                f"({len(ids)}), got {len(counts)} entries"
            )
        if (
            isinstance(self.world_size, bool)
            or not isinstance(self.world_size, int)
            or self.world_size < 1
        ):
            raise CacheError(f"{source}: world_size must be a positive int")
        names = [shard.name for shard in self.shards]
        if len(set(names)) != len(names):
            raise CacheError(f"{source}: a shard is listed twice")
        covered = 0
        for shard in self.shards:
            if shard.rank >= self.world_size:
                raise CacheError(
                    f"{source}: shard {shard.name} of rank {shard.rank}, the cache has "
                    f"world_size {self.world_size}"
                )
            if shard.seq_start != covered:
                raise CacheError(
                    f"{source}: shard {shard.name} starts at sequence {shard.seq_start}, "
                    f"expected {covered}: sequences are missing or covered twice"
                )
            if shard.num_tokens != sum(counts[shard.seq_start : shard.seq_stop]):
                raise CacheError(
                    f"{source}: shard {shard.name} records {shard.num_tokens} tokens, its "
                    "sequences' token_counts add up to a different number"
                )
            covered = shard.seq_stop
        if covered != len(ids):
            raise CacheError(
                f"{source}: shards cover sequences [0, {covered}), the cache has {len(ids)}"
            )


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and check ``directory/manifest.json``.

    A directory without a manifest (an unfinished or unfinalised scoring run), an unknown format
    version or an edited manifest is a CacheError naming the file.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.exists():
        progress = sorted(p.name for p in directory.glob("progress-r*.json"))
        hint = (
            f"the cache is incomplete or not finalised (progress files: {', '.join(progress)}); "
            "finish scoring and call finalize_cache"
            if progress
            else "not a teacher-logit cache"
        )
        raise CacheError(f"{path}: no manifest: {hint}")
    return Manifest.from_json(read_json(path), source=str(path))


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically."""
    atomic_write_bytes(Path(directory) / MANIFEST_NAME, json_bytes(manifest.to_json()))
