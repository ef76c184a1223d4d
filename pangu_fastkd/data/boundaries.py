"""Document boundaries of a packed row: ``cu_seqlens``, RoPE positions and their checks.

A packed row lays ``B`` documents end to end in ``T`` tokens. Its boundaries travel as
``cu_seqlens [B + 1]`` (int32, flash-attn's varlen layout: 0, then each document's end, the last
being ``T``) or as ``position_ids [T]`` restarting at 0 at each document's first token (Hugging
Face's ``DataCollatorWithFlattening``). Packing builds them, attention reads them, both model
backends take either; this module is the one place that converts and checks them.

A model checks the boundaries once per forward, in ``resolve_documents``, which reads them to the
host once and returns a ``PackedDocuments``: the device tensors every layer's attention needs
plus the same boundaries as Python ints, so no layer has to read a device tensor back (on an
NPU, a read-back per layer would stall the stream once per layer).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PackedDocuments",
    "check_cu_seqlens",
    "check_position_ids",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "positions_from_cu_seqlens",
    "resolve_documents",
]


def cu_seqlens_from_lengths(lengths: Sequence[int] | Tensor) -> Tensor:
    """Cumulative document boundaries from document lengths.

    Args:
        lengths: ``[B]`` non-negative document lengths.

    Returns:
        ``[B + 1]`` int32 ``cu_seqlens`` starting at 0.
    """
    lengths = _integer_lengths(lengths)
    if bool((lengths < 0).any()):
        raise ValueError(f"document lengths must be >= 0, got {lengths.tolist()}")
    if int(lengths.sum()) > torch.iinfo(torch.int32).max or bool(
        (lengths > torch.iinfo(torch.int32).max).any()
    ):
        raise ValueError(f"total length {int(lengths.sum())} does not fit cu_seqlens' int32")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=cu[1:])
    if int(cu[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(f"total length {int(cu[-1])} does not fit cu_seqlens' int32")
    return cu.to(torch.int32)


def _integer_lengths(lengths: Sequence[int] | Tensor) -> Tensor:
    """``lengths`` as a flat int64 tensor; floats and bools are refused, not truncated."""
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"document lengths must be integers, got {lengths.dtype}")
        return lengths.long().flatten()
    values = []
    for value in lengths:
        try:
            if isinstance(value, bool):
                raise TypeError
            values.append(operator.index(value))  # ints and numpy ints, never a float
        except TypeError:
            raise TypeError(f"document lengths must be ints, got {value!r}") from None
        if not -(2**63) <= values[-1] < 2**63:
            raise ValueError(f"document length {value} does not fit int64")
    return torch.tensor(values, dtype=torch.int64)


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """Document boundaries of a packed row whose positions restart at 0 for each document.

    Args:
        position_ids: ``[T]`` or ``[1, T]`` integer positions, 0 at the first token of each document
            and increasing by 1 inside it.

    Returns:
        ``[B + 1]`` int32 ``cu_seqlens`` (on the CPU).
    """
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dtype == torch.bool or position_ids.is_complex():
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.dim() != 1 or position_ids.is_floating_point():
        raise ValueError(
            f"position_ids must be an integer [T] or [1, T] tensor, got {position_ids.dtype} "
            f"of shape {tuple(position_ids.shape)}"
        )
    pos = position_ids.long().cpu()
    T = pos.numel()
    if T == 0:
        return torch.zeros(1, dtype=torch.int32)
    if int(pos[0]) != 0:
        raise ValueError(f"position_ids must start at 0, got {int(pos[0])}")
    starts = (pos == 0).nonzero().squeeze(1)
    inside = pos[1:] != 0
    if bool((pos[1:][inside] != pos[:-1][inside] + 1).any()):
        bad = int(((pos[1:] != pos[:-1] + 1) & inside).nonzero()[0, 0]) + 1
        raise ValueError(f"position_ids must count up by 1 inside a document (index {bad})")
    return torch.cat([starts, torch.tensor([T])]).to(torch.int32)


def check_cu_seqlens(cu_seqlens: Tensor, total: int) -> list[int]:
    """Check ``cu_seqlens [B + 1]`` int32 delimits ``total`` tokens; return it as host ints.

    Reads the tensor back to the host once (every check below works on those ints).

    Raises:
        TypeError: not int32.
        ValueError: not ``[B + 1]`` with ``B >= 1``, not starting at 0, decreasing, or not
            ending at ``total``.
    """
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(end < start for start, end in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at T = {total}, got {bounds[-1]}")
    return bounds


def check_position_ids(position_ids: Tensor, total: int) -> Tensor:
    """``position_ids [T]`` or ``[1, T]`` checked to be integers for ``total`` tokens.

    Returns:
        ``[T]`` int64 on the CPU.
    """
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1 or position_ids.shape[0] != total:
        raise ValueError(
            f"position_ids must be [T] or [1, T] with T = {total}, "
            f"got shape {tuple(position_ids.shape)}"
        )
    if position_ids.is_floating_point() or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    return position_ids.long().cpu()


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """RoPE positions ``[T]`` int64 (0 at each document start) from ``cu_seqlens [B + 1]`` int32
    (checked as ``check_cu_seqlens``); on the CPU."""
    return _positions(check_cu_seqlens(cu_seqlens, total))


def _positions(bounds: Sequence[int]) -> Tensor:
    """``[T]`` int64 positions restarting at 0 at each of the (checked) ``bounds``."""
    cu = torch.tensor(bounds, dtype=torch.int64)
    starts = cu[:-1].repeat_interleave(cu[1:] - cu[:-1])  # [T]: each token's document start
    return torch.arange(bounds[-1], dtype=torch.int64) - starts


@dataclass(frozen=True)
class PackedDocuments:
    """The checked boundaries of one packed row, ready for every layer (``resolve_documents``).

    Attention given this object trusts it and reads nothing back from the device.

    Attributes:
        cu_seqlens: ``[B + 1]`` int32 on the model's device.
        bounds: the same boundaries as host ints (for kernels that take host lengths).
        max_seqlen: the longest document's length.
        positions: ``[T]`` int64 RoPE positions on the model's device.
    """

    cu_seqlens: Tensor
    bounds: tuple[int, ...]
    max_seqlen: int
    positions: Tensor

    @property
    def total(self) -> int:
        """``T``, the tokens of the row."""
        return self.bounds[-1]


def resolve_documents(
    input_ids: Tensor,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    max_positions: int | None = None,
) -> PackedDocuments:
    """The documents of a packed row, checked once for all layers.

    Args:
        input_ids: ``[T]`` the row's token ids (read for ``T`` and the device of the result).
        cu_seqlens: ``[B + 1]`` int32 document boundaries (0, ..., T).
        position_ids: ``[T]`` (or ``[1, T]``) positions restarting at 0 in each document. Give at
            most one of ``cu_seqlens`` and ``position_ids``; neither means one document.
        max_positions: the model's ``max_position_embeddings``, if documents are bounded by it.

    Raises:
        TypeError, ValueError: boundaries that are not a valid packing of ``total`` tokens, or a
            document longer than ``max_positions``.
    """
    total, device = input_ids.shape[0], input_ids.device
    if cu_seqlens is not None and position_ids is not None:
        raise ValueError("give cu_seqlens or position_ids, not both")
    if position_ids is not None:
        positions = check_position_ids(position_ids, total)
        cu_seqlens = cu_seqlens_from_position_ids(positions)  # checks the restart pattern
        bounds = cu_seqlens.tolist()
    else:
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, total], dtype=torch.int32)
        elif not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
            got = cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
            raise TypeError(f"cu_seqlens must be an int32 tensor, got {got}")
        bounds = check_cu_seqlens(cu_seqlens, total)
        positions = _positions(bounds)
    longest = max(end - start for start, end in itertools.pairwise(bounds))
    if max_positions is not None and longest > max_positions:
        raise ValueError(
            f"a document of {longest} tokens exceeds max_position_embeddings ({max_positions})"
        )
    return PackedDocuments(
        cu_seqlens=cu_seqlens.to(device=device, dtype=torch.int32),
        bounds=tuple(bounds),
        max_seqlen=longest,
        positions=positions.to(device),
    )
