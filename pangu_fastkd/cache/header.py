"""A safetensors header read defensively, before safetensors itself sees the file.

A shard's file starts with an 8-byte little-endian header length ``N``, then ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then
the data region. A hostile header must end in a CacheError naming the shard, never in an
OverflowError (``1e400`` in a shape), a RecursionError (100,000 nested ``[``), an oversized
allocation or a tensor that reads its neighbour's bytes, so this module checks, in order:

- the header length: at most ``MAX_HEADER_BYTES`` and inside the file;
- the JSON: UTF-8, no deep nesting, no repeated key (two parsers could pick different copies);
- each tensor: a known dtype, a shape of at most ``MAX_DIMS`` non-negative ints each at most
  ``MAX_DIM``, integer offsets ``0 <= begin <= end`` with ``end - begin == numel * itemsize``;
- all tensors together: sorted by offset they tile the data region exactly, from 0 to its
  size, with no gap and no overlap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .jsonfile import parse_json
from .spec import CacheError

__all__ = ["DTYPE_SIZES", "MAX_HEADER_BYTES", "ShardHeader", "TensorInfo", "read_header"]

# Our headers hold seven tensors and a few hundred bytes of metadata; 1 MiB is generous and
# keeps a crafted length from making us allocate gigabytes.
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8
# Far above any real shard (2^48 rows), far below what torch or a usize could overflow on.
MAX_DIM = 1 << 48

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the header: dtype, shape and byte range in the data region."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ShardHeader:
    """A checked header: its tensors, its ``__metadata__`` and where the data region starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _corrupt(label: str, detail: str) -> CacheError:
    return CacheError(
        f"{label}: not a valid safetensors file ({detail}); the shard is truncated or corrupt"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(label: str, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(label, f"header entry of tensor {name!r} is malformed")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list is not even hashable
        raise _corrupt(label, f"tensor {name!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise _corrupt(
            label,
            f"tensor {name!r} has shape {str(shape)[:80]}, expected at most {MAX_DIMS} "
            f"ints in [0, {MAX_DIM}]",
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(
            label,
            f"tensor {name!r} has data_offsets {str(offsets)[:80]}, expected "
            "[begin, end] ints with 0 <= begin <= end",
        )
    numel = 1
    for dim in shape:
        numel *= dim  # Python ints: no overflow
    begin, end = offsets
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise _corrupt(
            label,
            f"tensor {name!r} ({dtype} {shape}) needs {numel * DTYPE_SIZES[dtype]} "
            f"bytes, its data_offsets [{begin}, {end}] hold {end - begin}",
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(label: str, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """The tensors' byte ranges, sorted, must cover ``[0, data_size)`` exactly once."""
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = "overlaps the previous tensor" if info.begin < position else "leaves a gap"
            raise _corrupt(
                label,
                f"tensor {name!r} starts at data byte {info.begin}, expected {position}: it "
                f"{problem}",
            )
        position = info.end
    if position != data_size:
        raise _corrupt(
            label,
            f"the tensors end at data byte {position}, the file's data region holds "
            f"{data_size} bytes",
        )


def read_header(fd: int, file_size: int, label: str) -> ShardHeader:
    """Read and check the safetensors header of the open file ``fd`` of ``file_size`` bytes.

    Args:
        fd: the shard, opened for reading (positional reads only: the offset is not moved).
        file_size: its size in bytes (from ``fstat``).
        label: how errors name the file.

    Raises:
        CacheError: naming ``label`` and what is wrong (see the module docstring).
    """
    prefix = os.pread(fd, 8, 0)
    if len(prefix) != 8:
        raise _corrupt(label, "shorter than a safetensors header")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES or length > file_size - 8:
        raise _corrupt(
            label,
            f"header length {length} exceeds the limit of {MAX_HEADER_BYTES} bytes or "
            f"the file ({file_size} bytes)",
        )
    text = os.pread(fd, length, 8)
    if len(text) != length:
        raise _corrupt(label, "header is cut short")
    if not text.startswith(b"{"):
        raise _corrupt(label, "header is not a JSON object")
    # Depth 3 is the deepest a header goes: top level -> tensor entry -> shape list.
    try:
        header = parse_json(text, "header", max_depth=3)
    except CacheError as exc:
        raise _corrupt(label, str(exc)) from None
    if not isinstance(header, dict):
        raise _corrupt(label, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(label, "header __metadata__ must map strings to strings")
    tensors = {name: _tensor_info(label, name, entry) for name, entry in header.items()}
    data_start = 8 + length
    _check_tiling(label, tensors, file_size - data_start)
    return ShardHeader(tensors, metadata, data_start)
