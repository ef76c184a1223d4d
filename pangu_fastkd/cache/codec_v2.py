"""Cache format v2: the tensors of a shard, and rows encoded into them and decoded back.

Per supervised token (``K`` = ``spec.k``, ``B`` = ``spec.value_bits``, ``b`` = ``spec.id_bits``,
every ``U8`` row a fixed number of bytes so rows stay addressable in the memory map)::

    id_high      [n, ceil((K + ((V - 1) >> L)) / 8)] U8   elias_fano: unary high parts
    id_low       [n, ceil(K * L / 8)] U8                   elias_fano: low L bits (absent if L = 0)
    ids          [n, ceil(K * b / 8)] U8                   packed: b-bit ids, 2**b - 1 = empty
    codes        [n, ceil(K * B / 8)] U8                   B-bit log-prob codes (quantise.py)
    lse          [n] F32    Lambda, the full-vocabulary log-partition at T_c
    label_value  [n] F16    the label's log-prob t_y / T_c - Lambda (clamped at -65504)
    mass_logit   [n] F32    log-odds of the top-K mass P_S (quantise.py)
    sampled_ids  [n, ceil(Ks * b / 8)] U8                  only when spec.sampled_k > 0
    sampled_counts [n, Ks] U8 | I16 | I32                  as in v1
    seq_offsets  [S + 1] I64

With ``elias_fano`` a row's entries are sorted by id (the loss treats the top-K as a set), empty
slots last with the filler id ``V - 1`` and the empty code; with ``packed`` the teacher's order is
kept. At K = 64, V = 153,376, B = 6: 18 + 88 + 48 bytes of ids and codes and 10 bytes per token,
164 bytes in all against v1's 328 (3-byte ids, bf16 values).
"""

from __future__ import annotations

import numpy as np
import torch

from ..ops.sparse_kd_targets import TopKTarget
from .bitpack import EliasFano, field_bytes, pack_fields, unpack_fields
from .quantise import dequantise, quantise
from .spec import CacheSpec

__all__ = [
    "decode_v2_ids",
    "decode_v2_topk",
    "encode_v2_ids",
    "encode_v2_topk",
    "v2_shard_tensors",
    "v2_topk_names",
]

LABEL_DTYPE = torch.float16
_COUNTS_STORAGE = {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32"}


def _elias_fano(spec: CacheSpec) -> EliasFano:
    return EliasFano(spec.k, spec.vocab_size)


def v2_topk_names(spec: CacheSpec) -> tuple[str, ...]:
    """The shard tensors that hold a v2 cache's top-K rows."""
    if spec.id_coding == "packed":
        ids: tuple[str, ...] = ("ids",)
    else:
        ids = ("id_high", "id_low") if _elias_fano(spec).low_bits else ("id_high",)
    return (*ids, "codes", "lse", "label_value", "mass_logit")


def v2_shard_tensors(spec: CacheSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-row tensors of a v2 shard: name -> (safetensors dtype, shape after the row)."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    if spec.id_coding == "packed":
        tensors["ids"] = ("U8", (field_bytes(spec.k, spec.id_bits),))
    else:
        code = _elias_fano(spec)
        tensors["id_high"] = ("U8", (code.high_bytes,))
        if code.low_bits:
            tensors["id_low"] = ("U8", (code.low_bytes,))
    tensors["codes"] = ("U8", (field_bytes(spec.k, spec.value_bits),))
    tensors["lse"] = ("F32", ())
    tensors["label_value"] = ("F16", ())
    tensors["mass_logit"] = ("F32", ())
    if spec.sampled_k:
        tensors["sampled_ids"] = ("U8", (field_bytes(spec.sampled_k, spec.id_bits),))
        tensors["sampled_counts"] = (_COUNTS_STORAGE[spec.counts_dtype], (spec.sampled_k,))
    return tensors


def encode_v2_ids(ids: torch.Tensor, spec: CacheSpec) -> torch.Tensor:
    """``[n, m]`` checked ids (``-1`` = empty) as ``spec.id_bits``-bit fields, ``[n, bytes]``
    uint8; the empty slot is ``2**b - 1``."""
    wide = torch.where(ids < 0, (1 << spec.id_bits) - 1, ids.to(torch.int64))
    return torch.from_numpy(pack_fields(wide.numpy(), spec.id_bits))


def decode_v2_ids(packed: torch.Tensor, count: int, spec: CacheSpec) -> torch.Tensor:
    """Inverse of ``encode_v2_ids``: ``[n, count]`` int32, ``-1`` for empty slots.

    A field ``>= V`` other than the empty value decodes as itself, for the checks to refuse.
    """
    fields = unpack_fields(packed.numpy(), count, spec.id_bits)
    fields = np.where(fields == (1 << spec.id_bits) - 1, -1, fields)
    return torch.from_numpy(fields.astype(np.int32))


def encode_v2_topk(
    ids: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    label_value: torch.Tensor,
    spec: CacheSpec,
) -> dict[str, torch.Tensor]:
    """One sequence's checked top-K rows as v2 shard rows.

    Args:
        ids: ``[n, K]`` int64, distinct per row, ``-1`` = empty.
        values: ``[n, K]`` float32 log-probs ``t / T_c - Lambda``, ``-inf`` in empty slots.
        lse: ``[n]`` float32 Lambda.
        label_value: ``[n]`` float32 the label's log-prob.
        spec: a codec v2 spec.

    Returns:
        The rows of ``v2_topk_names(spec)``, in their stored dtypes.
    """
    empty = ids < 0
    codes, mass_logit = quantise(values, empty, spec.value_bits)
    rows: dict[str, torch.Tensor] = {}
    if spec.id_coding == "packed":
        rows["ids"] = encode_v2_ids(ids, spec)
    else:
        # Sort by id, empty slots last; they take the filler id V - 1 (a non-decreasing row).
        key = torch.where(empty, spec.vocab_size, ids)
        order = torch.argsort(key, dim=1, stable=True)
        sorted_empty = torch.gather(empty, 1, order)
        sorted_ids = torch.gather(key, 1, order).masked_fill(sorted_empty, spec.vocab_size - 1)
        codes = np.take_along_axis(codes, order.numpy(), axis=1)
        high, low = _elias_fano(spec).encode(sorted_ids.numpy())
        rows["id_high"] = torch.from_numpy(high)
        if low.shape[1]:
            rows["id_low"] = torch.from_numpy(low)
    rows["codes"] = torch.from_numpy(pack_fields(codes, spec.value_bits))
    rows["lse"] = lse.contiguous()
    # fp16 tops out at -65504: keep the label's log-prob finite (the loss requires it).
    label = label_value.clamp(min=torch.finfo(LABEL_DTYPE).min)
    rows["label_value"] = label.to(LABEL_DTYPE)
    rows["mass_logit"] = mass_logit
    return rows


def decode_v2_topk(
    parts: dict[str, torch.Tensor], spec: CacheSpec
) -> tuple[TopKTarget, torch.Tensor, torch.Tensor]:
    """Stored v2 rows as a ``TopKTarget``.

    Returns:
        ``(target, values, corrupt)``: the target (ids ``[n, K]`` int32, ``-1`` empty; logits
        ``T_c * (v + Lambda)``), the decoded log-probs ``v`` ``[n, K]`` float32 for the value
        checks, and ``corrupt`` ``[n]`` bool, rows whose id code cannot be a valid one (an
        Elias-Fano unary part without exactly K set bits, a packed id slot and its code
        disagreeing on emptiness).
    """
    codes = unpack_fields(parts["codes"].numpy(), spec.k, spec.value_bits)
    values, empty = dequantise(codes, parts["mass_logit"], spec.value_bits)
    n = codes.shape[0]
    if spec.id_coding == "packed":
        ids = decode_v2_ids(parts["ids"], spec.k, spec)
        corrupt = ((ids < 0) != empty).any(dim=1)
    else:
        low = parts.get("id_low", torch.zeros((n, 0), dtype=torch.uint8))
        decoded, ok = _elias_fano(spec).decode(parts["id_high"].numpy(), low.numpy())
        ids = torch.from_numpy(decoded.astype(np.int32)).masked_fill(empty, -1)
        corrupt = torch.from_numpy(~ok)
    lse = parts["lse"]
    label = parts["label_value"].to(torch.float32)
    logits = spec.temperature * (values + lse[:, None])
    target = TopKTarget(
        ids=ids,
        logits=logits,
        lse=lse,
        label_logit=spec.temperature * (label + lse),
        temperature=spec.temperature,
    )
    return target, values, corrupt
