"""Shard files of the teacher-logit cache: names, tensor layout, bytes, memory-mapped reads.

A shard is a safetensors file holding a contiguous range of one rank's sequences (``n``
supervised tokens, ``S`` sequences, ``K`` = ``spec.k``). Codec v2's tensors are listed in
``codec_v2.py``; codec v1's are::

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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from .codec_v2 import v2_shard_tensors
from .files import open_regular, sha256_fd
from .header import ShardHeader, read_header
from .jsonfile import parse_json
from .spec import CacheError, CacheSpec

__all__ = [
    "SHARD_METADATA_KEY",
    "SHARD_NAME_PATTERN",
    "ShardFile",
    "check_shard_name",
    "encode_shard",
    "expected_shard_tensors",
    "open_shard",
    "shard_codec_metadata",
    "shard_name",
]

# The shard's own description lives under one safetensors metadata key: safetensors keeps
# metadata in a hash map, so with several keys their order (and the file's bytes) could vary.
SHARD_METADATA_KEY = "pangu_fastkd.cache"

_VALUE_STORAGE = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_ID_STORAGE = {"int16": ("I16", ()), "uint24": ("U8", (3,)), "int32": ("I32", ())}
_COUNTS_STORAGE = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32"}


# What ``shard_name`` writes, and all a manifest or progress file may name: a plain file name
# (no separator, no "..", ASCII digits only) is a file of the cache directory itself.
SHARD_NAME_PATTERN = re.compile(r"shard-r([0-9]{3,6})-([0-9]{5,9})\.safetensors")


def shard_name(rank: int, index: int) -> str:
    """File name of a rank's ``index``-th shard."""
    return f"shard-r{rank:03d}-{index:05d}.safetensors"


def check_shard_name(name: object, rank: int, source: str) -> None:
    """CacheError naming ``source`` unless ``name`` is what the writer of ``rank`` names a
    shard; matched before any file is touched, so a name like ``../x`` is never opened."""
    match = SHARD_NAME_PATTERN.fullmatch(name) if isinstance(name, str) else None
    if match is None or name != shard_name(int(match[1]), int(match[2])) or int(match[1]) != rank:
        raise CacheError(
            f"{source}: shard name {str(name)[:200]!r} is not a shard of rank {rank} "
            "(expected shard-rRRR-IIIII.safetensors inside the cache directory)"
        )


def shard_codec_metadata(spec: CacheSpec) -> dict[str, Any]:
    """What a shard's metadata says about its encoding (and every reader checks)."""
    if spec.codec == "v1":
        return {
            "format_version": 1,
            "id_encoding": spec.id_encoding,
            "value_dtype": spec.value_dtype,
        }
    return {
        "format_version": spec.format_version,
        "codec": spec.codec,
        "id_coding": spec.id_coding,
        "value_bits": spec.value_bits,
    }


def expected_shard_tensors(spec: CacheSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-row tensors of a shard: name -> (safetensors dtype, shape after the row dimension)."""
    if spec.codec == "v2":
        return v2_shard_tensors(spec)
    id_dtype, id_tail = _ID_STORAGE[spec.id_encoding]
    value_dtype = _VALUE_STORAGE[spec.value_dtype]
    tensors = {
        "ids": (id_dtype, (spec.k, *id_tail)),
        "values": (value_dtype, (spec.k,)),
        "lse": ("F32", ()),
        "label_value": (value_dtype, ()),
    }
    if spec.sampled_k:
        tensors["sampled_ids"] = (id_dtype, (spec.sampled_k, *id_tail))
        tensors["sampled_counts"] = (_COUNTS_STORAGE[spec.counts_dtype], (spec.sampled_k,))
    return tensors


def encode_shard(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Serialise a shard. The bytes depend only on the arguments (no timestamps, fixed order)."""
    text = json.dumps(metadata, sort_keys=True)
    return safetensors.torch.save(tensors, metadata={SHARD_METADATA_KEY: text})


@dataclass
class ShardFile:
    """A shard whose layout was checked, memory-mapped; rows are copied out on demand.

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
    _slices: dict[str, Any]  # tensor name -> safetensors slice of the memory map
    _views: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> view of the map

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name``: a ``[stop - start, ...]`` tensor of the
        stored dtype; only those rows are read from the file.

        safetensors returns a view of its (copy-on-write) map; the copy keeps the map's lifetime
        that of this object, so ``close`` (or eviction by the reader) really releases it.
        """
        return self._slices[name][start:stop].clone()

    def take(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """The rows ``rows`` (``[m]`` int64, any order) of tensor ``name``, copied out in one
        gather: a batch of many short sequences costs one call, not one slice per sequence."""
        view = self._views.get(name)
        if view is None:  # a view of the whole tensor in the map; only gathered rows are read
            view = self._views.setdefault(name, self._slices[name][0 : self.num_rows])
        return view.index_select(0, torch.from_numpy(rows))

    def close(self) -> None:
        """Drop the memory map (it is also released when the object is collected)."""
        self._views.clear()
        self._slices.clear()


def _map_shard(path: Path, fd: int) -> Any:
    """``safe_open`` of the already opened and checked shard ``fd``, every failure a CacheError
    naming it.

    On Linux safetensors opens ``/proc/self/fd/N``, the very file whose type, size, checksum
    and header were checked; a file renamed over the shard meanwhile is not the one mapped.
    """
    own = Path(f"/proc/self/fd/{fd}")
    target = own if own.exists() else path
    try:
        return safe_open(str(target), framework="pt")
    except FileNotFoundError:
        raise CacheError(f"{path.name}: shard file is missing ({path})") from None
    except SafetensorError as exc:
        raise CacheError(
            f"{path.name}: not a valid safetensors file ({exc}); the shard is truncated or corrupt"
        ) from None
    except OSError as exc:
        raise CacheError(f"{path.name}: cannot read shard: {exc.strerror}") from None
    except BaseException as exc:
        # A panic inside safetensors' Rust code surfaces as pyo3's PanicException, which
        # derives from BaseException: still a corrupt shard, not a reason to stop the process.
        if type(exc).__name__ != "PanicException":
            raise
        raise CacheError(f"{path.name}: safetensors failed on this shard ({exc})") from None


def _shard_metadata(label: str, header: ShardHeader) -> dict[str, Any]:
    text = header.metadata.get(SHARD_METADATA_KEY)
    if text is None:
        raise CacheError(f"{label}: corrupt shard header (no {SHARD_METADATA_KEY} metadata)")
    metadata = parse_json(text.encode(), f"{label}: shard metadata")
    if not isinstance(metadata, dict):
        raise CacheError(f"{label}: corrupt shard header (metadata is not an object)")
    return metadata


def _check_layout(label: str, header: ShardHeader, spec: CacheSpec) -> int:
    """The shard's row count after checking its tensors' names, dtypes and shapes."""
    layout = {name: (info.dtype, info.shape) for name, info in header.tensors.items()}
    expected = expected_shard_tensors(spec)
    wanted = {*expected, "seq_offsets"}
    if set(layout) != wanted:
        raise CacheError(
            f"{label}: holds tensors {sorted(layout)}, expected {sorted(wanted)} for this spec"
        )
    offsets_dtype, offsets_shape = layout["seq_offsets"]
    if offsets_dtype != "I64" or len(offsets_shape) != 1 or offsets_shape[0] < 2:
        raise CacheError(f"{label}: seq_offsets must be I64 [S + 1] with S >= 1")
    # Every per-row tensor leads with the row count; the first expected one sets it.
    first_shape = layout[next(iter(expected))][1]
    num_rows = first_shape[0] if first_shape else -1
    for name, (dtype, tail) in expected.items():
        got_dtype, got_shape = layout[name]
        if got_dtype != dtype or got_shape != (num_rows, *tail):
            raise CacheError(
                f"{label}: tensor {name!r} is {got_dtype} {list(got_shape)}, "
                f"expected {dtype} {[num_rows, *tail]}"
            )
    return num_rows


def open_shard(
    path: Path,
    spec: CacheSpec,
    *,
    num_bytes: int | None = None,
    sha256: str | None = None,
) -> ShardFile:
    """Memory-map a shard and check its layout against ``spec``.

    Checks, before safetensors sees the file: it is a regular file, not a link, FIFO or device
    (``files.open_regular``); its size is ``num_bytes`` and its content hashes to ``sha256``
    (each when given); its header passes ``header.read_header`` (bounded, tiling the data
    exactly). Then: the cache metadata is there and matches the spec's encodings, the expected
    tensors are there with the right dtype and shape, all per-row tensors agree on the row count
    and ``seq_offsets`` runs from 0 to it without going backwards. Anything else is a
    CacheError naming the shard. Nothing but ``seq_offsets`` is read here (and the whole file
    once when ``sha256`` is given).

    The mapping stays valid while a new cache file is renamed over the shard (the old inode
    lives on); truncating a mapped shard in place, which no writer here does, would fault.
    """
    path = Path(path)
    label = path.name
    with open_regular(path, label=label, missing="shard file is missing") as (fd, status):
        if num_bytes is not None and status.st_size != num_bytes:
            raise CacheError(
                f"{label}: shard is {status.st_size} bytes, the manifest says {num_bytes}; "
                "it is truncated or was altered"
            )
        if sha256 is not None and sha256_fd(fd) != sha256:
            raise CacheError(
                f"{label}: sha256 does not match the one recorded when the shard was written; "
                "the shard is corrupt or altered"
            )
        header = read_header(fd, status.st_size, label)
        metadata = _shard_metadata(label, header)
        for key, value in shard_codec_metadata(spec).items():
            # The type too: True and 1.0 compare equal to the format version 1.
            if type(metadata.get(key)) is not type(value) or metadata.get(key) != value:
                raise CacheError(
                    f"{label}: shard metadata says {key} {metadata.get(key)!r}, expected {value!r}"
                )
        num_rows = _check_layout(label, header, spec)
        handle = _map_shard(path, fd)
    slices = {name: handle.get_slice(name) for name in handle.keys()}
    # Both parsers must agree on what the file holds (we checked ours, safetensors maps its).
    mapped = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    if mapped != {name: (i.dtype, i.shape) for name, i in header.tensors.items()}:
        raise CacheError(f"{label}: safetensors reads a different layout than the header")
    seq_offsets = slices.pop("seq_offsets")[:].numpy().copy()  # a copy: see ``rows``
    if seq_offsets[0] != 0 or seq_offsets[-1] != num_rows or np.any(np.diff(seq_offsets) < 0):
        raise CacheError(
            f"{label}: seq_offsets must rise from 0 to the row count {num_rows}, "
            f"got {seq_offsets.tolist()[:8]}..."
        )
    return ShardFile(path, metadata, seq_offsets, num_rows, slices)
