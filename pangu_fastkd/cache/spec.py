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

__all__ = [
    "FORMAT_VERSION",
    "ID_ENCODINGS",
    "MAX_VOCAB_SIZE",
    "VALUE_DTYPES",
    "CacheError",
    "CacheSpec",
    "decode_ids",
    "encode_ids",
    "id_encoding_for_vocab",
]

# Written into the manifest, progress files and shard metadata; readers refuse any other.
FORMAT_VERSION = 1

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
