"""Quantised teacher log-probs of cache format v2: ``value_bits``-bit codes relative to the row max.

A row's stored log-probs ``v_j = t_j / T_c - Lambda`` become their distances to the row's largest,
``d_j = max(v) - v_j >= 0``, mapped through a compander and rounded to one of ``2**B - 2`` levels:

    u_j = (1 - exp(-d_j / A)) / (1 - exp(-R / A)),  code_j = round(u_j * (2**B - 3))

with ``A = 4`` and ``R = 30`` (a distance beyond 30 nats, a probability below 1e-13 of the row's
largest, is stored as 30). Uniform steps in ``u`` are steps in ``d`` that grow as ``exp(d / A)``:
fine where a token carries mass, coarse in the far tail, where an error costs the divergence
little (an entry's share of the KL is about ``p_j * err_j**2 / 2``). At 6 bits this gives a mean
per-token KL of decoded against exact below 5e-4 nats from flat (random-weight) to peaked
teachers, where uniform steps in ``d`` over the same range reach 1e-3 (measured in
bench/bench_cache_codec.py and tests/test_cache_v2.py). Two codes are reserved: ``2**B - 2`` for
an impossible token (``v = -inf``, its id kept) and ``2**B - 1`` for an empty slot (no id).

The row max itself is not stored. Instead each row keeps the top-K mass ``P_S = sum_j exp(v_j)``
as its log-odds ``log(P_S / (1 - P_S))`` in fp32 (``+inf`` when ``P_S`` rounds to 1), precise
at both ends, and the decoder shifts the decoded ``-d_j`` so that they sum to exactly that mass:
the tail bucket ``1 - P_S`` of ``docs/kd-losses.md`` (``mode="tail"``) is the writer's to fp32
precision, however coarse the codes, and quantisation only moves mass between stored tokens.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "COMPANDER_SCALE",
    "DISTANCE_RANGE",
    "MAX_VALUE_BITS",
    "MIN_VALUE_BITS",
    "dequantise",
    "empty_code",
    "impossible_code",
    "quantise",
]

COMPANDER_SCALE = 4.0  # A
DISTANCE_RANGE = 30.0  # R, in nats below the row's largest log-prob
MIN_VALUE_BITS = 3  # 6 levels: coarser codes than that stop being a distribution
MAX_VALUE_BITS = 16


def _levels(bits: int) -> int:
    """Codes that stand for a distance: ``0 .. 2**bits - 3``."""
    return (1 << bits) - 2


def impossible_code(bits: int) -> int:
    """The code of a stored id whose log-prob is ``-inf``."""
    return (1 << bits) - 2


def empty_code(bits: int) -> int:
    """The code of an empty slot."""
    return (1 << bits) - 1


def _check_bits(bits: int) -> None:
    if not MIN_VALUE_BITS <= bits <= MAX_VALUE_BITS:
        raise ValueError(f"value_bits must be in [{MIN_VALUE_BITS}, {MAX_VALUE_BITS}], got {bits}")


def quantise(
    values: torch.Tensor, empty: torch.Tensor, bits: int
) -> tuple[np.ndarray, torch.Tensor]:
    """Codes and the top-K mass of checked rows.

    Args:
        values: ``[n, K]`` float32 log-probs ``v``, finite or ``-inf``, each row's
            probabilities summing to at most ``1 + 1e-3``.
        empty: ``[n, K]`` bool, the empty slots (their values are ignored).
        bits: B, bits per code.

    Returns:
        ``codes`` ``[n, K]`` int64 in ``[0, 2**B)`` and ``mass_logit`` ``[n]`` float32, the
        log-odds of ``P_S`` (``-inf`` for a row without a finite value, ``+inf`` when
        ``P_S >= 1``).
    """
    _check_bits(bits)
    v = values.to(torch.float64).masked_fill(empty, -math.inf)
    finite = torch.isfinite(v)
    row_max = torch.where(finite, v, -math.inf).amax(dim=1, keepdim=True)
    distance = (row_max - v).clamp(max=DISTANCE_RANGE)
    distance = torch.where(finite, distance, 0.0)
    scale = -math.expm1(-DISTANCE_RANGE / COMPANDER_SCALE)
    u = -torch.expm1(-distance / COMPANDER_SCALE) / scale
    codes = torch.round(u * (_levels(bits) - 1)).to(torch.int64)
    codes = torch.where(finite, codes, impossible_code(bits))
    codes = torch.where(empty, empty_code(bits), codes)

    log_mass = torch.logsumexp(v, dim=1)  # -inf for a row of -inf and empty slots only
    log_tail = torch.log(-torch.expm1(log_mass.clamp(max=0.0)))  # -inf when P_S >= 1
    mass_logit = (log_mass - log_tail).to(torch.float32)
    return codes.numpy(), mass_logit


def _distance_table(bits: int) -> torch.Tensor:
    """``[2**B]`` float32: the decoded distance ``d`` of each code (inf for the reserved two)."""
    scale = -math.expm1(-DISTANCE_RANGE / COMPANDER_SCALE)
    u = torch.arange(_levels(bits), dtype=torch.float64) / (_levels(bits) - 1)
    distance = -COMPANDER_SCALE * torch.log1p(-u * scale)
    reserved = torch.full((2,), math.inf, dtype=torch.float64)
    return torch.cat([distance, reserved]).to(torch.float32)


_TABLES: dict[int, torch.Tensor] = {}


def dequantise(
    codes: np.ndarray, mass_logit: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs back from codes, shifted to the stored top-K mass.

    Args:
        codes: ``[n, K]`` integer codes in ``[0, 2**B)``.
        mass_logit: ``[n]`` float32 log-odds of each row's top-K mass.
        bits: B.

    Returns:
        ``values`` ``[n, K]`` float32 log-probs (``-inf`` for impossible tokens and empty
        slots, ``NaN`` where ``mass_logit`` is NaN) with ``sum_j exp(values_j) = P_S``, and
        ``empty`` ``[n, K]`` bool.
    """
    _check_bits(bits)
    table = _TABLES.get(bits)
    if table is None:
        table = _TABLES.setdefault(bits, _distance_table(bits))
    codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    relative = -table[codes]  # [n, K]: log-probs up to the row's shift, max 0
    ell = mass_logit.to(torch.float32)
    # log P_S = log sigmoid(ell), stable at both ends (+inf gives 0, -inf gives -inf).
    log_mass = torch.nn.functional.logsigmoid(ell)
    shift = log_mass - torch.logsumexp(relative, dim=1)
    # A row without a finite code has shift nan or -inf; its values stay -inf.
    values = torch.where(torch.isfinite(relative), relative + shift[:, None], -math.inf)
    values = torch.where(torch.isnan(ell)[:, None], math.nan, values)
    return values, codes == empty_code(bits)
