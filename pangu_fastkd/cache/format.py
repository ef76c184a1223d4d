"""The on-disk format of the teacher-logit cache: spec, encodings, shard layout and manifest.

A cache directory holds::

    sequences.json                          ids of all sequences, in cache order
    progress-r{rank:03d}.json               one per rank: its committed shards (the resume point)
    shard-r{rank:03d}-{i:05d}.safetensors   a contiguous range of one rank's sequences
    manifest.json                           written by ``finalize_cache`` once all are committed

Tensors of a shard (``n`` supervised tokens, ``S`` sequences, ``K`` = ``spec.k``)::

    ids             [n, K] int16 | [n, K, 3] uint8 (little-endian 24 bit) | [n, K] int32
    values          [n, K] value dtype: teacher log-prob at T_c, v_j = t_j / T_c - Lambda
    lse             [n]    float32: Lambda = logsumexp_u(t_u / T_c) over the full vocabulary
    label_value     [n]    value dtype: the label token's log-prob at T_c, t_y / T_c - Lambda
    sampled_ids     [n, Ks] (id encoding)          only when spec.sampled_k > 0
    sampled_counts  [n, Ks] uint8 | int16 | int32  draws per id; each row sums to sampled_draws
    seq_offsets     [S + 1] int64: row offsets of the shard's sequences

Why log-probs and not raw logits: bf16 keeps 8 significant bits, so a raw logit of 20 is off by up
to 0.06 (6% in probability). A log-prob is close to 0 exactly for the tokens that carry the mass,
where bf16 is precise; the reader decodes ``t_j = T_c * (v_j + Lambda)`` in fp32, which gives the
loss back ``exp(t_j / T_c - Lambda) == exp(v_j)``. The label's logit is stored the same way (in
the value dtype, not as a raw fp32 logit) so that bf16 values with 3-byte ids cost
``2K + 3K + 4 + 2 = 5K + 6`` bytes per token, which leaves room for the shard headers and offsets
under the ``5K + 8`` budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..durable import atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SEQUENCES_NAME",
    "CacheError",
    "CacheSpec",
    "Manifest",
    "ShardFile",
    "ShardRecord",
    "decode_ids",
    "encode_ids",
    "encode_shard",
    "expected_shard_tensors",
    "id_encoding_for_vocab",
    "json_bytes",
    "open_shard",
    "progress_name",
    "read_json",
    "read_manifest",
    "sequence_ids_digest",
    "shard_name",
    "write_manifest",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SEQUENCES_NAME = "sequences.json"
# The shard's own description lives under one safetensors metadata key: safetensors keeps
# metadata in a hash map, so with several keys their order (and the file's bytes) could vary.
SHARD_METADATA_KEY = "pangu_fastkd.cache"

VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ID_ENCODINGS = ("int16", "uint24", "int32")
UINT24_EMPTY = 0xFFFFFF  # the empty slot of 3-byte ids; -1 everywhere else

# safetensors dtype name -> (numpy dtype used to view the bytes, torch dtype, item size)
_STORAGE_DTYPES: dict[str, tuple[Any, torch.dtype, int]] = {
    "BF16": (np.int16, torch.bfloat16, 2),  # numpy has no bf16: view as int16, then as bf16
    "F16": (np.float16, torch.float16, 2),
    "F32": (np.float32, torch.float32, 4),
    "U8": (np.uint8, torch.uint8, 1),
    "I16": (np.int16, torch.int16, 2),
    "I32": (np.int32, torch.int32, 4),
    "I64": (np.int64, torch.int64, 8),
}
_VALUE_STORAGE = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


class CacheError(Exception):
    """A cache is corrupt, incomplete or does not match what the caller expects.

    The message names the file (shard, manifest or progress file) and what is wrong with it.
    """


# ---------------------------------------------------------------------------------------------
# Spec


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds and what it was made from; identical for every rank and shard.

    Attributes:
        vocab_size: V, the teacher's (and student's) vocabulary size.
        k: K, top-K entries stored per supervised token.
        temperature: T_c, the cache temperature of the stored log-probs and ``Lambda``.
        teacher_fingerprint, tokenizer_fingerprint, data_fingerprint: identify the teacher
            weights, the tokenizer and the scored data; the trainer refuses a cache whose
            tokenizer differs from its own.
        label_conditioned: whether the scorer conditioned the top-K selection on the label.
        value_dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``, storage of the log-prob values.
        sampled_k: Ks, slots of sampled targets per token (0: none stored).
        sampled_draws: draws per token of the sampled targets (0 exactly when ``sampled_k`` is).
        provenance: free-form JSON (templates, teacher path, scorer version...).
    """

    vocab_size: int
    k: int
    temperature: float
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    data_fingerprint: str
    label_conditioned: bool = False
    value_dtype: str = "bf16"
    sampled_k: int = 0
    sampled_draws: int = 0
    provenance: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        _check_int("k", self.k, 1)
        if self.k > self.vocab_size:
            raise ValueError(f"k must be <= vocab_size ({self.vocab_size}), got {self.k}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        object.__setattr__(self, "temperature", float(temperature))
        _check_str("teacher_fingerprint", self.teacher_fingerprint)
        _check_str("tokenizer_fingerprint", self.tokenizer_fingerprint)
        _check_str("data_fingerprint", self.data_fingerprint)
        if not isinstance(self.label_conditioned, bool):
            raise TypeError(f"label_conditioned must be a bool, got {self.label_conditioned!r}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"value_dtype must be one of {tuple(VALUE_DTYPES)}, got {self.value_dtype!r}"
            )
        _check_int("sampled_k", self.sampled_k, 0)
        _check_int("sampled_draws", self.sampled_draws, 0)
        if (self.sampled_k == 0) != (self.sampled_draws == 0):
            raise ValueError(
                "sampled_k and sampled_draws must both be 0 (no sampled targets) or both > 0, "
                f"got sampled_k={self.sampled_k}, sampled_draws={self.sampled_draws}"
            )
        if self.sampled_k > self.vocab_size:
            raise ValueError(
                f"sampled_k must be <= vocab_size ({self.vocab_size}), got {self.sampled_k}"
            )
        if not isinstance(self.provenance, dict):
            raise TypeError(f"provenance must be a dict, got {type(self.provenance).__name__}")
        try:
            # A JSON round trip: the spec then compares equal to the one read back from disk.
            provenance = json.loads(json.dumps(self.provenance, sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"provenance must be JSON-serialisable: {exc}") from None
        object.__setattr__(self, "provenance", provenance)

    @property
    def id_encoding(self) -> str:
        """How token ids are stored: ``"int16"``, ``"uint24"`` or ``"int32"``."""
        return id_encoding_for_vocab(self.vocab_size)

    @property
    def value_torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored log-prob values."""
        return VALUE_DTYPES[self.value_dtype]

    @property
    def counts_dtype(self) -> torch.dtype:
        """The narrowest integer dtype that holds ``sampled_draws`` (uint8, int16 or int32)."""
        if self.sampled_draws <= 0xFF:
            return torch.uint8
        if self.sampled_draws <= 0x7FFF:
            return torch.int16
        return torch.int32

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (field names as keys)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> CacheSpec:
        """Rebuild a spec from ``to_json`` output; CacheError naming ``source`` if malformed."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CacheError(
                f"{source}: malformed spec, expected fields {sorted(names)}, got {got}"
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise CacheError(f"{source}: invalid spec: {exc}") from None

    def differences(self, other: CacheSpec) -> list[tuple[str, Any, Any]]:
        """``(field, self's value, other's value)`` for every field where the specs differ."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


# ---------------------------------------------------------------------------------------------
# Id encoding


def id_encoding_for_vocab(vocab_size: int) -> str:
    """The id encoding for a vocabulary of ``vocab_size`` tokens.

    ``int16`` up to 2^15 tokens, ``uint24`` (3 bytes, 0xFFFFFF = empty) up to 2^24 - 1 tokens,
    ``int32`` beyond.
    """
    if vocab_size <= 1 << 15:
        return "int16"
    if vocab_size <= UINT24_EMPTY:
        return "uint24"
    return "int32"


def encode_ids(ids: torch.Tensor, encoding: str) -> torch.Tensor:
    """Store validated ids (``[n, K]`` integer, ``-1`` = empty) in ``encoding``.

    Returns ``[n, K]`` int16 / int32, or ``[n, K, 3]`` uint8 (little-endian) for ``uint24``.
    """
    if encoding == "int16":
        return ids.to(torch.int16)
    if encoding == "int32":
        return ids.to(torch.int32)
    if encoding != "uint24":
        raise ValueError(f"id encoding must be one of {ID_ENCODINGS}, got {encoding!r}")
    wide = torch.where(ids < 0, UINT24_EMPTY, ids.to(torch.int64))
    return torch.stack([(wide >> shift) & 0xFF for shift in (0, 8, 16)], dim=-1).to(torch.uint8)


def decode_ids(stored: torch.Tensor, encoding: str) -> torch.Tensor:
    """Stored ids back to ``[n, K]`` int32 with ``-1`` for empty slots."""
    if encoding in ("int16", "int32"):
        return stored.to(torch.int32)
    if encoding != "uint24":
        raise ValueError(f"id encoding must be one of {ID_ENCODINGS}, got {encoding!r}")
    wide = stored.to(torch.int32)
    ids = wide[..., 0] | (wide[..., 1] << 8) | (wide[..., 2] << 16)
    return torch.where(ids == UINT24_EMPTY, -1, ids)


# ---------------------------------------------------------------------------------------------
# Files: names, atomic writes, checksums, JSON


def shard_name(rank: int, index: int) -> str:
    """File name of a rank's ``index``-th shard."""
    return f"shard-r{rank:03d}-{index:05d}.safetensors"


def progress_name(rank: int) -> str:
    """File name of a rank's progress file."""
    return f"progress-r{rank:03d}.json"


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON (fixed key order, no NaN) for files the cache writes."""
    return (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode()


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file is a CacheError naming it."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise CacheError(f"{path}: file not found") from None
    except OSError as exc:
        raise CacheError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None


def sequence_ids_digest(sequence_ids: Sequence[str]) -> str:
    """sha256 of the ordered sequence ids: cheap identity check between ranks and runs."""
    return hashlib.sha256(json.dumps(list(sequence_ids)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Shards


def expected_shard_tensors(spec: CacheSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-row tensors of a shard: name -> (safetensors dtype, shape after the row dimension)."""
    id_storage = {"int16": ("I16", ()), "uint24": ("U8", (3,)), "int32": ("I32", ())}
    id_dtype, id_tail = id_storage[spec.id_encoding]
    value_dtype = _VALUE_STORAGE[spec.value_dtype]
    tensors = {
        "ids": (id_dtype, (spec.k, *id_tail)),
        "values": (value_dtype, (spec.k,)),
        "lse": ("F32", ()),
        "label_value": (value_dtype, ()),
    }
    if spec.sampled_k:
        counts_dtype = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32"}
        tensors["sampled_ids"] = (id_dtype, (spec.sampled_k, *id_tail))
        tensors["sampled_counts"] = (counts_dtype[spec.counts_dtype], (spec.sampled_k,))
    return tensors


def encode_shard(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Serialise a shard. The bytes depend only on the arguments (no timestamps, fixed order)."""
    text = json.dumps(metadata, sort_keys=True)
    return safetensors.torch.save(tensors, metadata={SHARD_METADATA_KEY: text})


@dataclass
class ShardFile:
    """A shard whose header was checked, memory-mapped; rows are copied out on demand.

    Attributes:
        path: the shard file.
        metadata: the shard's own description (rank, seq_start, seq_stop, encodings).
        seq_offsets: ``[S + 1]`` int64 row offsets of its sequences.
        num_rows: supervised tokens in the shard.
    """

    path: Path
    metadata: dict[str, Any]
    seq_offsets: np.ndarray
    num_rows: int
    _arrays: dict[str, tuple[np.ndarray, torch.dtype]]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` as a (copied) tensor of the stored dtype."""
        array, dtype = self._arrays[name]
        return torch.from_numpy(np.array(array[start:stop])).view(dtype)

    def close(self) -> None:
        """Drop the memory maps (they are also released when the object is collected)."""
        self._arrays.clear()


def open_shard(path: Path, spec: CacheSpec) -> ShardFile:
    """Parse a shard's safetensors header, check it against ``spec`` and memory-map it.

    Checks the header is well-formed JSON, every tensor lies inside the file with the byte size
    its dtype and shape imply, the expected tensors are there with the right dtype and shape, all
    per-row tensors agree on the row count and ``seq_offsets`` runs from 0 to it without going
    backwards. Anything else is a CacheError naming the shard.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_len < 2 or 8 + header_len > size:
                raise CacheError(f"{path.name}: not a safetensors file (bad header length)")
            header_bytes = handle.read(header_len)
    except FileNotFoundError:
        raise CacheError(f"{path.name}: shard file is missing ({path})") from None
    except OSError as exc:
        raise CacheError(f"{path.name}: cannot read shard: {exc.strerror}") from None
    try:
        header = json.loads(header_bytes)
        metadata = json.loads(header.pop("__metadata__")[SHARD_METADATA_KEY])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CacheError(f"{path.name}: corrupt shard header") from None
    if not isinstance(metadata, dict):
        raise CacheError(f"{path.name}: corrupt shard header")

    data_start = 8 + header_len
    data_size = size - data_start
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    arrays: dict[str, tuple[np.ndarray, torch.dtype]] = {}
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            np_dtype, torch_dtype, item = _STORAGE_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{path.name}: corrupt header entry for tensor {name!r}") from None
        if not 0 <= begin <= end <= data_size or end - begin != item * math.prod(shape):
            raise CacheError(
                f"{path.name}: tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit "
                f"the file's {data_size} data bytes at offsets [{begin}, {end}); "
                "the shard is truncated or corrupt"
            )
        data_end = max(data_end, end)
        raw = buffer[data_start + begin : data_start + end]
        arrays[name] = (raw.view(np_dtype).reshape(shape), torch_dtype)
        layout[name] = (entry["dtype"], shape)
    if data_end != data_size:
        raise CacheError(
            f"{path.name}: {data_size - data_end} bytes after the last tensor; the shard is corrupt"
        )

    expected = expected_shard_tensors(spec)
    wanted = {*expected, "seq_offsets"}
    if set(layout) != wanted:
        raise CacheError(
            f"{path.name}: holds tensors {sorted(layout)}, expected {sorted(wanted)} for this spec"
        )
    offsets_dtype, offsets_shape = layout["seq_offsets"]
    if offsets_dtype != "I64" or len(offsets_shape) != 1 or offsets_shape[0] < 2:
        raise CacheError(f"{path.name}: seq_offsets must be I64 [S + 1] with S >= 1")
    num_rows = layout["ids"][1][0] if layout["ids"][1] else -1
    for name, (dtype, tail) in expected.items():
        got_dtype, got_shape = layout[name]
        if got_dtype != dtype or got_shape != (num_rows, *tail):
            raise CacheError(
                f"{path.name}: tensor {name!r} is {got_dtype} {list(got_shape)}, "
                f"expected {dtype} {[num_rows, *tail]}"
            )
    seq_offsets = np.array(arrays["seq_offsets"][0])
    if seq_offsets[0] != 0 or seq_offsets[-1] != num_rows or np.any(np.diff(seq_offsets) < 0):
        raise CacheError(
            f"{path.name}: seq_offsets must rise from 0 to the row count {num_rows}, "
            f"got {seq_offsets.tolist()[:8]}..."
        )
    return ShardFile(path, metadata, seq_offsets, num_rows, arrays)


# ---------------------------------------------------------------------------------------------
# Manifest


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
            raise CacheError(f"{source}: malformed shard record {data!r}")
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
            raise CacheError(f"{source}: malformed shard record {data!r}")
        return cls(**data)


def _manifest_checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a complete cache.

    Attributes:
        format_version: ``FORMAT_VERSION`` of the writer.
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
            names[name] = f"{dtype}[3]" if dtype == "U8" and tail[-1:] == (3,) else dtype
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
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{source}: cache format version {version!r} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        body = {key: value for key, value in data.items() if key != "checksum"}
        if data.get("checksum") != _manifest_checksum(body):
            raise CacheError(f"{source}: checksum mismatch, the manifest was edited or is corrupt")
        try:
            spec = CacheSpec.from_json(data["spec"], source=source)
            shards = tuple(ShardRecord.from_json(s, source=source) for s in data["shards"])
            sequence_ids = tuple(data["sequence_ids"])
            token_counts = tuple(data["token_counts"])
            world_size = data["world_size"]
        except (KeyError, TypeError) as exc:
            raise CacheError(f"{source}: malformed manifest ({exc!r})") from None
        manifest = cls(FORMAT_VERSION, spec, world_size, sequence_ids, token_counts, shards)
        manifest.check_consistent(source)
        if data.get("id_encoding") != spec.id_encoding:
            raise CacheError(
                f"{source}: id_encoding {data.get('id_encoding')!r} does not match vocab_size "
                f"{spec.vocab_size} (expected {spec.id_encoding!r})"
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
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise CacheError(f"{source}: world_size must be a positive int")
        covered = 0
        for shard in self.shards:
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
