"""What a teacher-logit cache holds: its spec, the error every cache check raises, id encodings.

Everything here is the same for every rank and shard of one cache; the shard layout built on it
is in ``shards.py``, the manifest that records it in ``manifest.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .quantise import MAX_VALUE_BITS, MIN_VALUE_BITS

__all__ = [
    "CODECS",
    "DEFAULT_VALUE_BITS",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "ID_CODINGS",
    "ID_ENCODINGS",
    "MAX_VOCAB_SIZE",
    "VALUE_DTYPES",
    "CacheError",
    "CacheSpec",
    "codec_fields",
    "decode_ids",
    "encode_ids",
    "id_encoding_for_vocab",
]

# Written into the manifest, progress files and shard metadata: 1 for codec "v1", 2 for "v2".
# Readers read both and refuse any other.
FORMAT_VERSION = 2
FORMAT_VERSIONS = {"v1": 1, "v2": 2}
CODECS = tuple(FORMAT_VERSIONS)
# How codec v2 stores top-K ids: Elias-Fano after sorting the row by id, or plain bit fields.
ID_CODINGS = ("elias_fano", "packed")
DEFAULT_VALUE_BITS = 6

VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ID_ENCODINGS = ("int16", "uint24", "int32")
UINT24_EMPTY = 0xFFFFFF  # the empty slot of 3-byte ids; -1 everywhere else
MAX_VOCAB_SIZE = 1 << 31  # the largest id, 2**31 - 1, is the largest int32
MAX_SAMPLED_DRAWS = (1 << 31) - 1


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
        value_dtype: codec v1 only: ``"bf16"``, ``"fp16"`` or ``"fp32"``, storage of the
            log-prob values (v2 quantises them to ``value_bits``; its spec keeps ``"bf16"``).
        sampled_k: Ks, slots of sampled targets per token (0: none stored).
        sampled_draws: draws per token of the sampled targets (0 exactly when ``sampled_k`` is).
        provenance: free-form JSON (templates, teacher path, scorer version...).
        codec: ``"v2"`` (bit-packed ids, quantised log-probs; docs/cache-format.md) or ``"v1"``
            (whole-byte ids, float log-probs).
        value_bits: codec v2 only: bits per quantised log-prob, 3 to 16 (None: 6).
        id_coding: codec v2 only: ``"elias_fano"`` (rows sorted by id, about 13 bits per id at
            K = 64 and V = 153,376) or ``"packed"`` (``V.bit_length()`` bits per id, the
            teacher's order kept) (None: elias_fano).
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
    codec: str = "v2"
    value_bits: int | None = None
    id_coding: str | None = None

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 1)
        if self.vocab_size > MAX_VOCAB_SIZE:
            # Ids are int32 in the widest encoding and in the KD targets: id 2**31 would wrap.
            raise ValueError(
                f"vocab_size must be <= 2**31 ({MAX_VOCAB_SIZE}), got {self.vocab_size}"
            )
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
        if self.sampled_draws > MAX_SAMPLED_DRAWS:
            raise ValueError(
                f"sampled_draws must be <= 2**31 - 1 ({MAX_SAMPLED_DRAWS}), counts are stored "
                f"as int32 at most; got {self.sampled_draws}"
            )
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
        self._check_codec()

    def _check_codec(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.codec == "v1":
            for name in ("value_bits", "id_coding"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to codec v2 only (codec v1 stores values as "
                        f"value_dtype and ids in whole bytes), got {getattr(self, name)!r}"
                    )
            return
        if self.value_dtype != "bf16":
            raise ValueError(
                f"value_dtype applies to codec v1 only (v2 quantises log-probs to value_bits), "
                f"got {self.value_dtype!r}"
            )
        bits = DEFAULT_VALUE_BITS if self.value_bits is None else self.value_bits
        _check_int("value_bits", bits, MIN_VALUE_BITS)
        if bits > MAX_VALUE_BITS:
            raise ValueError(f"value_bits must be <= {MAX_VALUE_BITS}, got {bits}")
        object.__setattr__(self, "value_bits", bits)
        coding = "elias_fano" if self.id_coding is None else self.id_coding
        if coding not in ID_CODINGS:
            raise ValueError(f"id_coding must be one of {ID_CODINGS}, got {coding!r}")
        object.__setattr__(self, "id_coding", coding)

    @property
    def format_version(self) -> int:
        """The format version of caches with this spec's codec (1 or 2)."""
        return FORMAT_VERSIONS[self.codec]

    @property
    def id_encoding(self) -> str:
        """How token ids are stored: v1 ``"int16"``, ``"uint24"`` or ``"int32"``; v2 its
        ``id_coding``."""
        if self.codec == "v2":
            return self.id_coding
        return id_encoding_for_vocab(self.vocab_size)

    @property
    def id_bits(self) -> int:
        """Bits of one bit-packed id (codec v2): ids ``< V`` and the empty slot ``2**b - 1``."""
        return self.vocab_size.bit_length()

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
        """The spec as a JSON-ready dict (field names as keys), only the fields of its codec:
        a v1 spec is written exactly as version 1 wrote it."""
        data = asdict(self)
        for name in _FIELDS_NOT_IN[self.codec]:
            del data[name]
        return data

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> CacheSpec:
        """Rebuild a spec from ``to_json`` output; CacheError naming ``source`` if malformed."""
        codec = data.get("codec", "v1") if isinstance(data, dict) else None
        codec = codec if isinstance(codec, str) else None
        names = {f.name for f in fields(cls)} - set(_FIELDS_NOT_IN.get(codec, ()))
        if codec not in CODECS or set(data) != names:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise CacheError(
                f"{source}: malformed spec, expected fields {sorted(names)}, got {got}"
            )
        try:
            return cls(**{"codec": codec, **data})  # a v1 spec has no codec field
        except (TypeError, ValueError) as exc:
            raise CacheError(f"{source}: invalid spec: {exc}") from None

    def differences(self, other: CacheSpec) -> list[tuple[str, Any, Any]]:
        """``(field, self's value, other's value)`` for every field where the specs differ."""
        return [
            (f.name, getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def codec_fields(codec: str, value_dtype: str, value_bits: int, id_coding: str) -> dict[str, Any]:
    """The ``CacheSpec`` fields of a writer's codec choice, where the writer's settings carry
    every option with its default (``ScoringConfig``, the ``score`` stage).

    Raises:
        ValueError: an option of the other codec is set away from its default (it would be
            ignored), or a value no codec has.
    """
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if codec == "v1":
        if value_bits != DEFAULT_VALUE_BITS or id_coding != ID_CODINGS[0]:
            raise ValueError(
                "value_bits and id_coding apply to codec v2 only (v1 stores value_dtype values "
                "and whole-byte ids)"
            )
        return {"codec": "v1", "value_dtype": value_dtype}
    if value_dtype != "bf16":
        raise ValueError(
            f"value_dtype applies to codec v1 only (v2 quantises log-probs to value_bits), got "
            f"{value_dtype!r}"
        )
    return {"codec": "v2", "value_bits": value_bits, "id_coding": id_coding}


# What ``to_json`` leaves out per codec: v1 manifests predate the codec fields, and a v2 spec's
# value_dtype is always the unused default.
_FIELDS_NOT_IN = {"v1": ("codec", "value_bits", "id_coding"), "v2": ("value_dtype",)}


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

    Raises:
        ValueError: an id does not fit the encoding (it would wrap, 2**32 + 1 becoming 1); the
            message gives the id as it was, computed in int64.
    """
    if encoding not in ID_ENCODINGS:
        raise ValueError(f"id encoding must be one of {ID_ENCODINGS}, got {encoding!r}")
    ids = ids.to(torch.int64)
    top = {"int16": (1 << 15) - 1, "uint24": UINT24_EMPTY - 1, "int32": (1 << 31) - 1}[encoding]
    bad = (ids < -1) | (ids > top)
    if bad.any():
        value = int(ids[bad][0])
        raise ValueError(f"id {value} does not fit the {encoding} id encoding ([-1, {top}])")
    if encoding == "int16":
        return ids.to(torch.int16)
    if encoding == "int32":
        return ids.to(torch.int32)
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
